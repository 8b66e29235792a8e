"""`saescope evaluate SAE_DIR`: recompute an SAE's metrics on held-out contexts of a corpus."""

from __future__ import annotations

import math

from sae_core.cli import add_corpus_args, add_model_args

HELP = "recompute L0, explained variance, CE loss recovered, KL, dead/dense fractions for any SAE"


def add_arguments(parser):
    parser.add_argument("sae", metavar="SAE_DIR", help="an SAE folder (saescope/SAELens/sparsify) or a Gemma Scope params.npz")
    add_model_args(parser, default_layer=None)
    add_corpus_args(parser)
    parser.add_argument(
        "--tokens",
        type=int,
        default=16384,
        help="held-out tokens to evaluate on: the corpus' last contexts, which training never reads (default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass (default: %(default)s)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write metrics.json into SAE_DIR")


def run(args) -> int:
    from pathlib import Path

    from sae_core.inputs.corpus import build_contexts
    from sae_core.inputs.subject import DEFAULT_MODEL, load_subject
    from sae_core.saes.metrics import evaluate, save_metrics
    from sae_core.saes.sae import SAEError, load_sae
    from sae_core.saes.train import held_out_split

    probe = load_sae(args.sae)
    model = args.model or probe.cfg.model_name or DEFAULT_MODEL
    layer = args.layer if args.layer is not None else probe.cfg.layer
    if layer is None:
        raise SAEError(f"{args.sae}: the SAE does not say which layer it reads; pass --layer")
    subject = load_subject(model, device=args.device or "cpu")
    sae = load_sae(args.sae, d_in=subject.d_model)
    contexts = build_contexts(args.corpus, subject.tokenizer, text_field=args.text_field, ctx_len=args.ctx_len, seed=args.seed)
    n_eval = math.ceil(args.tokens / args.ctx_len)
    held_out = held_out_split(contexts, n_eval).held_out
    metrics = evaluate(subject, sae, layer, held_out.tokens, held_out.special_mask, batch_size=args.batch_size)
    for line in metrics.lines():
        print(line)
    folder = Path(args.sae)
    if not args.no_save and folder.is_dir():
        save_metrics(folder, metrics)
        print(f"wrote {folder / 'metrics.json'}")
    return 0
