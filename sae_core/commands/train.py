"""`saescope train` (being built; see its issue)."""

HELP = "train (not built yet)"


def add_arguments(parser):
    pass


def run(args):
    raise NotImplementedError("saescope train is not built yet")
