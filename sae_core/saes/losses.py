"""Each architecture's forward pass and loss on a scaled batch (REFERENCE §1).

- ``topk`` / ``batchtopk``: FVU of the sparse reconstruction + AuxK over dead latents;
- ``relu``: Anthropic's ||x - x̂||² + λ Σ f_i ||W_dec_i||, λ warmed up over the first 5%."""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae_core.inputs import distributed
from sae_core.saes.sae import SAE
from sae_core.saes.sparse_codes import (
    codes_at,
    decode_sparse,
    select_batch_topk,
    select_dead,
    select_topk,
)
from sae_core.saes.train_config import TrainConfig


class Forward(NamedTuple):
    x_hat: torch.Tensor  # (batch, d)
    loss: torch.Tensor  # scalar, for backward
    fired: torch.Tensor  # (width,) bool: latents active in this batch
    l0: float


def forward_sparse(sae: SAE, x: torch.Tensor, cfg: TrainConfig, dead: torch.Tensor) -> Forward:
    """TopK or BatchTopK reconstruction + AuxK loss, both normalised by the batch variance."""
    with torch.no_grad():
        z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # (batch, width): the one dense matmul
    if cfg.architecture == "topk":
        rows, latents = select_topk(z, cfg.k)
    else:
        rows, latents = select_batch_topk(z, cfg.k)
    codes = codes_at(sae, x, z, rows, latents)
    x_hat = decode_sparse(sae.W_dec, codes) + sae.b_dec
    total_variance = batch_variance(x)
    loss = (x_hat - x).pow(2).sum() / total_variance
    n_dead = int(dead.sum())
    if n_dead:
        k_aux = cfg.resolved_aux_k(x.shape[1])
        aux_rows, aux_latents = select_dead(z, dead, k_aux)
        residual = (x - x_hat).detach()
        aux_hat = decode_sparse(sae.W_dec, codes_at(sae, x, z, aux_rows, aux_latents))
        aux_loss = (aux_hat - residual).pow(2).sum() / total_variance
        loss = loss + cfg.aux_coeff * min(n_dead / k_aux, 1.0) * aux_loss
    fired = torch.zeros(z.shape[1], dtype=torch.bool, device=z.device)
    fired[latents[codes.values.detach() > 0]] = True
    return Forward(x_hat, loss, fired, float((codes.values > 0).sum()) / x.shape[0])


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    """Σ ||x - mean||² over the whole batch (every rank's slice of it, all equal in size)."""
    mean = distributed.all_reduce(x.sum(dim=0), step="the batch mean") / (x.shape[0] * distributed.world().size)
    return distributed.all_reduce((x - mean).pow(2).sum(), step="the batch variance")


def forward_relu(sae: SAE, x: torch.Tensor, cfg: TrainConfig, step: int) -> Forward:
    """Anthropic's loss: mean ||x - x̂||² + λ_t · mean Σ_i f_i ||W_dec_i||, λ warmed up over 5%
    (means over the whole batch: this rank's sums over its slice, divided by the batch size)."""
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)  # (batch, width)
    x_hat = f @ sae.W_dec + sae.b_dec
    batch = x.shape[0] * distributed.world().size
    mse = (x_hat - x).pow(2).sum() / batch
    penalty = (f * sae.W_dec.norm(dim=-1)).sum() / batch
    l1_scale = min(1.0, (step + 1) / max(1, int(0.05 * cfg.total_steps)))
    active = (f > 0).detach()
    return Forward(x_hat, mse + cfg.l1_coeff * l1_scale * penalty, active.any(dim=0), float(active.sum()) / x.shape[0])
