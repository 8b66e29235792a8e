"""`saescope train`: cache activations, train an SAE, evaluate it, save it with metrics.json.

Options left out take ``sae_core.saes.train_config.TrainConfig``'s defaults (one place, each explained
there); torch is imported only when the command runs, so other commands start fast.
"""

from __future__ import annotations

import argparse

from sae_core.cli import add_corpus_args, add_model_args

HELP = "train a sparse autoencoder on one layer's residual stream (resumable)"

# option -> TrainConfig field, for options that fall back to TrainConfig's default
CONFIG_OPTIONS = {
    "arch": "architecture",
    "width": "width",
    "k": "k",
    "prefixes": "prefixes",
    "l1": "l1_coeff",
    "tokens": "tokens",
    "cache_tokens": "cache_tokens",
    "batch_size": "batch_size",
    "lr": "lr",
    "eval_contexts": "eval_contexts",
    "checkpoint_every": "checkpoint_every",
}


def add_arguments(parser):
    add_model_args(parser)
    add_corpus_args(parser)
    parser.add_argument("--out", required=True, help="folder for the SAE (SAELens layout), metrics.json and checkpoints")
    parser.add_argument(
        "--arch",
        help="topk (default; TopK + AuxK), batchtopk (saved as JumpReLU), matryoshka (nested BatchTopK, see --prefixes) or relu (Anthropic)",
    )
    parser.add_argument("--width", type=int, help="number of latents (default: the power of two nearest 16 x d_model)")
    parser.add_argument("--k", type=int, help="active latents per token for topk/batchtopk (default: 32)")
    parser.add_argument(
        "--prefixes",
        type=int_list,
        help="for --arch matryoshka: nested dictionary sizes, ascending, the last the whole width (e.g. 1024,4096,16384)",
    )
    parser.add_argument("--l1", type=float, help="sparsity coefficient of the relu recipe (default: 5)")
    parser.add_argument("--tokens", type=int, help="training tokens (default: 2,000,000)")
    parser.add_argument("--cache-tokens", type=int, help="activations to cache and cycle through (default: --tokens, one epoch)")
    parser.add_argument("--batch-size", type=int, help="tokens per step (default: 4096)")
    parser.add_argument("--lr", type=float, help="learning rate (default: 2e-4/sqrt(width/16384) for TopK, 5e-5 for relu)")
    parser.add_argument("--eval-contexts", type=int, help="held-out contexts for the metrics (default: 256)")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: 50)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1024,4096,16384, got {text!r}") from None


def config_from_args(args):
    from sae_core.inputs.device import pick_device
    from sae_core.inputs.subject import DEFAULT_MODEL
    from sae_core.saes.train_config import TrainConfig

    given = {field: getattr(args, option) for option, field in CONFIG_OPTIONS.items() if getattr(args, option) is not None}
    return TrainConfig(
        model=args.model or DEFAULT_MODEL,
        layer=args.layer,
        corpus=args.corpus,
        text_field=args.text_field,
        ctx_len=args.ctx_len,
        seed=args.seed,
        device=str(pick_device(args.device)),
        **given,
    )


def run(args) -> int:
    from sae_core.inputs import distributed
    from sae_core.saes.train import train_sae

    with distributed.session() as world:  # under torchrun: data-parallel over its ranks
        out = train_sae(config_from_args(args), args.out, resume=args.resume)
        if world.is_main:
            print(f"saved {out}")
    return 0
