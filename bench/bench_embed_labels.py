"""Embedding a release's labels for semantic search: before and after, on the same texts, one run.

Before: every label embedded, in store order, in batches of 128 each padded to its longest label
(what ``sync_embeddings`` did until it was changed). After: ``Embedder.embed`` as
``sync_embeddings`` now calls it, over all the release's labels at once (the store copies a
text's vector to every feature it labels, across SAEs, so one call over all texts is what a
release's sync embeds): each distinct text once, batched by token count.

Texts: ``--store PATH`` reads every SAE's latest label of every kind from a store (the demo's);
without it, rule-like labels are drawn as the automatic labeller phrases them, tokens and
contexts Zipf-distributed so that labels repeat.

Prints labels/s (all labels over wall time) and CPU seconds of this process for both, the
1-minute load average around each, and the largest difference between the two methods' vectors
for the same text (the math is the same; only padding and order change the rounding).

    python bench/bench_embed_labels.py [--store /work/demo/saescope.db] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa
import torch
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_core.labels import embeddings  # noqa: E402
from sae_core.labels.lexical import CONTEXTS  # noqa: E402
from sae_core.labels.rules import LabelRule, Term  # noqa: E402
from sae_core.store.db import LabelRow, create_engine_for  # noqa: E402

TOKENS = (
    " the def class return import self if elif else for while in ( ) : , . = == + - * [ ] { } "
    "True False None print len range and or not is as with try except raise yield lambda Paris "
    "London Berlin city country red blue green 0 1 2 3 10 100 first second last year day time "
    "he she it they we you I was were has have had will would can could should"
).split(" ")


def store_labels(path: str) -> list[str]:
    """Every SAE's latest label of every kind, as ``sync_embeddings`` would embed them."""
    engine = create_engine_for(f"sqlite:///{path}", readonly=True)
    latest: dict[tuple[int, int, str], str] = {}
    with Session(engine) as session:
        rows = session.execute(
            sa.select(
                LabelRow.sae_id, LabelRow.feature_idx, LabelRow.source, LabelRow.label
            ).order_by(LabelRow.id)
        )
        for sae_id, idx, source, label in rows:
            latest[(sae_id, idx, embeddings.label_kind(source))] = label
    engine.dispose()
    return list(latest.values())


def synthetic_labels(n: int, rng: np.random.Generator) -> list[str]:
    zipf = 1.0 / np.arange(1, len(TOKENS) + 1)
    contexts = list(CONTEXTS)

    def tokens(k: int) -> tuple[str, ...]:
        return tuple(rng.choice(TOKENS, size=k, replace=False, p=zipf / zipf.sum()))

    labels = []
    for _ in range(n):
        term = Term(
            tokens=tokens(int(rng.integers(1, 4))),
            previous=tokens(1) if rng.random() < 0.2 else (),
            contexts=(contexts[int(rng.integers(len(contexts)))],) if rng.random() < 0.4 else (),
        )
        labels.append(LabelRule.of(term).describe())
    return labels


def embed_every_label_in_order(embedder: embeddings.Embedder, texts: list[str]) -> np.ndarray:
    """The method before: consecutive batches of EMBED_BATCH, each padded to its longest."""
    return np.concatenate(
        [
            embedder._embed_batch(texts[start : start + embeddings.EMBED_BATCH])
            for start in range(0, len(texts), embeddings.EMBED_BATCH)
        ]
    )


def timed(fn, texts: list[str]) -> tuple[np.ndarray, float, float, float]:
    """(vectors, wall s, CPU s, load average at the start)."""
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    vectors = fn(texts)
    return vectors, time.perf_counter() - wall, time.process_time() - cpu, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="a store to read the labels of (default: synthetic labels)")
    parser.add_argument(
        "--labels", type=int, default=4000, help="synthetic labels (without --store)"
    )
    parser.add_argument("--limit", type=int, default=0, help="only the first N labels of the store")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = (
        store_labels(args.store)
        if args.store
        else synthetic_labels(args.labels, np.random.default_rng(0))
    )
    if args.limit:
        texts = texts[: args.limit]
    embedder = embeddings.load_embedder()
    embedder.embed(texts[:8])  # warm up
    before, wall_b, cpu_b, load_b = timed(lambda t: embed_every_label_in_order(embedder, t), texts)
    after, wall_a, cpu_a, load_a = timed(embedder.embed, texts)
    distinct = len(set(texts))
    print(
        f"{len(texts):,} labels ({distinct:,} distinct, {len(texts) / distinct:.1f} per text) from "
        f"{args.store or 'the synthetic generator'}; {args.threads} torch thread(s)"
    )
    print(f"{'':28}{'labels/s':>10}{'wall s':>9}{'CPU s':>9}{'load':>7}")
    for name, wall, cpu, load in (
        ("before (every label, order)", wall_b, cpu_b, load_b),
        ("after (distinct, by length)", wall_a, cpu_a, load_a),
    ):
        print(f"{name:28}{len(texts) / wall:>10.0f}{wall:>9.1f}{cpu:>9.1f}{load:>7.2f}")
    print(f"speed-up: {wall_b / wall_a:.1f}x wall, {cpu_b / cpu_a:.1f}x CPU")
    print(f"largest |before - after| over every vector entry: {np.abs(before - after).max():.2e}")


if __name__ == "__main__":
    main()
