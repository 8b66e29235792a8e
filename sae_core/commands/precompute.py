"""`saescope precompute`: run a corpus through the model once and every SAE given (a release),
and store every feature of each."""

from __future__ import annotations

import argparse

from sae_core.cli import add_corpus_args, add_model_args
from sae_core.precompute.config import PrecomputeConfig, PrecomputeError  # torch-free
from sae_core.store.db import check_store_url

HELP = "precompute every feature of one SAE or a release of several (ours, SAELens, sparsify, Gemma Scope) into the store"

DEFAULTS = PrecomputeConfig(sae_paths=[])


def add_arguments(parser):
    parser.add_argument(
        "--sae",
        action="append",
        required=True,
        help="SAE folder or file (ours, SAELens, sparsify, Gemma Scope params.npz), or a folder of several; "
        "repeat for more: all are precomputed in one pass over the corpus",
    )
    parser.add_argument("--db", default=None, help="SQLAlchemy URL of the store (default: $SAESCOPE_DB_URL or sqlite:///saescope.db)")
    add_model_args(parser, default_layer=None)
    add_corpus_args(parser)
    parser.add_argument(
        "--tokens", type=int, default=DEFAULTS.tokens, help=f"tokens to run over (default {DEFAULTS.tokens}; 0 = the whole corpus)"
    )
    parser.add_argument("--top-k", type=int, default=DEFAULTS.top_k, help="top examples per feature")
    parser.add_argument("--bins", type=int, default=DEFAULTS.bins, help="activation intervals per feature")
    parser.add_argument("--per-bin", type=int, default=DEFAULTS.per_bin, help="random examples per interval")
    parser.add_argument(
        "--name",
        default=None,
        help="URL id of the SAE in the store, with one SAE (default <model>-l<layer>-<arch>-<width>; "
        "a Matryoshka SAE's prefixes are NAME-p<width>)",
    )
    parser.add_argument(
        "--release",
        default=None,
        help="URL id of the set of SAEs in the store (default: the SAE's name for one, else <model>-l<layers>-w<widths>)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace complete SAEs of the same names; take a release name that holds other SAEs"
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="contexts per forward pass")
    parser.add_argument(
        "--memory-budget", type=int, default=DEFAULTS.memory_budget_mb, help="MiB for feature chunks (encoding, neighbours)"
    )
    parser.add_argument(
        "--label",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="label every alive feature at the end, as `saescope label` does (default: on)",
    )
    parser.add_argument(
        "--embed",
        action="store_true",
        help="also write the labels' semantic-search vectors now (default: `saescope serve` writes "
        "them in the background; on 2 cores they take longer than the labels themselves)",
    )
    parser.add_argument(
        "--families",
        action=argparse.BooleanOptionalAction,
        default=DEFAULTS.families,
        help="link the features of SAEs on one layer across them and map them with UMAP (default: on)",
    )
    parser.add_argument(
        "--nested",
        action=argparse.BooleanOptionalAction,
        default=DEFAULTS.nested,
        help="store a Matryoshka SAE as its nested SAEs, one per prefix (<name>-p<width>, the full dictionary as <name>), "
        "linked as a family; --no-nested stores the full dictionary only (default: on)",
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=DEFAULTS.checkpoint_every, help="batches between resumable checkpoints"
    )
    parser.add_argument(
        "--reuse-activations",
        action="store_true",
        help="read the residual stream from the activation cache `saescope train` built on the same corpus, where it covers "
        "the tokens, instead of running the model (much faster; fp16 activations, as training read them)",
    )


def run(args) -> int:
    positive = {
        "--top-k": args.top_k,
        "--bins": args.bins,
        "--per-bin": args.per_bin,
        "--batch-size": args.batch_size,
        "--memory-budget": args.memory_budget,
        "--checkpoint-every": args.checkpoint_every,
        "--ctx-len": args.ctx_len,
    }
    for flag, value in positive.items():
        if value < 1:
            raise PrecomputeError(f"{flag} must be at least 1, not {value}")
    if args.tokens < 0:
        raise PrecomputeError(f"--tokens must be 0 (the whole corpus) or more, not {args.tokens}")
    cfg = PrecomputeConfig(
        sae_paths=args.sae,
        model=args.model,
        layer=args.layer,
        device=args.device,
        corpus=args.corpus,
        text_field=args.text_field,
        ctx_len=args.ctx_len,
        seed=args.seed,
        tokens=args.tokens or None,
        top_k=args.top_k,
        bins=args.bins,
        per_bin=args.per_bin,
        name=args.name,
        release=args.release,
        force=args.force,
        batch_size=args.batch_size,
        memory_budget_mb=args.memory_budget,
        checkpoint_every=args.checkpoint_every,
        families=args.families,
        nested=args.nested,
        reuse_activations=args.reuse_activations,
    )
    if args.db:
        cfg.db_url = args.db
    check_store_url(cfg.db_url, create=True)
    from sae_core.inputs import distributed
    from sae_core.precompute.job import run_precompute

    results = run_precompute(cfg)
    if args.label and distributed.launched_world().is_main:  # rank 0 of a torchrun job, or a lone process
        from sae_core.labels.run import LabelOptions, label_sae
        from sae_core.store.db import create_engine_for

        engine = create_engine_for(cfg.db_url)
        try:
            for result in results:
                summary = label_sae(engine, result.name, LabelOptions(embed=args.embed))
                print(f"saescope: labelled {summary.n_labelled} features of {result.name}")
        finally:
            engine.dispose()
        from sae_core.labels.embeddings import embedder_available

        if not args.embed and embedder_available():  # without the model no command writes them
            print("saescope: `saescope serve` writes the labels' semantic-search vectors in the background")
    return 0
