"""`saescope train`: cache activations, train an SAE, evaluate it, save it with metrics.json."""

from __future__ import annotations

from sae_core.cli import add_corpus_args, add_model_args

HELP = "train a sparse autoencoder on one layer's residual stream (resumable)"


def add_arguments(parser):
    from sae_core.train import ARCHITECTURES, TrainConfig

    defaults = TrainConfig()
    add_model_args(parser, default_layer=defaults.layer)
    add_corpus_args(parser)
    parser.add_argument("--out", required=True, help="folder for the SAE (SAELens layout), metrics.json and checkpoints")
    parser.add_argument("--arch", choices=ARCHITECTURES, default=defaults.architecture, help="training recipe (default: %(default)s)")
    parser.add_argument("--width", type=int, default=None, help="number of latents (default: power of two nearest 16 x d_model)")
    parser.add_argument("--k", type=int, default=defaults.k, help="active latents per token for topk/batchtopk (default: %(default)s)")
    parser.add_argument("--l1", type=float, default=defaults.l1_coeff, help="sparsity coefficient for relu (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help="training tokens (default: %(default)s)")
    parser.add_argument(
        "--cache-tokens",
        type=int,
        default=None,
        help="activations to cache and cycle through (default: --tokens, one epoch)",
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="tokens per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's, scaled by width)")
    parser.add_argument(
        "--eval-contexts", type=int, default=defaults.eval_contexts, help="held-out contexts for the metrics (default: %(default)s)"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=defaults.checkpoint_every, help="steps between checkpoints (default: %(default)s)"
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")


def config_from_args(args):
    import torch

    from sae_core.subject import DEFAULT_MODEL
    from sae_core.train import TrainConfig

    return TrainConfig(
        model=args.model or DEFAULT_MODEL,
        layer=args.layer,
        corpus=args.corpus,
        text_field=args.text_field,
        ctx_len=args.ctx_len,
        architecture=args.arch,
        width=args.width,
        k=args.k,
        l1_coeff=args.l1,
        tokens=args.tokens,
        cache_tokens=args.cache_tokens,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        eval_contexts=args.eval_contexts,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )


def run(args) -> int:
    from sae_core.train import train_sae

    out = train_sae(config_from_args(args), args.out, resume=args.resume)
    print(f"saved {out}")
    return 0
