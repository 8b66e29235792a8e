"""``saescope``: one command, one subcommand per job.

Each subcommand lives in ``sae_core.commands.<name>`` as ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Every call builds every subcommand's parser, so a command module imports
what its work needs inside ``run`` (torch, transformers, the labels' numba): ``saescope serve``
or ``saescope precompute --no-label`` then holds none it does not use. Errors a user can cause end
as one line on stderr and exit 2: bad options (``Parser.error``) and everything a command refuses
(``SaescopeError``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sae_core.errors import SaescopeError

COMMANDS = ("train", "evaluate", "precompute", "families", "label", "serve", "demo", "migrate", "graph")


class Parser(argparse.ArgumentParser):
    """argparse with its refusals in one line (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_list(text: str) -> list[int]:
    """argparse type of options that take one number or several: '5,10,15' -> [5, 10, 15]."""
    try:
        return list(dict.fromkeys(int(part) for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, not {text!r}") from None


def name_list(text: str) -> list[str]:
    """argparse type of options that take one name or several: 'topk,relu' -> ['topk', 'relu']."""
    return list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def add_model_args(
    parser: argparse.ArgumentParser, *, default_layer: int | None = 15, several_layers: bool = False
) -> None:
    """--model, --layer (a list such as 5,10,15 with ``several_layers``) and --device."""
    parser.add_argument(
        "--model",
        default=None,
        help="subject model: 'smollm2-135m' (default, offline), a .gguf file, a transformers folder or a hub id",
    )
    if several_layers:
        parser.add_argument(
            "--layer",
            type=int_list,
            default=[default_layer],
            help=f"read the residual stream after this block, or each of several: 5,10,15 (default {default_layer})",
        )
    else:
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
    parser = Parser(
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
