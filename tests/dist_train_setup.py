"""The data and settings shared by tests/test_distributed.py and its torchrun worker."""

from __future__ import annotations

import torch

from sae_core.saes.train_config import TrainConfig

RECIPES = ("topk", "batchtopk", "relu")
BATCH = 128  # split 64 + 64 over two ranks
STEPS = 24


def training_data() -> torch.Tensor:
    """(BATCH * STEPS, 32) sparse combinations of 48 random unit directions plus noise."""
    gen = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(48, 32, generator=gen), dim=1)
    n = BATCH * STEPS
    codes = torch.rand(n, 48, generator=gen) * (torch.rand(n, 48, generator=gen) < 0.06)
    return codes @ features + 1.0 + 0.01 * torch.randn(n, 32, generator=gen)


def recipe_config(architecture: str) -> TrainConfig:
    # warm-up of 1 step and a dead window of 2 batches, so the lr schedule, AuxK and the dead
    # bookkeeping all act within the short run
    return TrainConfig(
        architecture=architecture, width=64, k=4, tokens=BATCH * STEPS, batch_size=BATCH, warmup_steps=1,
        dead_tokens=2 * BATCH, checkpoint_every=5, lr=3e-3, l1_coeff=0.3,
    )  # fmt: skip
