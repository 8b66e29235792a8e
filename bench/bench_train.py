"""Training throughput of every architecture, saescope only, one after another in one process.

Each variant is ``saescope_variants.py``'s (the peer-harness plugin, so both benches time the
same thing): ``train_loop.train_step`` on batches of the same data, after one warm-up step.
Printed per variant: tokens/s (wall), tokens per CPU-second (steadier on a shared machine),
cores kept busy, the 1-minute load average, and each variant's ratio to TopK.

    python bench/bench_train.py [--width 8192 --k 32 --batch 4096 --d 576 --steps 5 --only topk,relu]

For the side-by-side table with SAELens, sparsify and the plain sparse reference, run the peer
harness with ``--plugin bench/saescope_variants.py`` (its docstring says how).
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace

import torch
from saescope_variants import VARIANTS, build_saescope


def measure(step, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(tokens/s, tokens per CPU-second) over batches[1:], after batches[0] as warm-up."""
    step(batches[0])
    wall, cpu = time.perf_counter(), time.process_time()
    for x in batches[1:]:
        step(x)
    tokens = sum(x.shape[0] for x in batches[1:])
    return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--only", help="comma-separated variants (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ctx = SimpleNamespace(d=args.d, width=args.width, k=args.k, batch=args.batch, seed=0, dead_frac=0.1, total_steps=args.steps + 1)
    gen = torch.Generator().manual_seed(0)
    batches = list(torch.randn((args.steps + 1) * args.batch, args.d, generator=gen).split(args.batch))
    wanted = args.only.split(",") if args.only else [name for name, *_ in VARIANTS]

    print(f"width {args.width}, k {args.k}, batch {args.batch}, d {args.d}, {args.threads} threads, {args.steps} steps")
    print(f"{'variant':<12}{'tok/s':>9}{'tok/cpu-s':>11}{'cores':>7}{'load':>6}{'vs topk':>9}")
    baseline = None
    for name, arch, auxk, _ in VARIANTS:
        if name not in wanted:
            continue
        step, _meta = build_saescope(arch, auxk)(ctx)
        per_wall, per_cpu = measure(step, batches)
        baseline = baseline or (per_cpu if name == "topk" else None)
        ratio = f"{per_cpu / baseline:8.2f}x" if baseline else ""
        load = os.getloadavg()[0]
        print(f"{name:<12}{per_wall:>9.0f}{per_cpu:>11.0f}{per_wall / per_cpu:>7.2f}{load:>6.1f}{ratio:>9}")
    print("vs topk: ratio of tokens per CPU-second to topk's in this run")


if __name__ == "__main__":
    main()
