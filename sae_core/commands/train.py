"""`saescope train`: cache activations, train SAEs, evaluate them, save each with metrics.json.

``--layer``, ``--width``, ``--arch`` and ``--k`` take one value or a comma-separated list; the cross
product is trained in one loop over one pass of caching (sae_core.saes.train.train_saes), each SAE
in its own folder under ``--out`` (``l<layer>-<arch>[-<width>][-k<k>]``); one SAE goes into ``--out``
itself. Options left out take ``sae_core.saes.train_config.TrainConfig``'s defaults (one place, each
explained there); torch is imported only when the command runs, so other commands start fast.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from sae_core.cli import add_corpus_args, add_model_args, int_list, name_list

HELP = "train sparse autoencoders on the residual stream of one layer or several (resumable)"

# option -> TrainConfig field, for single-valued options that fall back to TrainConfig's default
CONFIG_OPTIONS = {
    "l1": "l1_coeff",
    "tokens": "tokens",
    "cache_tokens": "cache_tokens",
    "batch_size": "batch_size",
    "lr": "lr",
    "eval_contexts": "eval_contexts",
    "checkpoint_every": "checkpoint_every",
}


def add_arguments(parser):
    add_model_args(parser, several_layers=True)
    add_corpus_args(parser)
    parser.add_argument(
        "--out", required=True, help="folder for the SAE (SAELens layout), metrics.json and checkpoints; "
        "with several SAEs, the folder holding one such folder each"
    )  # fmt: skip
    parser.add_argument(
        "--arch", type=name_list, help="topk (default; TopK + AuxK), batchtopk (saved as JumpReLU) or relu (Anthropic); or several: topk,relu"
    )  # fmt: skip
    parser.add_argument(
        "--width", type=int_list, help="number of latents (default: the power of two nearest 16 x d_model); or several: 1024,4096,16384"
    )  # fmt: skip
    parser.add_argument("--k", type=int_list, help="active latents per token for topk/batchtopk (default: 32); or several: 16,32")
    parser.add_argument("--l1", type=float, help="sparsity coefficient of the relu recipe (default: 5)")
    parser.add_argument("--tokens", type=int, help="training tokens (default: 2,000,000)")
    parser.add_argument("--cache-tokens", type=int, help="activations to cache and cycle through (default: --tokens, one epoch)")
    parser.add_argument("--batch-size", type=int, help="tokens per step (default: 4096)")
    parser.add_argument("--lr", type=float, help="learning rate (default: 2e-4/sqrt(width/16384) for TopK, 5e-5 for relu)")
    parser.add_argument("--eval-contexts", type=int, help="held-out contexts for the metrics (default: 256)")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: 50)")
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs in --out")


def jobs_from_args(args) -> list:
    """One TrainJob per SAE of the cross product of --layer, --arch, --width and --k."""
    from sae_core.inputs.device import pick_device
    from sae_core.inputs.subject import DEFAULT_MODEL
    from sae_core.saes.train import TrainJob, job_folder
    from sae_core.saes.train_config import TrainConfig

    given = {field: getattr(args, option) for option, field in CONFIG_OPTIONS.items() if getattr(args, option) is not None}
    shared = dict(
        model=args.model or DEFAULT_MODEL,
        corpus=args.corpus,
        text_field=args.text_field,
        ctx_len=args.ctx_len,
        seed=args.seed,
        device=str(pick_device(args.device)),
        **given,
    )
    ks = args.k or [None]
    configs: dict[str, TrainConfig] = {}
    for layer, arch, width, k in itertools.product(args.layer, args.arch or [None], args.width or [None], ks):
        chosen = {"layer": layer, "architecture": arch, "width": width, "k": None if arch == "relu" else k}
        cfg = TrainConfig(**shared, **{name: value for name, value in chosen.items() if value is not None})
        configs[job_folder(cfg, with_k=len(ks) > 1)] = cfg  # relu ignores --k: one SAE for all of them
    out = Path(args.out)
    if len(configs) == 1:
        return [TrainJob(cfg, out) for cfg in configs.values()]
    return [TrainJob(cfg, out / name) for name, cfg in configs.items()]


def run(args) -> int:
    from sae_core.inputs import distributed
    from sae_core.saes.train import train_saes

    with distributed.session() as world:  # under torchrun: data-parallel over its ranks
        outs = train_saes(jobs_from_args(args), resume=args.resume)
        if world.is_main:
            for out in outs:
                print(f"saved {out}")
    return 0
