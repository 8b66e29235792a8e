"""Benchmark: precompute throughput against the bare forward pass, memory, store size, write time.

On the default model (SmolLM2-135M, layer 15) with a TopK SAE of width 8192, k = 32 (a trained one
from runs/ when given with --sae, else random-init), over the same default-corpus contexts:

- bare forward: ``iter_activations`` (forward to layer 15 only) over the contexts, nothing else,
  once before and once after the precompute (the mean, since other load on the machine drifts);
- precompute: ``run_precompute`` end to end into a fresh SQLite store (first pass, results,
  second pass, writes), with the time of each phase;
- peak resident memory of the process (includes the model);
- bytes per feature in the store (SQLite's dbstat, every table except the shared vocabulary);
- the same rows bulk-written to a fresh SQLite file and to PostgreSQL (own schema, dropped after).

Targets: precompute >= 0.8x the bare forward's tokens/s; <= 16 KB per feature.

    python bench/bench_precompute.py [--tokens 16384] [--sae runs/...]
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa
import torch

import sae_core.precompute.run as precompute
from sae_core.inputs.activations import iter_activations
from sae_core.inputs.corpus import build_contexts
from sae_core.inputs.subject import load_subject
from sae_core.precompute.config import PrecomputeConfig
from sae_core.precompute.job import run_precompute
from sae_core.precompute.writer import insert_rows
from sae_core.saes.sae import SAE, SAEConfig
from sae_core.store.db import (
    ContextRow,
    ExampleRow,
    FeatureRow,
    TokenFeatureRow,
    create_engine_for,
    migrate,
)

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MODEL, LAYER, CTX_LEN = "smollm2-135m", 15, 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="corpus tokens for both runs")
    parser.add_argument("--sae", default=None, help="a trained SAE folder (default: random TopK 8192, k=32)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pg", default=PG_URL, help="PostgreSQL URL for the write comparison ('' to skip)")
    return parser.parse_args()


def random_topk_sae(folder: Path, d_model: int) -> Path:
    """Anthropic/OpenAI init: unit decoder rows, W_enc = W_dec^T."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=d_model, d_sae=8192, architecture="topk", k=32, model_name=MODEL, layer=LAYER))
    sae.W_dec.data = torch.nn.functional.normalize(torch.randn(8192, d_model), dim=1)
    sae.W_enc.data = sae.W_dec.data.T.clone()
    return sae.save(folder)


class PhaseTimer:
    """Wraps module functions to add up their wall time."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def wrap(self, module, name: str):
        original = getattr(module, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        setattr(module, name, timed)
        try:
            yield
        finally:
            setattr(module, name, original)


def bare_forward(subject, contexts, batch_size: int) -> float:
    start = time.perf_counter()
    for _ in iter_activations(subject, LAYER, contexts, batch_size=batch_size, progress=False):
        pass
    return time.perf_counter() - start


def bytes_per_table(db_path: Path) -> dict[str, int]:
    engine = sa.create_engine(f"sqlite:///{db_path}")
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("select name, sum(pgsize) from dbstat group by name").all()
    engine.dispose()
    return dict(rows)


def read_rows(db_url: str) -> dict:
    engine = create_engine_for(db_url)
    with engine.connect() as conn:
        rows = {t: [dict(r) for r in conn.execute(sa.select(t.__table__)).mappings()] for t in (FeatureRow, ExampleRow, ContextRow, TokenFeatureRow)}
    engine.dispose()
    return rows


def timed_write(db_url: str, rows: dict) -> float:
    """Write the precomputed rows into a fresh store in one transaction, like publish() does."""
    engine = create_engine_for(db_url)
    migrate(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "insert into subject_models (id, name, source, architecture, d_model, n_layers, vocab_size, created_at) "
            "values (1, 'm', 's', 'a', 1, 1, 1, CURRENT_TIMESTAMP)"
        )
        conn.exec_driver_sql(
            "insert into saes (id, name, model_id, layer, hook_name, architecture, d_in, d_sae, path, train_cfg, metrics, "
            "corpus, precompute_cfg, n_tokens, density_hist, status, created_at) values "
            "(1, 's', 1, 0, 'h', 'topk', 1, 1, 'p', '{}', '{}', '{}', '{}', 0, '{}', 'running', CURRENT_TIMESTAMP)"
        )
    start = time.perf_counter()
    with engine.begin() as conn:
        for table, table_rows in rows.items():
            insert_rows(conn, table, ({**r, "sae_id": 1} for r in table_rows))
    seconds = time.perf_counter() - start
    engine.dispose()
    return seconds


def main() -> None:
    args = parse_args()
    subject = load_subject(MODEL)
    n_contexts = args.tokens // CTX_LEN
    contexts = build_contexts("default", subject.tokenizer, ctx_len=CTX_LEN, max_contexts=n_contexts)
    n_tokens = contexts.n_tokens
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sae_path = Path(args.sae) if args.sae else random_topk_sae(tmp / "sae", subject.d_model)
        for _ in iter_activations(subject, LAYER, contexts, batch_size=args.batch_size, stop=args.batch_size, progress=False):
            pass  # warm-up: first-call allocations count against neither side
        bare_before = bare_forward(subject, contexts, args.batch_size)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        timer = PhaseTimer()
        db_path = tmp / "store.db"
        cfg = PrecomputeConfig(
            sae_paths=[str(sae_path)], db_url=f"sqlite:///{db_path}", model=MODEL, layer=LAYER, tokens=args.tokens,
            batch_size=args.batch_size, progress=False,
        )
        with (
            timer.wrap(precompute, "first_pass"),
            timer.wrap(precompute, "collect_results"),
            timer.wrap(precompute, "publish"),
        ):
            start = time.perf_counter()
            [result] = run_precompute(cfg)
            total = time.perf_counter() - start
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        bare_after = bare_forward(subject, contexts, args.batch_size)  # the machine's load drifts
        bare = (bare_before + bare_after) / 2
        sizes = bytes_per_table(db_path)
        vocab_bytes = sum(v for k, v in sizes.items() if "vocab" in k)
        store_bytes = sum(sizes.values()) - vocab_bytes
        rows = read_rows(cfg.db_url)
        sqlite_write = timed_write(f"sqlite:///{tmp / 'write.db'}", rows)
        pg_write = write_postgres(args.pg, rows) if args.pg else None

    n_rows = sum(len(r) for r in rows.values())
    print(f"device: CPU, {torch.get_num_threads()} threads; {MODEL} layer {LAYER}; SAE width {result.n_features}")
    print(f"tokens: {n_tokens} (counted {result.n_tokens}) in {len(contexts)} contexts of {CTX_LEN}")
    print(f"bare forward-to-layer : {n_tokens / bare:8.0f} tok/s (mean of {bare_before:.1f} s before and {bare_after:.1f} s after)")
    print(f"precompute end to end : {result.n_tokens / total:8.0f} tok/s ({total:.1f} s)  ratio {bare / total:.2f}x (target >= 0.8x)")
    for phase, seconds in timer.seconds.items():
        print(f"    {phase:16s} {seconds:6.1f} s")
    streaming = timer.seconds["first_pass"]
    print(f"first pass alone      : {result.n_tokens / streaming:8.0f} tok/s  ratio {bare / streaming:.2f}x "
          f"(the rest, {total - streaming:.0f} s, is per SAE and does not grow with the tokens)")
    print(f"peak RSS: {rss_before / 1024:.0f} MiB after the bare forward, {rss_after / 1024:.0f} MiB after precompute")
    print(f"store: {store_bytes / result.n_features / 1024:.1f} KB per feature (target <= 16 KB); vocabulary {vocab_bytes / 1024:.0f} KB once per model")
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:6]:
        print(f"    {name:28s} {size / 1024:8.0f} KB")
    print(f"bulk write of {n_rows} rows: SQLite {sqlite_write:.2f} s" + (f", PostgreSQL {pg_write:.2f} s" if pg_write is not None else ""))


def write_postgres(pg_url: str, rows: dict) -> float:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"create schema {schema}")
    try:
        return timed_write(f"{pg_url}?options=-csearch_path%3D{schema}", rows)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"drop schema {schema} cascade")
        admin.dispose()


if __name__ == "__main__":
    main()
