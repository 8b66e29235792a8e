"""BatchTopK's selection on real activations: exact, and how it compares with a per-row and a full-batch topk.

Reads an activation cache (``saescope train`` builds them under ~/.cache/saescope/activations),
initialises a training state as ``fit`` does, and for a few batches compares
``select_batch_topk`` with the brute-force k·batch largest pre-activations, timing both and a
per-row TopK. Also prints how many rows hold more than 4k winners: the massive-activation tokens
that made the old per-row-candidates fast path fall back to a full-batch topk on every step.

    python bench/bench_batch_topk.py ~/.cache/saescope/activations/smollm2-135m-L15-<hash> [--width 8192 --k 32]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sae_core.inputs.activations import ActivationCache
from sae_core.saes.sparse_codes import select_batch_topk
from sae_core.saes.train_config import TrainConfig
from sae_core.saes.train_loop import init_state, train_step


def cpu_ms(fn) -> tuple[object, float]:
    start = time.process_time()
    out = fn()
    return out, 1e3 * (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", help="an activation cache folder")
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cache = ActivationCache.open(args.cache)
    cfg = TrainConfig(architecture="batchtopk", width=args.width, k=args.k, batch_size=args.batch_size, tokens=args.batch_size * 100)
    state = init_state(cfg, cache)
    n = args.k * args.batch_size
    print(f"{cache.n_tokens} tokens of d={cache.d_model}; width {args.width}, k {args.k}, batch {args.batch_size}")
    for i, x in zip(range(args.batches), cache.token_batches(args.batch_size), strict=False):
        with torch.no_grad():
            z = state.sae.pre_acts(x.float() * state.scale)
        (rows, latents), ours = cpu_ms(lambda: select_batch_topk(z, args.k))  # noqa: B023
        brute, full = cpu_ms(lambda: z.flatten().topk(n))  # noqa: B023
        _, per_row = cpu_ms(lambda: z.topk(args.k, dim=-1, sorted=False))  # noqa: B023
        expected = set(brute.indices[brute.values > 0].tolist())
        exact = set((rows * args.width + latents).tolist()) == expected
        heavy = int((torch.bincount(rows, minlength=args.batch_size) > 4 * args.k).sum())
        print(
            f"batch {i}: exact {exact}; select {ours:.0f} ms CPU, full-batch topk {full:.0f} ms, per-row topk {per_row:.0f} ms;"
            f" rows with > 4k winners: {heavy}; load {os.getloadavg()[0]:.1f}"
        )
        train_step(state, x, cfg, cfg.resolved_lr(args.width))


if __name__ == "__main__":
    main()
