"""`saescope demo` (being built; see its issue)."""

HELP = "demo (not built yet)"


def add_arguments(parser):
    pass


def run(args):
    raise NotImplementedError("saescope demo is not built yet")
