"""SAE activations as sparse (token, feature, value) entries, computed in feature chunks.

Precompute never needs the dense (tokens, d_sae) matrix: a TopK SAE keeps k values per token and a
trained ReLU/JumpReLU SAE a few hundred, so every statistic is a bincount or scatter over the
nonzero entries. Encoding goes through the pre-activations in chunks of features, so the largest
tensor alive is (tokens, chunk) whatever the SAE's width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae_core.saes.sae import SAE


class SparseActs(NamedTuple):
    """Nonzero activations of a batch (in no particular order)."""

    token: torch.Tensor  # (n,) int64 row of the token in the batch's token list
    feature: torch.Tensor  # (n,) int64 feature index
    value: torch.Tensor  # (n,) float32, > 0


def feature_chunk(n_tokens: int, memory_budget: int) -> int:
    """Features per chunk so that a few (n_tokens, chunk) float32 tensors fit ``memory_budget`` bytes."""
    return max(1, memory_budget // (4 * 4 * max(1, n_tokens)))


@torch.no_grad()
def sparse_encode(sae: SAE, x: torch.Tensor, chunk: int) -> SparseActs:
    """(n_tokens, d_in) residuals -> their nonzero SAE activations, equal to ``sae.encode(x)``'s."""
    x_in = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    if sae.cfg.architecture == "topk":
        return _sparse_topk(sae, x_in, chunk)
    parts = []
    for start in range(0, sae.d_sae, chunk):
        stop = min(start + chunk, sae.d_sae)
        z = (x_in @ sae.W_enc[:, start:stop]).add_(sae.b_enc[start:stop])  # (n_tokens, chunk); in place: no second copy
        f = sae.activate(z, slice(start, stop))  # raises for an architecture it does not know
        token, local = torch.nonzero(f > 0, as_tuple=True)
        parts.append(SparseActs(token, local + start, f[token, local]))
    return SparseActs(*(torch.cat(field) for field in zip(*parts, strict=True)))


def _sparse_topk(sae: SAE, x_in: torch.Tensor, chunk: int) -> SparseActs:
    """TopK over all features as a running merge of per-chunk TopKs (raw pre-activations), then
    ``encode_topk``'s ReLU on the k survivors: only the positive ones are kept."""
    k = sae.cfg.k
    best_v = best_i = None  # (n_tokens, k)
    for start in range(0, sae.d_sae, chunk):
        stop = min(start + chunk, sae.d_sae)
        z = (x_in @ sae.W_enc[:, start:stop]).add_(sae.b_enc[start:stop])  # (n_tokens, chunk); in place: no second copy
        v, i = z.topk(min(k, stop - start), dim=-1)
        i = i + start
        if best_v is not None:
            v, pick = torch.cat([best_v, v], dim=1).topk(k, dim=-1)
            i = torch.cat([best_i, i], dim=1).gather(1, pick)
        best_v, best_i = v, i
    keep = best_v > 0
    token = torch.arange(x_in.shape[0]).unsqueeze(1).expand_as(best_v)[keep]
    return SparseActs(token, best_i[keep], best_v[keep])
