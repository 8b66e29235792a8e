"""`saescope label` (being built; see its issue)."""

HELP = "label (not built yet)"


def add_arguments(parser):
    pass


def run(args):
    raise NotImplementedError("saescope label is not built yet")
