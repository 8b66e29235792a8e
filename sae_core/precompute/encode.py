"""A batch of activations through an SAE, as the sparse entries precompute's accumulators take;
and the fingerprint that says which SAE weights a stored run was made with."""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch

from sae_core.inputs.activations import ActivationBatch
from sae_core.precompute.stats import BatchActs
from sae_core.saes.sae import SAE
from sae_core.saes.sparse_acts import feature_chunk, sparse_encode


def sae_fingerprint(sae: SAE) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class EncodedBatch(NamedTuple):
    acts: BatchActs  # on the CPU, what the accumulators take
    grid: torch.Tensor  # (n,) position of each entry in the batch's (B * seq) token grid


@torch.no_grad()
def encode_batch(sae: SAE, batch: ActivationBatch, memory_budget: int) -> EncodedBatch:
    """Non-special tokens of a batch through the SAE, as sparse entries."""
    n_contexts, seq, d_model = batch.acts.shape
    counted = (~batch.special_mask).reshape(-1).nonzero().squeeze(1)  # (N,) grid positions
    x = batch.acts.reshape(-1, d_model)[counted]  # (N, d_model)
    sparse = sparse_encode(sae, x, feature_chunk(counted.numel(), memory_budget))
    counted = counted.cpu()
    token = sparse.token.cpu()
    acts = BatchActs(
        context_ids=batch.context_ids.cpu(),
        token_context=counted // seq,
        token_ids=batch.tokens.reshape(-1)[counted.to(batch.tokens.device)].cpu(),
        token=token,
        feature=sparse.feature.cpu(),
        value=sparse.value.float().cpu(),
    )
    return EncodedBatch(acts, counted[token])
