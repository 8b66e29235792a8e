"""Automatic labelling speed and quality on a synthetic store, planted and random features side by side.

Half of the features fire on a small set of tokens (1-3, with 10% noise firings elsewhere), half
fire at random; the store keeps what precompute keeps (top examples, interval samples per bin,
their contexts). Prints labelling throughput and the held-out F1 of both halves.

    python bench/bench_labels.py [--features 2048] [--contexts 20000]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sae_core.labels import LabelOptions, label_sae
from sae_core.store import (
    ContextRow,
    ExampleRow,
    FeatureRow,
    SaeRow,
    SubjectModelRow,
    VocabRow,
    create_engine_for,
    migrate,
    pack_acts,
    pack_tokens,
)

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


def examples_for(acts: np.ndarray, rng: np.random.Generator) -> list[tuple[str, int, int, int]]:
    m = acts.max(axis=1)
    firing = np.flatnonzero(m > 0)
    chosen = [("top", 0, r, int(c)) for r, c in enumerate(firing[np.argsort(-m[firing])][:TOP_K])]
    if firing.size:
        bins = np.minimum((m[firing] / m.max() * N_BINS).astype(int), N_BINS - 1)
        for b in range(N_BINS):
            for r, c in enumerate(rng.permutation(firing[bins == b])[:PER_BIN]):
                chosen.append(("interval", b, r, int(c)))
    return chosen


def write_store(url: str, n_features: int, n_contexts: int, rng: np.random.Generator) -> None:
    tokens = np.concatenate(
        [np.zeros((n_contexts, 1), int), rng.integers(1, VOCAB, (n_contexts, SEQ))], axis=1
    )
    engine = create_engine_for(url)
    migrate(engine)
    with Session(engine) as session:
        model = SubjectModelRow(
            name="bench",
            source="bench",
            architecture="llama",
            d_model=8,
            n_layers=1,
            vocab_size=VOCAB,
            bos_token_id=0,
        )
        session.add(model)
        session.flush()
        session.execute(
            sa.insert(VocabRow),
            [{"model_id": model.id, "token_id": i, "text": f" w{i}"} for i in range(VOCAB)],
        )
        sae = SaeRow(
            name="bench",
            model_id=model.id,
            layer=0,
            hook_name="h",
            architecture="topk",
            d_in=8,
            d_sae=n_features,
            path="p",
            n_tokens=tokens.size,
            status="complete",
        )
        session.add(sae)
        session.flush()
        used: set[int] = set()
        for f in range(n_features):
            acts = feature_acts(tokens, planted=f % 2 == 0, rng=rng)
            session.add(
                FeatureRow(
                    sae_id=sae.id, idx=f, count=int((acts > 0).sum()), max_act=float(acts.max())
                )
            )
            rows = []
            for kind, b, rank, c in examples_for(acts, rng):
                blob, max_act, max_pos = pack_acts(acts[c])
                rows.append(
                    {
                        "sae_id": sae.id,
                        "feature_idx": f,
                        "kind": kind,
                        "bin": b,
                        "rank": rank,
                        "context_id": c,
                        "max_act": max_act,
                        "max_pos": max_pos,
                        "acts": blob,
                    }
                )
                used.add(c)
            session.execute(sa.insert(ExampleRow), rows)
        session.execute(
            sa.insert(ContextRow),
            [
                {"sae_id": sae.id, "id": c, "token_ids": pack_tokens(tokens[c])}
                for c in sorted(used)
            ],
        )
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
