"""Precompute's encoding of a Matryoshka dictionary's nested SAEs, per batch: each prefix through
its own sliced weights (``encode_batch`` per SAE, as separate widths are) vs the dictionary once,
each prefix's codes cut from it (``DictionaryCodes``, what precompute does). SmolLM2's width
(576), prefixes 1,024 / 4,096 / 16,384, batches of 32 x 64 tokens of random residuals, JumpReLU θ
set so about 64 latents fire per token. CPU seconds and wall seconds, side by side, alternating.

    python bench/bench_matryoshka_encode.py [--batches 5]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sae_core.inputs.activations import ActivationBatch
from sae_core.precompute.encode import DictionaryCodes, encode_batch
from sae_core.saes.sae import SAE, SAEConfig

PREFIXES = [1024, 4096, 16384]
D_MODEL, CONTEXTS, SEQ = 576, 32, 64
BUDGET = 1024 << 20  # precompute's default --memory-budget


def dictionary() -> SAE:
    gen = torch.Generator().manual_seed(0)
    width = PREFIXES[-1]
    sae = SAE(SAEConfig(d_in=D_MODEL, d_sae=width, architecture="jumprelu", saescope={"matryoshka_prefixes": PREFIXES}))
    sae.W_enc.data = torch.randn(D_MODEL, width, generator=gen) / D_MODEL**0.5
    sae.W_dec.data = torch.randn(width, D_MODEL, generator=gen)
    x = torch.randn(512, D_MODEL, generator=gen)
    with torch.no_grad():
        sae.threshold.data.fill_(float(sae.pre_acts(x).flatten().kthvalue(int(512 * width * (1 - 64 / width))).values))
    return sae


def batch(seed: int) -> ActivationBatch:
    gen = torch.Generator().manual_seed(seed)
    return ActivationBatch(
        context_ids=torch.arange(CONTEXTS),
        tokens=torch.randint(0, 1000, (CONTEXTS, SEQ), generator=gen),
        acts=torch.randn(CONTEXTS, SEQ, D_MODEL, generator=gen),
        special_mask=torch.zeros(CONTEXTS, SEQ, dtype=torch.bool),
    )


def timed(fn) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()
    whole = dictionary()
    nested = [whole.nested(m) for m in PREFIXES[:-1]] + [whole]
    totals = {"separately": [0.0, 0.0], "shared": [0.0, 0.0]}
    for i in range(args.batches):
        b = batch(i)
        codes = DictionaryCodes(BUDGET)  # one per batch, as precompute makes it
        for name, run in (
            ("separately", lambda b=b: [encode_batch(sae, b, BUDGET) for sae in nested]),
            ("shared", lambda b=b, codes=codes: [codes.encode(sae, whole, b) for sae in nested]),
        ):
            cpu, wall = timed(run)
            totals[name][0] += cpu
            totals[name][1] += wall
    print(f"load {os.getloadavg()[0]:.1f}; {args.batches} batches of {CONTEXTS * SEQ} tokens; prefixes {PREFIXES}")
    for name, (cpu, wall) in totals.items():
        print(f"{name:>10}: {cpu / args.batches:.3f} CPU s, {wall / args.batches:.3f} wall s per batch")
    print(f"shared / separately: CPU {totals['shared'][0] / totals['separately'][0]:.2f}, wall {totals['shared'][1] / totals['separately'][1]:.2f}")


if __name__ == "__main__":
    main()
