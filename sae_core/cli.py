"""``saescope``: one command, one subcommand per job.

Each subcommand lives in ``sae_core.commands.<name>`` as ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Errors a user can cause (``SaescopeError``) end as one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sae_core.errors import SaescopeError

COMMANDS = ("train", "evaluate", "precompute", "label", "serve", "demo", "migrate", "graph")


def add_model_args(parser: argparse.ArgumentParser, *, default_layer: int | None = 15) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="subject model: 'smollm2-135m' (default, offline), a .gguf file, a transformers folder or a hub id",
    )
    parser.add_argument("--layer", type=int, default=default_layer, help="read the residual stream after this block")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def add_corpus_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corpus",
        default="default",
        help="'default' (Python stdlib source + pydoc topics), a folder or glob of text files, "
        "a .jsonl file, or hf:NAME (a datasets name; needs a network)",
    )
    parser.add_argument("--text-field", default="text", help="JSONL / datasets field holding the text")
    parser.add_argument("--ctx-len", type=int, default=64, help="tokens per context window (BOS not counted)")
    parser.add_argument("--seed", type=int, default=0, help="seed for shuffling and sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saescope",
        description="Train or load sparse autoencoders, precompute their features, and browse them.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"sae_core.commands.{name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except SaescopeError as err:
        print(f"saescope: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saescope: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
