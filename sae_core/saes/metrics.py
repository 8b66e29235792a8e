"""SAE quality metrics, defined exactly as REFERENCE §2, on held-out contexts.

- L0: mean number of active latents per token.
- Explained variance: 1 - Σ||x - x̂||² / Σ||x - mean(x)||², both sums accumulated separately over
  the whole eval set (not a per-token average of ratios; variance about the mean, not zero).
- MSE: SAELens' convention, the mean over tokens of the sum over dimensions.
- CE loss recovered: (CE_zero - CE_sae) / (CE_zero - CE_clean), with x̂ spliced in for x after
  block L at non-special positions only (BOS keeps its clean activation) and the zero ablation
  zeroing every position; predictions made from special positions (BOS -> first token) are not
  counted. ΔCE = CE_sae - CE_clean; KL = KL(p_clean || p_sae), both over the same positions.
- Dead fraction: latents that never fired on the eval tokens; dense fraction: firing on > 10% of
  them; the histogram of log10 firing rates of the latents that fired.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from sae_core.saes.sae import SAE

DENSE_RATE = 0.1  # "dense": fires on more than 10% of tokens (REFERENCE §2)
HISTOGRAM_BINS = 40  # of log10 firing rate, from -log10(n_tokens) to 0


class ReconstructionStats:
    """Running sums for L0, explained variance, MSE and per-latent firing counts (float64)."""

    def __init__(self, d_in: int, d_sae: int):
        self.n_tokens = 0
        self.sum_sq_error = 0.0  # Σ ||x - x̂||²
        self.sum_sq_x = 0.0  # Σ ||x||²
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)  # Σ x
        self.n_active = 0  # Σ over tokens of active latents
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        """x, x_hat: (n, d_in); f: (n, d_sae) feature activations of the same n tokens."""
        x64 = x.detach().double().cpu()
        self.n_tokens += x.shape[0]
        self.sum_sq_error += float((x64 - x_hat.detach().double().cpu()).pow(2).sum())
        self.sum_sq_x += float(x64.pow(2).sum())
        self.sum_x += x64.sum(dim=0)
        active = (f.detach() > 0).cpu()
        self.n_active += int(active.sum())
        self.fire_counts += active.sum(dim=0)

    @property
    def total_variance(self) -> float:
        """Σ ||x - mean(x)||² = Σ ||x||² - n ||mean||²."""
        mean = self.sum_x / self.n_tokens
        return self.sum_sq_x - self.n_tokens * float(mean.pow(2).sum())

    def summary(self) -> dict:
        rates = self.fire_counts.double() / self.n_tokens
        return {
            "n_tokens": self.n_tokens,
            "l0": self.n_active / self.n_tokens,
            "explained_variance": 1.0 - self.sum_sq_error / self.total_variance,
            "mse": self.sum_sq_error / self.n_tokens,
            "dead_fraction": float((self.fire_counts == 0).double().mean()),
            "dense_fraction": float((rates > DENSE_RATE).double().mean()),
            "density_histogram": density_histogram(self.fire_counts, self.n_tokens),
        }


def density_histogram(fire_counts: torch.Tensor, n_tokens: int, bins: int = HISTOGRAM_BINS) -> dict:
    """Histogram of log10(firing rate) over latents that fired; dead latents counted apart."""
    fired = fire_counts[fire_counts > 0].double()
    low = -math.log10(n_tokens)
    edges = torch.linspace(low, 0.0, bins + 1, dtype=torch.float64)
    counts = torch.histc(torch.log10(fired / n_tokens), bins=bins, min=low, max=0.0) if fired.numel() else torch.zeros(bins)
    return {  # the same keys as the precompute's histogram, so pages read either
        "edges": [round(float(e), 4) for e in edges],
        "counts": [int(c) for c in counts],
        "dead": int((fire_counts == 0).sum()),
        "measured_over_tokens": int(n_tokens),
    }


def reconstruction_stats(sae: SAE, batches: Iterable[torch.Tensor]) -> ReconstructionStats:
    """Stats over batches of raw activations (n, d_in), e.g. synthetic data or a cache."""
    stats = ReconstructionStats(sae.d_in, sae.d_sae)
    with torch.no_grad():
        for x in batches:
            out = sae(x)
            stats.update(x, out.sae_out, out.feature_acts)
    return stats


class CEStats:
    """Running sums of next-token cross-entropy (clean, spliced, zero-ablated) and KL."""

    def __init__(self):
        self.n = 0
        self.clean = self.sae = self.zero = self.kl = 0.0

    def update(self, clean: torch.Tensor, spliced: torch.Tensor, zero: torch.Tensor, targets, counted) -> None:
        """Logits (B, T, V) of the three runs; targets (B, T-1); counted (B, T-1) bool."""
        logp_clean = clean[:, :-1].log_softmax(-1)
        logp_sae = spliced[:, :-1].log_softmax(-1)
        logp_zero = zero[:, :-1].log_softmax(-1)

        def total_nll(logp):
            return float(-logp.gather(-1, targets[..., None]).squeeze(-1)[counted].sum())

        self.clean += total_nll(logp_clean)
        self.sae += total_nll(logp_sae)
        self.zero += total_nll(logp_zero)
        kl = (logp_clean.exp() * (logp_clean - logp_sae)).sum(-1)  # (B, T-1)
        self.kl += float(kl[counted].sum())
        self.n += int(counted.sum())

    def summary(self) -> dict:
        clean, sae, zero = self.clean / self.n, self.sae / self.n, self.zero / self.n
        return {
            "ce_clean": clean,
            "ce_with_sae": sae,
            "ce_zero_ablation": zero,
            "ce_loss_recovered": (zero - sae) / (zero - clean),
            "delta_ce": sae - clean,
            "kl_div": self.kl / self.n,
            "n_predictions": self.n,
        }


@dataclass
class Metrics:
    """Everything ``metrics.json`` holds; ``how`` says how each number was measured."""

    n_tokens: int
    n_contexts: int
    l0: float
    explained_variance: float
    mse: float
    ce_clean: float
    ce_with_sae: float
    ce_zero_ablation: float
    ce_loss_recovered: float
    delta_ce: float
    kl_div: float
    n_predictions: int
    dead_fraction: float
    dense_fraction: float
    density_histogram: dict
    how: dict

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        return [
            f"explained variance {self.explained_variance:.4f}   L0 {self.l0:.1f}   MSE {self.mse:.4g}",
            f"CE clean {self.ce_clean:.4f}   with SAE {self.ce_with_sae:.4f} (ΔCE {self.delta_ce:+.4f}, "
            f"KL {self.kl_div:.4f})   zero-ablated {self.ce_zero_ablation:.4f}",
            f"CE loss recovered {self.ce_loss_recovered:.4f}",
            f"dead {self.dead_fraction:.4f}   dense (>10%) {self.dense_fraction:.4f}   "
            f"on {self.n_tokens} held-out tokens in {self.n_contexts} contexts",
        ]


HOW = {
    "explained_variance": "1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 over all held-out non-special tokens",
    "l0": "mean number of active latents per non-special token",
    "mse": "mean over tokens of the sum over dimensions of (x - x_hat)^2",
    "ce_loss_recovered": "(CE_zero - CE_sae) / (CE_zero - CE_clean); x_hat spliced after the layer at "
    "non-special positions (BOS keeps its clean activation), zero-ablation zeroes every position, "
    "predictions made from special positions not counted",
    "kl_div": "mean KL(p_clean || p_sae) over the same predictions",
    "dead_fraction": "latents that never fired on the held-out tokens",
    "dense_fraction": "latents firing on more than 10% of the held-out tokens",
}


def evaluate(
    subject,
    sae: SAE,
    layer: int,
    tokens: torch.Tensor,
    special_mask: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> Metrics:
    """All metrics on contexts ``tokens`` (n, seq) with ``special_mask`` (n, seq), via ``subject``."""
    [metrics] = evaluate_many(subject, [sae], layer, tokens, special_mask, batch_size=batch_size, progress=progress)
    return metrics


@torch.no_grad()
def evaluate_many(
    subject,
    saes: list[SAE],
    layer: int,
    tokens: torch.Tensor,
    special_mask: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> list[Metrics]:
    """``evaluate`` for several SAEs on one layer: the clean and the zero-ablated runs are shared,
    so N SAEs cost N + 2 forward passes per batch instead of 3N."""
    device = subject.device
    saes = [sae.to(device) for sae in saes]
    recons = [ReconstructionStats(sae.d_in, sae.d_sae) for sae in saes]
    ces = [CEStats() for _ in saes]
    for begin in tqdm(range(0, tokens.shape[0], batch_size), desc="evaluate", disable=not progress):
        ids = tokens[begin : begin + batch_size].to(device)  # (B, T)
        special = special_mask[begin : begin + batch_size].to(device)  # (B, T)
        clean = subject.model(input_ids=ids).logits.float()
        with subject.patch_layer(layer, torch.zeros_like):
            zero = subject.model(input_ids=ids).logits.float()
        for sae, recon, ce in zip(saes, recons, ces, strict=True):

            def splice(resid, sae=sae, recon=recon, special=special):
                out = sae(resid)
                keep = ~special
                recon.update(resid[keep], out.sae_out[keep], out.feature_acts[keep])
                return torch.where(special[..., None], resid, out.sae_out.to(resid.dtype))

            with subject.patch_layer(layer, splice):
                spliced = subject.model(input_ids=ids).logits
            ce.update(clean, spliced.float(), zero, ids[:, 1:], ~special[:, :-1])
    return [
        Metrics(n_contexts=int(tokens.shape[0]), **recon.summary(), **ce.summary(), how=HOW)
        for recon, ce in zip(recons, ces, strict=True)
    ]


def save_metrics(folder, metrics: Metrics) -> None:
    """Write ``metrics.json`` into the SAE folder atomically."""
    folder = Path(folder)
    tmp = folder / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics.to_dict(), indent=2))
    os.replace(tmp, folder / "metrics.json")
