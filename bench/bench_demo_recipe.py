"""Benchmark: which batch size and learning rate the demo's small budget should train with.

At the recipe's 4,096-token batches the demo's 409,600 training tokens are 100 steps, and the
decoder rows end near their random start: the dictionary is mostly its initialisation, widths
share no features and no family can split. This trains a 1,024- and a 4,096-wide TopK SAE (k 32)
in one loop for each setting, side by side in one run, from the demo's layer-15 cache (built if
missing), and measures on the cache's last 16,384 tokens, which training never read:

- EV of each width;
- the median cosine of each width's decoder rows to their random start (1: it never moved);
- how many 1,024 latents have a 4,096 latent within cosine 0.5, and the median best cosine
  (chance level in 576 dimensions is ~0.19): the family links the browser can show;
- CPU-seconds of training (all threads), and the load average before each setting.

    python bench/bench_demo_recipe.py [--settings 4096x1,1024x1,1024x2,1024x4,512x4] [--tokens 409600]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from sae_core.inputs.activations import ActivationCache
from sae_core.inputs.corpus import build_contexts, held_out_split
from sae_core.inputs.subject import load_subject
from sae_core.saes.metrics import reconstruction_stats
from sae_core.saes.train_config import TrainConfig
from sae_core.saes.train_data import TensorSource
from sae_core.saes.train_loop import FitJob, fit_all, init_seed

LAYER = 15
WIDTHS = (1024, 4096)
CACHE_TOKENS = 163_840  # the demo's default budget: its layer-15 cache is reused
EVAL_TOKENS = 16_384  # the cache's last tokens, kept out of training
EVAL_CONTEXTS = 64  # the demo's held-out split (its cache's key)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="4096x1,1024x1,1024x2,1024x4,512x4", help="BATCHxLR_SCALE, comma-separated")
    parser.add_argument("--tokens", type=int, default=409_600, help="training tokens per setting (the demo's)")
    return parser.parse_args()


def demo_cache() -> torch.Tensor:
    """The demo's layer-15 activations, (tokens, d_model) float32, in the cache's order."""
    subject = load_subject("smollm2-135m")
    run = TrainConfig(layer=LAYER)  # the demo's corpus, window and seed
    contexts = build_contexts(run.corpus, subject.tokenizer, text_field=run.text_field, ctx_len=run.ctx_len, seed=run.seed)
    split = held_out_split(contexts, EVAL_CONTEXTS)
    folder = ActivationCache.default_folder(subject, LAYER, split.train)
    cache = ActivationCache.build_layers(subject, {LAYER: folder}, split.train, max_tokens=CACHE_TOKENS)[LAYER]
    return torch.cat(list(cache.token_batches(EVAL_TOKENS, stop=CACHE_TOKENS)))


def unit_rows(W: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(W.detach().float(), dim=1)


def run_setting(data: torch.Tensor, batch: int, lr_scale: float, tokens: int) -> str:
    train, held_out = TensorSource(data[:-EVAL_TOKENS]), data[-EVAL_TOKENS:]
    configs = [TrainConfig(layer=LAYER, width=w, k=32, batch_size=batch, tokens=tokens, checkpoint_every=10**6) for w in WIDTHS]
    configs = [replace(cfg, lr=cfg.resolved_lr(cfg.width) * lr_scale) for cfg in configs]  # as the demo does
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        cpu = time.process_time()
        results = fit_all([FitJob(cfg, train, Path(folder) / str(cfg.width)) for cfg in configs], progress=False)
        cpu = time.process_time() - cpu
    evs, to_start, decoders = [], [], []
    for cfg, result in zip(configs, results, strict=True):
        decoder = unit_rows(result.sae.W_dec)
        start = torch.randn(cfg.width, decoder.shape[1], generator=torch.Generator().manual_seed(init_seed(cfg.seed, cfg.width)))
        evs.append(reconstruction_stats(result.sae, [held_out]).summary()["explained_variance"])
        to_start.append(float((decoder * unit_rows(start)).sum(dim=1).median()))
        decoders.append(decoder)
    best = (decoders[0] @ decoders[1].T).max(dim=1).values
    return (
        f"| {batch:,}, x{lr_scale:g} | {evs[0]:.3f} / {evs[1]:.3f} | {to_start[0]:.2f} / {to_start[1]:.2f} "
        f"| {float((best >= 0.5).float().mean()):.0%} | {float(best.median()):.2f} | {cpu:.0f} | {load:.1f} |"
    )


def main() -> None:
    args = parse_args()
    data = demo_cache()
    print(f"layer {LAYER}, widths {WIDTHS}, {args.tokens:,} training tokens per setting, {EVAL_TOKENS:,} held-out cached tokens")
    print("| batch, lr | EV 1k / 4k | cosine to start 1k / 4k | 1k with a 4k >= 0.5 | median best cosine | CPU s | load |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for setting in args.settings.split(","):
        batch, lr_scale = setting.split("x")
        print(run_setting(data, int(batch), float(lr_scale), args.tokens), flush=True)


if __name__ == "__main__":
    main()
