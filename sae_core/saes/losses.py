"""Each architecture's forward pass and loss on a scaled batch (REFERENCE §1).

- ``topk`` / ``batchtopk``: FVU of the sparse reconstruction + AuxK over dead latents;
- ``matryoshka``: BatchTopK's selection; the sum over prefixes m of the FVU of the reconstruction
  by the first m latents alone (Bussmann et al. 2025), + AuxK on the full reconstruction;
- ``relu``: Anthropic's ||x - x̂||² + λ Σ f_i ||W_dec_i||, λ warmed up over the first 5%; dense
  while many latents fire, sparse once few do (the same loss and gradients either way)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae_core.inputs import distributed
from sae_core.saes.sae import SAE
from sae_core.saes.sparse_codes import (
    SparseCodes,
    codes_at,
    decode_dead_columns,
    decode_sparse,
    select_batch_topk,
    select_dead,
    select_topk,
)
from sae_core.saes.train_config import TrainConfig

# The relu step runs sparse (encoder gather, embedding_bag decoder, sparse backward) when fewer
# than this fraction of the batch's (token, latent) pairs are active: there the sparse kernels,
# slower per multiply-add than a dense matmul, already do under a tenth of the dense work.
SPARSE_RELU_DENSITY = 0.1

# AuxK runs densely over the dead latents' columns when each row's k_aux picks fill at least this
# share of them. Measured on 2 cores (batch 4096, d 576): a pair costs the sparse kernels
# (embedding_bag, sampled_addmm, two sparse.mm) ~2 µs of CPU, an entry of the four dense matmuls
# ~0.12 µs, so dense wins above ~1/17. With k_aux = d/2 = 288 that is up to ~4,600 dead latents.
# (Measured before sum_by_latent replaced the two sparse.mm: pairs are cheaper now, not remeasured.)
DENSE_AUX_DENSITY = 1 / 16


class Forward(NamedTuple):
    x_hat: torch.Tensor  # (batch, d)
    loss: torch.Tensor  # scalar, for backward
    fired: torch.Tensor  # (width,) bool: latents active in this batch
    l0: float


def forward_sparse(sae: SAE, x: torch.Tensor, cfg: TrainConfig, dead: torch.Tensor, z: torch.Tensor) -> Forward:
    """TopK, BatchTopK or Matryoshka reconstruction + AuxK loss, normalised by the batch variance.
    ``z`` (batch, width) receives the pre-activations; nothing reads it after the selections."""
    with torch.no_grad():
        sae.pre_acts(x, out=z)  # the one dense matmul
    if cfg.architecture == "topk":
        rows, latents = select_topk(z, cfg.k)
    else:
        rows, latents = select_batch_topk(z, cfg.k)
    codes = codes_at(sae, x, z, rows, latents)
    n_dead, k_aux = int(dead.sum()), cfg.resolved_aux_k(x.shape[1])
    aux_hat = aux_reconstruction(sae, x, z, dead, k_aux) if n_dead else None
    width = z.shape[1]
    total_variance = batch_variance(x)
    if cfg.architecture == "matryoshka":
        loss, x_hat = prefix_loss(sae.W_dec, codes, cfg.prefixes, sae.b_dec, x, total_variance)
    else:
        x_hat = decode_sparse(sae.W_dec, codes) + sae.b_dec
        loss = (x_hat - x).pow(2).sum() / total_variance
    if aux_hat is not None:
        aux_loss = (aux_hat - (x - x_hat).detach()).pow(2).sum() / total_variance
        loss = loss + cfg.aux_coeff * min(n_dead / k_aux, 1.0) * aux_loss
    return Forward(x_hat, loss, *_fired(codes, width, x.shape[0]))


def aux_reconstruction(sae: SAE, x: torch.Tensor, z: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """AuxK's decoding (batch, d), no bias, of each row's k_aux largest dead latents, ReLU'd,
    touching only the dead latents: dense over their columns when the picks fill at least
    DENSE_AUX_DENSITY of them, else through the sparse pairs."""
    dead_latents = dead.nonzero().squeeze(1)
    if k_aux >= DENSE_AUX_DENSITY * dead_latents.numel():
        return decode_dead_columns(sae, x, z, dead_latents, k_aux)
    rows, latents = select_dead(z, dead, k_aux)
    return decode_sparse(sae.W_dec, codes_at(sae, x, z, rows, latents))


def prefix_loss(
    W_dec: torch.Tensor, codes: SparseCodes, prefixes: list[int], b_dec: torch.Tensor, x: torch.Tensor, total_variance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ over prefixes m of ||x̂_m - x||² / total_variance, x̂ of the whole dictionary, detached),
    x̂_m = b_dec + the decoding by the first m latents. The bands of latents [previous m, m) are
    decoded in one call, as if each band's pairs were tokens of their own (row band·batch +
    token): the work is one full decode whatever the number of prefixes."""
    batch, starts = codes.offsets.shape[0], [0, *prefixes[:-1]]
    # pairs by (band, token), rows ascending within each band, as embedding_bag wants them
    order = torch.cat([((codes.latents >= a) & (codes.latents < b)).nonzero().squeeze(1) for a, b in zip(starts, prefixes, strict=True)])
    band = torch.bucketize(codes.latents[order], torch.tensor(prefixes, device=order.device), right=True)
    rows = band * batch + codes.rows[order]
    counts = torch.bincount(rows, minlength=len(prefixes) * batch)
    banded = SparseCodes(rows, codes.latents[order], codes.values[order], torch.cumsum(counts, 0) - counts)
    return _PrefixLoss.apply(decode_sparse(W_dec, banded), b_dec, x, total_variance)


class _PrefixLoss(torch.autograd.Function):
    """The prefixes' summed squared error from the bands' decodings (bands·batch, d), in one
    (bands, batch, d) buffer: the cumulative reconstructions, then their residuals, then, in
    backward, their gradients, each written over the last. Autograd over the adds and squares
    kept a gradient per prefix, their running sums and a stacked copy alive together: the
    Matryoshka step's peak memory (~80 MB at batch 4096, d 576, three prefixes). The same sums
    in the same order as that graph, so the same bits."""

    @staticmethod
    def forward(ctx, decoded, b_dec, x, total_variance):
        parts = decoded.view(-1, *x.shape)  # (bands, batch, d)
        residuals = torch.empty_like(parts)
        torch.add(b_dec, parts[0], out=residuals[0])
        for m in range(1, parts.shape[0]):
            torch.add(residuals[m - 1], parts[m], out=residuals[m])
        x_hat = residuals[-1].clone()
        residuals.sub_(x)
        loss = sum(r.pow(2).sum() for r in residuals) / total_variance
        ctx.save_for_backward(residuals, total_variance)
        ctx.mark_non_differentiable(x_hat)
        return loss, x_hat

    @staticmethod
    def backward(ctx, grad, _grad_x_hat):
        grads, total_variance = ctx.saved_tensors  # the residuals, made their gradients in place
        grads.mul_(2 * (grad / total_variance))
        for m in range(grads.shape[0] - 2, -1, -1):  # band m's latents are in every prefix from m on
            grads[m] += grads[m + 1]
        return grads.view(-1, grads.shape[2]), grads[0].sum(dim=0), None, None


def _fired(codes: SparseCodes, width: int, batch: int) -> tuple[torch.Tensor, float]:
    """(which latents fired in the batch, mean active latents per token)."""
    active = codes.values.detach() > 0
    fired = torch.zeros(width, dtype=torch.bool, device=active.device)
    fired[codes.latents[active]] = True
    return fired, float(active.sum()) / batch


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    """Σ ||x - mean||² over the whole batch (every rank's slice of it, all equal in size)."""
    mean = distributed.all_reduce(x.sum(dim=0), step="the batch mean") / (x.shape[0] * distributed.world().size)
    return distributed.all_reduce((x - mean).pow(2).sum(), step="the batch variance")


def forward_relu(sae: SAE, x: torch.Tensor, cfg: TrainConfig, step: int) -> Forward:
    """Anthropic's loss: mean ||x - x̂||² + λ_t · mean Σ_i f_i ||W_dec_i||, λ warmed up over 5%
    (means over the whole batch: this rank's sums over its slice, divided by the batch size).

    The pre-activations are computed once; below SPARSE_RELU_DENSITY active pairs the rest of
    the step touches only the active pairs (``codes_at``, ``decode_sparse``)."""
    z = sae.pre_acts(x)  # (batch, width)
    batch = x.shape[0] * distributed.world().size
    l1_scale = min(1.0, (step + 1) / max(1, int(0.05 * cfg.total_steps)))
    decoder_norms = sae.W_dec.norm(dim=-1)  # (width,)
    with torch.no_grad():
        active = z > 0
        n_active = int(torch.count_nonzero(active))  # (a bool .sum() is 4x slower on a CPU)
        sparse = n_active < SPARSE_RELU_DENSITY * z.numel()
    if sparse:
        rows, latents = active.nonzero(as_tuple=True)
        del active
        codes = codes_at(sae, x, z.detach(), rows, latents)
        x_hat = decode_sparse(sae.W_dec, codes) + sae.b_dec
        penalty = (codes.values * decoder_norms[latents]).sum() / batch
        fired, l0 = _fired(codes, z.shape[1], x.shape[0])
    else:
        f = torch.relu(z)
        x_hat = f @ sae.W_dec + sae.b_dec
        penalty = (f * decoder_norms).sum() / batch
        fired, l0 = active.any(dim=0), n_active / x.shape[0]
    mse = (x_hat - x).pow(2).sum() / batch
    return Forward(x_hat, mse + cfg.l1_coeff * l1_scale * penalty, fired, l0)
