"""`saescope evaluate` (being built; see its issue)."""

HELP = "evaluate (not built yet)"


def add_arguments(parser):
    pass


def run(args):
    raise NotImplementedError("saescope evaluate is not built yet")
