"""Label search over 100k features: semantic (brute-force matmul) beside full text, one run.

Writes a SQLite store with N features, each with a label and a unit vector (random vectors:
embedding 100k labels would only time the embedding model, measured separately below), then
times, side by side: loading the vectors, one semantic query (embed + matmul + top-k + rows),
the matmul alone, and one full-text query through FTS5.

    python bench/bench_label_search.py [--features 100000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa
import torch
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_core.labels import embeddings  # noqa: E402
from sae_core.labels.search import search_labels  # noqa: E402
from sae_core.store.db import (  # noqa: E402
    FeatureEmbeddingRow,
    FeatureRow,
    create_engine_for,
    migrate,
    utcnow,
)
from tests.label_fixtures import add_bare_sae  # noqa: E402

WORDS = [
    " Paris",
    " Lyon",
    " def",
    " class",
    " return",
    " red",
    " blue",
    " import",
    " self",
    " 0",
    " 1",
    "(",
    ")",
    " the",
    " of",
]


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def write_store(url: str, n: int, rng: np.random.Generator) -> int:
    engine = create_engine_for(url)
    migrate(engine)
    with Session(engine) as session:
        sae_id = add_bare_sae(session, "bench", n).id
        session.commit()
    labels = [
        " / ".join(f'"{w}"' for w in rng.choice(WORDS, size=2, replace=False)) for _ in range(n)
    ]
    vectors = rng.standard_normal((n, embeddings.EMBED_DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            sa.insert(FeatureRow),
            [
                {
                    "sae_id": sae_id,
                    "idx": i,
                    "count": 1,
                    "label": labels[i],
                    "label_source": "auto",
                    "label_f1": float(rng.random()),
                }
                for i in range(n)
            ],
        )
        conn.execute(
            sa.insert(FeatureEmbeddingRow),
            [
                {
                    "sae_id": sae_id,
                    "feature_idx": i,
                    "kind": "auto",
                    "text": labels[i],
                    "model": embeddings.EMBED_MODEL,
                    "vector": embeddings.pack_vector(vectors[i]),
                    "updated_at": now,
                }
                for i in range(n)
            ],
        )
    engine.dispose()
    return sae_id


def main() -> None:
    # One thread: on a shared, oversubscribed CPU, torch's second thread spins and makes a one-line
    # query embedding ~30x slower (1.4 s instead of 40 ms); the single-thread timing is the stable one.
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=100_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/bench.db"
        sae_id = write_store(url, args.features, rng)
        engine = create_engine_for(url, readonly=True)
        embedder = embeddings.load_embedder()
        labels_1k = [f'"{a}" / "{b}"' for a, b in rng.choice(WORDS, size=(1000, 2))]
        embed_1k = best_of(lambda: embedder.embed(labels_1k), repeats=1)
        with Session(engine) as session:
            load = best_of(lambda: embeddings.EmbeddingMatrix.load(session, sae_id), repeats=3)
            matrix = embeddings.embedding_matrix(session, sae_id)
            query = embedder.embed(["French cities"])[0]
            matmul = best_of(lambda: matrix.nearest(query, 20))
            semantic = best_of(
                lambda: search_labels(
                    session, sae_id=sae_id, query="French cities", mode="semantic"
                )
            )
            text = best_of(
                lambda: search_labels(session, sae_id=sae_id, query="Paris", mode="text")
            )
            text_by_f1 = best_of(
                lambda: search_labels(session, sae_id=sae_id, query="Paris", mode="text", sort="f1")
            )
        engine.dispose()
    n = args.features
    print(
        f"{n:,} features x {embeddings.EMBED_DIM}-d float32 vectors ({n * embeddings.EMBED_DIM * 4 / 2**20:.0f} MiB), SQLite, best of 5"
    )
    print(f"load vectors from the store (once per process, cached): {load * 1e3:8.1f} ms")
    print(f"semantic query, matmul + top-20 only:                   {matmul * 1e3:8.1f} ms")
    print(f"semantic query, end to end (embed query + rows):        {semantic * 1e3:8.1f} ms")
    print(f"full-text query (FTS5), top 20 by relevance:            {text * 1e3:8.1f} ms")
    print(f"full-text query (FTS5), matches sorted by F1:           {text_by_f1 * 1e3:8.1f} ms")
    print(f"semantic / full-text time ratio:                        {semantic / text:8.2f}x")
    print(
        f"embedding labels: {1000 / embed_1k:,.0f} labels/s -> {n * embed_1k / 1000:.0f} s to embed {n:,} labels once"
    )


if __name__ == "__main__":
    main()
