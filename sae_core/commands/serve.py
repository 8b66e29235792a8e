"""`saescope serve` (being built; see its issue)."""

HELP = "serve (not built yet)"


def add_arguments(parser):
    pass


def run(args):
    raise NotImplementedError("saescope serve is not built yet")
