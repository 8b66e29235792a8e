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


class DictionaryCodes:
    """One batch's codes of each Matryoshka dictionary in a pass, encoded once for all its nested
    SAEs: JumpReLU acts latent by latent, so the codes of the nested SAE of the first m latents
    are the dictionary's codes of latents < m. Every prefix thereby shows exactly the
    dictionary's activations (not a narrower matmul's rounding of them) and costs no encoding of
    its own. Make one per batch."""

    def __init__(self, memory_budget: int):
        self.memory_budget = memory_budget
        self.encoded: dict[int, EncodedBatch] = {}  # id of a dictionary -> its codes of this batch

    def encode(self, sae: SAE, dictionary: SAE | None, batch: ActivationBatch) -> EncodedBatch:
        """``sae``'s codes of the batch; ``dictionary``: the Matryoshka dictionary whose first
        ``sae.d_sae`` latents ``sae`` is (itself for the whole), None for any other SAE."""
        if dictionary is None:
            return encode_batch(sae, batch, self.memory_budget)
        if id(dictionary) not in self.encoded:
            self.encoded[id(dictionary)] = encode_batch(dictionary.to(batch.acts.device), batch, self.memory_budget)
        return first_latents(self.encoded[id(dictionary)], sae.d_sae)


def first_latents(encoded: EncodedBatch, m: int) -> EncodedBatch:
    """The entries of latents < m, in the order they were."""
    keep = encoded.acts.feature < m
    if bool(keep.all()):
        return encoded
    acts = encoded.acts
    return EncodedBatch(acts._replace(token=acts.token[keep], feature=acts.feature[keep], value=acts.value[keep]), encoded.grid[keep])
