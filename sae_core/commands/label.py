"""`saescope label`: automatic labels (and optional LLM explanations) for every alive feature,
each scored on held-out tokens, plus embeddings for semantic search."""

from __future__ import annotations

import argparse

from sqlalchemy.orm import Session

from sae_core.labels.explainer import ExplainerConfig
from sae_core.labels.history import get_sae
from sae_core.labels.report import label_report
from sae_core.store.db import check_store_url, create_engine_for, default_db_url, migrate

HELP = "label every alive feature of SAEs in the store and score each label"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db", default=None, help="store URL (default: SAESCOPE_DB_URL or sqlite:///saescope.db)"
    )
    parser.add_argument(
        "--sae",
        required=True,
        action="append",
        help="name of an SAE in the store (as in /saes/NAME); repeat it to label several in one "
        "process, such as a release's SAEs, whose shared windows are then lexed once",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed that picks held-out negatives")
    parser.add_argument(
        "--force", action="store_true", help="relabel features that already have labels"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="print the held-out F1 distribution of each SAE's current labels and stop (labels nothing)",
    )
    parser.add_argument(
        "--explainer-url",
        default=None,
        help="OpenAI-compatible API base URL, e.g. http://127.0.0.1:8080/v1 (default: SAESCOPE_EXPLAINER_URL; none: no explainer)",
    )
    parser.add_argument(
        "--explainer-model",
        default=None,
        help="model name for the explainer (default: SAESCOPE_EXPLAINER_MODEL)",
    )
    parser.add_argument(
        "--explainer-key-env",
        default=None,
        help="environment variable holding the explainer's API key (default: SAESCOPE_EXPLAINER_KEY)",
    )
    parser.add_argument(
        "--embed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="embed labels for semantic search (default: when the embed extra is installed)",
    )
    parser.add_argument(
        "--embed-only",
        action="store_true",
        help="write the semantic-search vectors the current labels lack and stop (labels nothing; "
        "what `saescope serve` runs in the background)",
    )


def _print_report(engine, sae_name: str) -> None:
    with Session(engine) as session:
        sae = get_sae(session, sae_name)
        print(f"labels of {sae.name}:")
        print("\n".join(label_report(session, sae, by_evidence=True).lines()))


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: every command's parser is built on each call of the CLI, and
    # the labeller brings numba (~55 MB resident), which `saescope precompute --no-label` or
    # `saescope serve` would otherwise hold for nothing.
    from sae_core.labels.run import LabelOptions, embed_labels, label_sae

    url = args.db or default_db_url()
    check_store_url(url, create=False)  # labels go into a store precompute wrote
    engine = create_engine_for(url)
    migrate(engine)
    names = list(dict.fromkeys(args.sae))
    with Session(engine) as session:  # every name known before any work
        for name in names:
            get_sae(session, name)
    if args.report:
        for name in names:
            _print_report(engine, name)
        return 0
    if args.embed_only:
        for name in names:
            print(f"{name}: {embed_labels(engine, name)} label vectors written")
        return 0
    explainer = ExplainerConfig.from_env(
        url=args.explainer_url, model=args.explainer_model, key_env=args.explainer_key_env
    )
    options = LabelOptions(seed=args.seed, force=args.force, explainer=explainer, embed=args.embed)
    for name in names:
        summary = label_sae(engine, name, options)
        mean_f1 = f"{summary.mean_f1:.3f}" if summary.mean_f1 is not None else "n/a"
        print(
            f"{name}: labelled {summary.n_labelled} features (mean held-out F1 {mean_f1}); "
            f"{summary.n_unscorable} had too few examples to score; "
            f"{summary.n_explained} explained; {summary.n_embedded} labels embedded"
        )
        _print_report(engine, name)
    return 0
