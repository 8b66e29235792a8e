"""Benchmark: three TopK widths trained in one loop against one Matryoshka SAE with those
widths as prefixes, per CPU-minute (issue 14, item 6: which should the demo train on layer 15?).

From the same cached SmolLM2-135M layer-15 activations (the demo's default-budget cache:
163,840 tokens of the default corpus, reused when ``saescope demo`` built it, built otherwise)
and the same token budget, each side in a fresh process:

  (a) TopK 1,024 / 4,096 / 16,384 (k 32), one ``fit_all`` loop;
  (b) one Matryoshka BatchTopK of 16,384 latents, prefixes 1,024 / 4,096 / 16,384 (k 32).

Recorded per side: the CPU-seconds of training (``getrusage``, all threads; steadier than wall
time on a shared machine) and wall seconds. Training reads the cache's first 147,456 tokens;
every width and every nested prefix is then measured on the cache's last 16,384 tokens, which it
never read (EV, L0, share of latents dead on them), with the share that went dead during
training (silent for a tenth of the run). ``--ce`` adds ΔCE on the demo's 64 held-out contexts
(``evaluate_many``: a forward of the subject per SAE and batch, which on a loaded 2-core
machine costs more than the training).

    python bench/bench_matryoshka.py [--tokens 409600] [--ce]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

MODEL, LAYER, K = "smollm2-135m", 15, 32
WIDTHS = (1024, 4096, 16384)
CACHE_TOKENS = 163_840  # the demo's default budget: its layer-15 cache is reused
EVAL_TOKENS = 16_384  # the cache's last tokens, kept out of training for the held-out metrics
EVAL_CONTEXTS = 64  # the demo's held-out split (its cache's key)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=409_600, help="training tokens per side (the demo's default budget)")
    parser.add_argument("--ce", action="store_true", help="also ΔCE on the demo's held-out contexts (a subject forward per SAE and batch)")
    return parser.parse_args()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_side(side: str, tokens: int, with_ce: bool, folder: str) -> dict:
    """Train one side from the layer-15 cache, then measure each width or prefix held out."""
    import torch  # noqa: F401

    from sae_core.inputs.activations import ActivationCache
    from sae_core.inputs.corpus import build_contexts, held_out_split
    from sae_core.inputs.subject import load_subject
    from sae_core.saes.metrics import evaluate_many, reconstruction_stats
    from sae_core.saes.train_config import TrainConfig
    from sae_core.saes.train_loop import FitJob, fit_all

    subject = load_subject(MODEL)
    shared = dict(layer=LAYER, k=K, tokens=tokens, cache_tokens=CACHE_TOKENS - EVAL_TOKENS, eval_contexts=EVAL_CONTEXTS, checkpoint_every=10**6)
    run = TrainConfig(**shared)  # the demo's corpus, window and seed
    contexts = build_contexts(run.corpus, subject.tokenizer, text_field=run.text_field, ctx_len=run.ctx_len, seed=run.seed)
    split = held_out_split(contexts, EVAL_CONTEXTS)
    cache_folder = ActivationCache.default_folder(subject, LAYER, split.train)
    cache = ActivationCache.build_layers(subject, {LAYER: cache_folder}, split.train, max_tokens=CACHE_TOKENS)[LAYER]
    if side == "widths":
        configs = [TrainConfig(width=width, **shared) for width in WIDTHS]
    else:
        configs = [TrainConfig(architecture="matryoshka", width=WIDTHS[-1], prefixes=list(WIDTHS), **shared)]
    jobs = [FitJob(cfg, cache, Path(folder) / f"{side}-{cfg.width}") for cfg in configs]

    print(f"{side}: cache ready, training", flush=True)
    cpu, wall = cpu_seconds(), time.perf_counter()
    results = fit_all(jobs, progress=False)
    train_cpu, train_wall = cpu_seconds() - cpu, time.perf_counter() - wall
    print(f"{side}: trained in {train_wall:.0f} s ({train_cpu:.0f} CPU-s), evaluating", flush=True)

    saes = [result.sae for result in results] if side == "widths" else [results[0].sae.nested(m) for m in WIDTHS]
    train_dead = [result.dead_fraction for result in results] * (1 if side == "widths" else len(WIDTHS))
    held_out = list(cache.token_batches(4096, start=CACHE_TOKENS - EVAL_TOKENS, stop=CACHE_TOKENS))
    stats = [reconstruction_stats(sae, held_out).summary() for sae in saes]
    ce = [None] * len(saes)
    if with_ce:
        measured = evaluate_many(subject, saes, [LAYER] * len(saes), split.held_out.tokens, split.held_out.special_mask, progress=False)
        ce = [m.delta_ce for m in measured]
    return dict(
        side=side,
        cache=str(cache_folder),
        train_cpu_s=train_cpu,
        train_wall_s=train_wall,
        load=os.getloadavg()[0],
        rows=[
            dict(width=sae.d_sae, ev=st["explained_variance"], l0=st["l0"], dead=st["dead_fraction"], train_dead=dead, delta_ce=delta)
            for sae, st, dead, delta in zip(saes, stats, train_dead, ce, strict=True)
        ],
        n_eval_tokens=stats[0]["n_tokens"],
    )


def in_child(*args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_side, args)


def report(side: dict, label: str) -> None:
    print(f"\n{label}: training {side['train_cpu_s']:.0f} CPU-s ({side['train_cpu_s'] / 60:.1f} CPU-min), "
          f"{side['train_wall_s']:.0f} s wall, load {side['load']:.1f} at the end")  # fmt: skip
    print(f"  {'latents':>8}{'EV':>8}{'L0':>8}{'dead':>8}{'dead(train)':>13}{'ΔCE':>8}")
    for row in side["rows"]:
        delta_ce = "-" if row["delta_ce"] is None else f"{row['delta_ce']:.3f}"
        print(f"  {row['width']:>8}{row['ev']:>8.3f}{row['l0']:>8.1f}{row['dead']:>8.3f}{row['train_dead']:>13.3f}{delta_ce:>8}")


def main() -> None:
    args = parse_args()
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {args.tokens:,} training tokens per side, layer {LAYER}, k {K}")
    with tempfile.TemporaryDirectory() as tmp:
        widths = in_child("widths", args.tokens, args.ce, tmp)
        nested = in_child("matryoshka", args.tokens, args.ce, tmp)
    print(f"cache {widths['cache']}; {widths['n_eval_tokens']:,} held-out cached tokens evaluated")
    report(widths, "(a) TopK 1,024 / 4,096 / 16,384 in one loop")
    report(nested, "(b) Matryoshka 16,384, prefixes 1,024 / 4,096 / 16,384")
    ratio = widths["train_cpu_s"] / nested["train_cpu_s"]
    print(f"\nMatryoshka costs {1 / ratio:.2f}x the three widths' CPU time (the three widths {ratio:.2f}x Matryoshka's)")
    for a, b in zip(widths["rows"], nested["rows"], strict=True):
        print(f"  {a['width']:>6} latents: EV {a['ev']:.3f} vs {b['ev']:.3f}, L0 {a['l0']:.1f} vs {b['l0']:.1f}, "
              f"dead {a['dead']:.3f} vs {b['dead']:.3f}  (widths vs Matryoshka)")  # fmt: skip


if __name__ == "__main__":
    main()
