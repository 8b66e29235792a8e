"""`saescope families`: cross-SAE links and the feature map for a release precomputed without them."""

from __future__ import annotations

HELP = "link the features of a release's SAEs on each layer (decoder cosine, co-firing) and map them (UMAP)"


def add_arguments(parser):
    parser.add_argument("--release", required=True, help="release name (see /api/v1/releases)")
    parser.add_argument("--db", default=None, help="SQLAlchemy URL of the store (default: $SAESCOPE_DB_URL or sqlite:///saescope.db)")
    parser.add_argument("--memory-budget", type=int, default=1024, help="MiB for co-firing tables and cosine chunks")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def run(args) -> int:
    from sae_core.families.run import FamiliesConfig, FamiliesError, run_families
    from sae_core.store.db import default_db_url

    if args.memory_budget < 1:
        raise FamiliesError(f"--memory-budget must be at least 1, not {args.memory_budget}")
    run_families(
        FamiliesConfig(db_url=args.db or default_db_url(), release=args.release, memory_budget_mb=args.memory_budget, device=args.device)
    )
    return 0
