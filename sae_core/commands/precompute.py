"""`saescope precompute` (being built; see its issue)."""

HELP = "precompute (not built yet)"


def add_arguments(parser):
    pass


def run(args):
    raise NotImplementedError("saescope precompute is not built yet")
