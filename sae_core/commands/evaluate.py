"""`saescope evaluate SAE_DIR`: an SAE's report card, its metrics on the held-out contexts of its
training corpus and on a second corpus, side by side.

The held-out contexts are the ones training recorded in cfg.json; an SAE that records none
(SAELens, sparsify, Gemma Scope) is measured on the last contexts of ``--corpus``. The card is
written to metrics.json next to an SAE saescope trained, to ``--out`` when given, and otherwise
only printed: evaluate never writes into a folder another tool made.
"""

from __future__ import annotations

import math

from sae_core.cli import add_corpus_args, add_model_args

HELP = "the report card of any SAE: ΔCE, KL, CE recovered, EV, L0 on held-out and second-corpus tokens"


def add_arguments(parser):
    parser.add_argument("sae", metavar="SAE_DIR", help="an SAE folder (saescope/SAELens/sparsify) or a Gemma Scope params.npz")
    add_model_args(parser, default_layer=None)
    add_corpus_args(parser)
    parser.add_argument(
        "--tokens",
        type=int,
        default=16384,
        help="tokens per column, at most: held-out contexts training recorded (or, for an SAE that "
        "records none, the last contexts of --corpus), and as many of the second corpus (default: %(default)s)",
    )
    parser.add_argument(
        "--eval-corpus",
        help="the second corpus, any --corpus spec (default: 'stdlib-docs', the stdlib's documentation "
        "prose; 'default' for an SAE trained on it)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass (default: %(default)s)")
    parser.add_argument("--out", help="write the report card to this JSON file (default: metrics.json in a saescope SAE's folder)")
    parser.add_argument("--no-save", action="store_true", help="print only; write no file")


def run(args) -> int:
    from pathlib import Path

    from sae_core.inputs.subject import DEFAULT_MODEL, load_subject
    from sae_core.saes.formats import load_sae
    from sae_core.saes.metrics import metric_lines, save_metrics
    from sae_core.saes.report_card import (
        held_out_contexts,
        other_contexts,
        other_corpus_for,
        report_card,
    )
    from sae_core.saes.sae import SAEError

    if args.tokens <= 0:
        raise SAEError(f"--tokens must be positive, got {args.tokens}")
    if args.out and not Path(args.out).parent.is_dir():
        raise SAEError(f"--out {args.out}: no such folder {Path(args.out).parent}")
    probe = load_sae(args.sae)
    model = args.model or probe.cfg.model_name or DEFAULT_MODEL
    layer = args.layer if args.layer is not None else probe.cfg.layer
    if layer is None:
        raise SAEError(f"{args.sae}: the SAE does not say which layer it reads; pass --layer")
    subject = load_subject(model, device=args.device or "cpu")
    sae = load_sae(args.sae, d_in=subject.d_model)
    fallback = {"spec": args.corpus, "text_field": args.text_field, "ctx_len": args.ctx_len, "seed": args.seed}
    held_out = held_out_contexts(
        sae, subject.tokenizer, max_contexts=math.ceil(args.tokens / args.ctx_len), fallback=fallback
    )
    other = other_contexts(
        args.eval_corpus or other_corpus_for(held_out.contexts.spec),
        subject.tokenizer,
        like=held_out.contexts,
        text_field=args.text_field,
        training_spec=held_out.contexts.spec,
    )
    card = report_card(subject, sae, layer, held_out, other, batch_size=args.batch_size)
    for line in metric_lines(card):
        print(line)
    if args.no_save:
        return 0
    ours = bool(sae.cfg.saescope.get("format_version")) and Path(args.sae).is_dir()
    if args.out:
        print(f"wrote {save_metrics(Path(args.out), card)}")
    elif ours:
        print(f"wrote {save_metrics(Path(args.sae), card)}")
    else:
        print(f"saescope: {args.sae} was not written by saescope; nothing saved there (pass --out FILE to keep the card)")
    return 0
