"""What training reads: a ``TokenSource`` of activations, cycled in full batches that are the
same in every run (so a resumed run reads what the uninterrupted one would), and the statistics
taken from it before the first step (input scale, geometric median)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from sae_core.saes.train_config import TrainError

# Tokens read to estimate the input scale: the mean norm settles to well under 1% by then.
SCALE_SAMPLE_TOKENS = 1 << 17


# Tokens whose geometric median initialises b_dec (Weiszfeld converges in a few steps).
MEDIAN_SAMPLE_TOKENS = 4096


class TokenSource(Protocol):
    """What training reads: ``sae_core.inputs.activations.ActivationCache`` or a ``TensorSource``."""

    n_tokens: int
    d_model: int

    def token_batches(
        self, batch_size: int, *, start: int = 0, stop: int | None = None
    ) -> Iterator[torch.Tensor]: ...


@dataclass
class TensorSource:
    """An in-memory (n_tokens, d_model) tensor, already shuffled, read in order."""

    data: torch.Tensor  # (n_tokens, d_model)

    @property
    def n_tokens(self) -> int:
        return self.data.shape[0]

    @property
    def d_model(self) -> int:
        return self.data.shape[1]

    def token_batches(self, batch_size: int, *, start: int = 0, stop: int | None = None):
        stop = self.n_tokens if stop is None else stop
        for begin in range(start, stop, batch_size):
            yield self.data[begin : min(begin + batch_size, stop)].float()


def batches_from(
    source: TokenSource, batch_size: int, first_step: int, max_tokens: int
) -> Iterator[torch.Tensor]:
    """Full batches from the first ``max_tokens`` tokens forever, cycling epochs; batch ``i`` is
    the same tensor in every run, so a resumed run reads what the uninterrupted one would."""
    per_epoch = min(source.n_tokens, max_tokens) // batch_size
    if per_epoch == 0:
        raise TrainError(
            f"the activation source holds {source.n_tokens} tokens, fewer than one batch of "
            f"{batch_size}; lower --batch-size or cache more tokens"
        )
    step = first_step % per_epoch
    while True:
        yield from source.token_batches(batch_size, start=step * batch_size, stop=per_epoch * batch_size)
        step = 0


def estimate_scale(source: TokenSource, d_model: int) -> float:
    """c with E||c·x|| = sqrt(d_model), from the first SCALE_SAMPLE_TOKENS tokens."""
    total, count = 0.0, 0
    for batch in source.token_batches(4096, stop=min(source.n_tokens, SCALE_SAMPLE_TOKENS)):
        total += batch.double().norm(dim=-1).sum().item()
        count += batch.shape[0]
    return math.sqrt(d_model) / (total / count)


def geometric_median(points: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """(n, d) -> (d,) by Weiszfeld's algorithm, started at the mean."""
    median = points.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=-1).clamp_min(1e-8)  # (n,)
        median = (weights[:, None] * points).sum(dim=0) / weights.sum()
    return median
