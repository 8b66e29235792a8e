"""Benchmark: what feature families add to precompute, and the UMAP of the feature map.

On the default model (SmolLM2-135M, layer 15) with three TopK SAEs of widths 1,024 / 4,096 /
16,384 (k = 32; random-init unless --saes gives trained folders), over the default-corpus
contexts precompute uses, side by side in one process:

- precompute without links: per batch the forward to layer 15, then for each SAE the sparse
  encode and the streaming statistics (precompute's first pass, one pass for all three SAEs), and
  at the end each SAE's weight-based results (logit effects, decoder neighbours); writes excluded,
  so the ratio below is an upper bound;
- links: per batch ``CoFiring.update`` on the three SAEs' codes, at the end every ordered pair's
  links (exact chunked cosine top 5, Jaccard top 5) written to a fresh SQLite store;
- bytes per link row in SQLite (dbstat: the table and its primary-key index);
- UMAP (umap-learn, cosine) of all 21,504 decoder directions with torch and numba on 2 threads;
  numba's one-off compilation measured apart on a tiny layout first.

Targets: links <= 15% of precompute; UMAP of 21k points <= 60 s on 2 cores. The 1-minute load
average is printed beside every timing (the machine is shared).

    python bench/bench_families.py [--tokens 16384] [--saes A B C]

Measured 2026-11-30 on the shared 2-core machine (1-minute load 18-24 throughout), 16,384 tokens,
random-init SAEs: pass without links 447 s (forward 307, encode + statistics 140) + weights 149 s;
co-firing 25.7 s (5.8% of the pass), links 40.0 s, rows written 7.4 s: links add 12.3% (the link
stage is fixed, so the share falls with more tokens); 299,373 link rows (13.9 per feature), 48.5
bytes per row in SQLite. UMAP of 21,504 points: 46.1 s CPU (284 s wall at load 20.6; UMAP runs
single-threaded when seeded, so on an idle machine wall ~ CPU); numba's compilation 12.3 s CPU.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
import torch

from sae_core.families.build import FamilySae, all_links, link_rows
from sae_core.families.cofiring import CoFiring
from sae_core.families.layout import feature_layout
from sae_core.families.links import unit_directions
from sae_core.inputs.activations import iter_activations
from sae_core.inputs.corpus import build_contexts
from sae_core.inputs.subject import load_subject
from sae_core.precompute.encode import encode_batch
from sae_core.precompute.stats import StreamingStats
from sae_core.precompute.weights import decoder_neighbours, logit_effects
from sae_core.precompute.writer import insert_rows
from sae_core.saes.formats import load_sae
from sae_core.saes.sae import SAE, SAEConfig
from sae_core.store.db import create_engine_for, migrate
from sae_core.store.families import FeatureLinkRow

MODEL, LAYER, CTX_LEN, K = "smollm2-135m", 15, 64, 32
WIDTHS = (1024, 4096, 16384)
BUDGET = 1024 << 20  # precompute's default --memory-budget


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="corpus tokens")
    parser.add_argument("--saes", nargs=3, default=None, help="three trained SAE folders (default: random TopK)")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser.parse_args()


def random_topk_sae(width: int, d_model: int, seed: int) -> SAE:
    """Anthropic/OpenAI init: unit decoder rows, W_enc = W_dec^T."""
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_model, d_sae=width, architecture="topk", k=K, model_name=MODEL, layer=LAYER))
    sae.W_dec.data = torch.nn.functional.normalize(torch.randn(width, d_model), dim=1)
    sae.W_enc.data = sae.W_dec.data.T.clone()
    return sae


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.loads: dict[str, list[float]] = {}

    def add(self, name: str, start: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.loads.setdefault(name, []).append(os.getloadavg()[0])

    def load(self, name: str) -> str:
        loads = self.loads[name]
        return f"load {sum(loads) / len(loads):.1f}"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    subject = load_subject(MODEL)
    saes = [load_sae(p) for p in args.saes] if args.saes else [random_topk_sae(w, subject.d_model, i) for i, w in enumerate(WIDTHS)]
    contexts = build_contexts("default", subject.tokenizer, ctx_len=CTX_LEN, seed=0, max_contexts=args.tokens // CTX_LEN)
    stats = [StreamingStats(s.d_sae, subject.vocab_size, top_k=20, per_bin=5, max_active=64, seed=0, memory_budget=BUDGET) for s in saes]
    cofiring = CoFiring([s.d_sae for s in saes], max_active=64, memory_budget=BUDGET)
    dense = sum(c.dense is not None for c in cofiring.pairs.values())
    print(f"{len(contexts)} contexts, SAEs {[s.d_sae for s in saes]}, {dense}/{len(cofiring.pairs)} co-firing tables dense")
    clock = Clock()
    batches = iter_activations(subject, LAYER, contexts, batch_size=args.batch_size, progress=False)
    with torch.no_grad():
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            clock.add("forward", start)
            start = time.perf_counter()
            encoded = [encode_batch(sae, batch, BUDGET).acts for sae in saes]
            for stat, acts in zip(stats, encoded, strict=True):
                stat.update(acts)
            clock.add("encode + statistics", start)
            start = time.perf_counter()
            cofiring.update(encoded, encoded[0].token_ids.numel())
            clock.add("co-firing", start)
        start = time.perf_counter()
        for sae in saes:
            W_dec = sae.W_dec.detach().float()
            logit_effects(W_dec, subject.final_norm_scale().float(), subject.unembed.detach().float(), n=10, bins=32)
            decoder_neighbours(W_dec, n=10, memory_budget=BUDGET)
        clock.add("weights (logits, neighbours)", start)

        with tempfile.TemporaryDirectory() as tmp:
            engine = create_engine_for(f"sqlite:///{Path(tmp) / 'links.db'}")
            migrate(engine)
            start = time.perf_counter()
            found = list(all_links([FamilySae(i, s.W_dec.detach()) for i, s in enumerate(saes)], cofiring, memory_budget=BUDGET))
            clock.add("links (cosine + jaccard top 5)", start)
            start = time.perf_counter()
            with engine.begin() as conn:  # the SAE ids need no rows here: foreign keys are off for this write
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                n_rows = insert_rows(conn, FeatureLinkRow, (r for a, b, f in found for r in link_rows(a, b, f)))
            clock.add("link rows written", start)
            with engine.connect() as conn:
                size = conn.scalar(
                    sa.text("select sum(pgsize) from dbstat where name in ('feature_links', 'sqlite_autoindex_feature_links_1')")
                )
            engine.dispose()

    for name, seconds in clock.seconds.items():
        print(f"  {name:32s} {seconds:8.2f} s  ({clock.load(name)})")
    precompute = sum(clock.seconds[k] for k in ("forward", "encode + statistics", "weights (logits, neighbours)"))
    links = sum(clock.seconds[k] for k in ("co-firing", "links (cosine + jaccard top 5)", "link rows written"))
    print(f"precompute without links {precompute:.1f} s; links add {links:.1f} s = {100 * links / precompute:.1f}% (target <= 15%)")
    print(f"{n_rows} link rows ({n_rows / sum(s.d_sae for s in saes):.1f} per feature), {size / n_rows:.1f} bytes per row in SQLite")

    units = [unit_directions(s.W_dec) for s in saes]
    start, cpu = time.perf_counter(), cpu_seconds()
    feature_layout([u[:8] for u in units])
    print(f"UMAP compile (numba, once per process): {time.perf_counter() - start:.1f} s wall, {cpu_seconds() - cpu:.1f} s CPU ({load()})")
    start, cpu = time.perf_counter(), cpu_seconds()
    feature_layout(units)
    n = sum(u.shape[0] for u in units)
    print(f"UMAP of {n} points: {time.perf_counter() - start:.1f} s wall, {cpu_seconds() - cpu:.1f} s CPU ({load()}); target <= 60 s")


if __name__ == "__main__":
    main()
