"""`saescope graph --db URL --release NAME --prompt TEXT --out g.json`: an attribution graph of a
prompt over a release's SAEs, as Neuronpedia/circuit-tracer JSON (also saved in the store)."""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "attribution graph of a prompt over a release's SAEs, written as Neuronpedia/circuit-tracer JSON"


def add_arguments(parser):
    from sae_core.live.graph_settings import GraphLimits, Pruning

    parser.add_argument("--db", required=True, help="the store's URL, e.g. sqlite:///saescope.db")
    parser.add_argument(
        "--release", required=True, help="a release of the store: SAEs on several layers"
    )
    parser.add_argument("--prompt", required=True, help="the text to explain (BOS is prepended)")
    parser.add_argument(
        "--target",
        default=None,
        help="explain this next token (exactly one token, e.g. ' Paris'); default: the top prediction",
    )
    parser.add_argument(
        "--contrast", default=None, help="explain logit(target) - logit(this token)"
    )
    parser.add_argument("--out", required=True, type=Path, help="where to write the graph JSON")
    parser.add_argument(
        "--node-share",
        type=float,
        default=Pruning.node_share,
        help="share of influence the kept nodes carry (default: %(default)s)",
    )
    parser.add_argument(
        "--edge-share",
        type=float,
        default=Pruning.edge_share,
        help="share of edge influence the kept edges carry (default: %(default)s)",
    )
    parser.add_argument(
        "--max-features",
        type=int,
        default=GraphLimits.max_features,
        help="feature nodes before pruning (default: %(default)s)",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=64,
        help="longest prompt accepted, BOS included (default: %(default)s)",
    )
    parser.add_argument(
        "--model", default=None, help="load this subject model instead of the one the store names"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")


def run(args) -> int:
    from sqlalchemy.orm import sessionmaker

    from sae_core.live.graph_run import GraphRequest, load_from_disk, run_request
    from sae_core.live.graph_settings import GraphError, GraphLimits, Pruning
    from sae_core.store.db import create_engine_for, migrate

    for name in ("node_share", "edge_share"):
        if not 0 < getattr(args, name) <= 1:
            raise GraphError(f"--{name.replace('_', '-')} must be in (0, 1]")
    if args.max_features < 1 or args.max_prompt_tokens < 2:
        raise GraphError("--max-features must be at least 1 and --max-prompt-tokens at least 2")
    request = GraphRequest(
        release=args.release,
        prompt=args.prompt,
        target=args.target,
        contrast=args.contrast,
        pruning=Pruning(args.node_share, args.edge_share),
        limits=GraphLimits(max_features=args.max_features),
        max_prompt_tokens=args.max_prompt_tokens,
    )
    engine = create_engine_for(args.db)
    try:
        migrate(engine)
        row = run_request(
            sessionmaker(engine, expire_on_commit=False),
            request,
            load=lambda model, layers: load_from_disk(model, layers, device=args.device),
            model_override=args.model,
            progress=lambda stage, done, total: print(
                f"saescope: {stage} {done}/{total}", file=sys.stderr
            ),
        )
    finally:
        engine.dispose()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text(row.document, encoding="utf-8")
    partial.replace(args.out)
    print(f"wrote {args.out} (graph {row.slug})")
    return 0
