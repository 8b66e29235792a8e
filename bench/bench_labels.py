"""Automatic labelling speed and quality on a synthetic store, planted and random features side by side.

Half of the features fire on a small set of tokens (1-3, with 10% noise firings elsewhere), half
fire at random; the store keeps what precompute keeps (top examples, interval samples per bin,
their contexts). Prints labelling throughput and the held-out F1 of both halves.

    python bench/bench_labels.py [--features 2048] [--contexts 20000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_core.labels.run import LabelOptions, label_sae  # noqa: E402
from sae_core.store.db import FeatureRow, VocabRow, create_engine_for, migrate  # noqa: E402
from tests.label_fixtures import add_bare_sae, add_contexts, add_examples  # noqa: E402

VOCAB = 2000
SEQ = 64
TOP_K, N_BINS, PER_BIN = 20, 4, 5  # what precompute keeps per feature, roughly


def feature_acts(tokens: np.ndarray, planted: bool, rng: np.random.Generator) -> np.ndarray:
    """(n_contexts, SEQ + 1) activations of one feature."""
    if planted:
        fires = np.isin(
            tokens, rng.choice(np.arange(1, VOCAB), size=rng.integers(1, 4), replace=False)
        )
        fires |= rng.random(tokens.shape) < 0.1 * fires.mean()
    else:
        fires = rng.random(tokens.shape) < 0.002
    fires[:, 0] = False  # BOS
    return np.where(fires, rng.uniform(0.5, 5, tokens.shape), 0).astype(np.float32)


def write_store(url: str, n_features: int, n_contexts: int, rng: np.random.Generator) -> None:
    tokens = np.concatenate(
        [np.zeros((n_contexts, 1), int), rng.integers(1, VOCAB, (n_contexts, SEQ))], axis=1
    )
    engine = create_engine_for(url)
    migrate(engine)
    with Session(engine) as session:
        sae = add_bare_sae(
            session,
            "bench",
            n_features,
            vocab_size=VOCAB,
            bos_token_id=0,
            n_tokens=tokens.size,
            status="complete",
        )
        session.execute(
            sa.insert(VocabRow),
            [{"model_id": sae.model_id, "token_id": i, "text": f" w{i}"} for i in range(VOCAB)],
        )
        used: set[int] = set()
        for f in range(n_features):
            acts = feature_acts(tokens, planted=f % 2 == 0, rng=rng)
            session.add(
                FeatureRow(
                    sae_id=sae.id, idx=f, count=int((acts > 0).sum()), max_act=float(acts.max())
                )
            )
            used |= add_examples(
                session, sae.id, f, acts, rng, top_k=TOP_K, n_bins=N_BINS, per_bin=PER_BIN
            )
        add_contexts(session, sae.id, tokens, used)
        session.commit()
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--contexts", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/bench.db"
        write_store(url, args.features, args.contexts, np.random.default_rng(0))
        engine = create_engine_for(url)
        start = time.perf_counter()
        summary = label_sae(engine, "bench", LabelOptions(embed=False, progress=False))
        elapsed = time.perf_counter() - start
        with engine.connect() as conn:
            f1 = dict(conn.execute(sa.select(FeatureRow.idx, FeatureRow.label_f1)).all())
        engine.dispose()
    planted = [v for k, v in f1.items() if k % 2 == 0 and v is not None]
    random = [v for k, v in f1.items() if k % 2 == 1 and v is not None]
    print(
        f"{summary.n_labelled:,} features labelled in {elapsed:.1f} s: {summary.n_labelled / elapsed:,.0f} features/s "
        f"({args.contexts:,} contexts of {SEQ} tokens; {summary.n_unscorable} unscorable)"
    )
    print(
        f"held-out F1, planted token features: mean {np.mean(planted):.3f}, median {np.median(planted):.3f}"
    )
    print(
        f"held-out F1, random features:        mean {np.mean(random):.3f}, median {np.median(random):.3f}"
    )
    print(
        f"planted / random mean F1 ratio:      {np.mean(planted) / max(np.mean(random), 1e-9):.1f}x"
    )


if __name__ == "__main__":
    main()
