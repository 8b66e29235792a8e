"""The sparse machinery of TopK-style training: which (token, latent) pairs fire, their
differentiable values, and decoding them without a dense (batch × width) product.

The TopK encoder's backward and the decoder touch only the selected pairs (``embedding_bag``
for the decoder's forward and, one bag per latent, for dW_enc and dW_dec), so a step costs one dense
(batch × d_model × width) matmul instead of five."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from sae_core.inputs import distributed
from sae_core.saes.sae import SAE


class SparseCodes(NamedTuple):
    """Active (token, latent) pairs of a batch, rows sorted, as ``embedding_bag`` wants them."""

    rows: torch.Tensor  # (n,) token index in the batch
    latents: torch.Tensor  # (n,) latent index
    values: torch.Tensor  # (n,) activation, differentiable
    offsets: torch.Tensor  # (batch,) start of each token's pairs in rows/latents/values


class _PreActsAt(torch.autograd.Function):
    """Encoder pre-activations (x - b_dec) @ W_enc + b_enc at chosen (row, latent) pairs.

    ``z`` is that dense product, computed once without autograd for the selection; the backward
    uses only the chosen pairs: ``sum_by_latent`` of the data rows for W_enc, and for b_dec the
    identity Σ_rows ∂/∂b_dec = -W_enc @ (∂/∂b_enc). The data x gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, rows, latents, z):
        ctx.save_for_backward(x, b_dec, W_enc, rows, latents)
        return z[rows, latents]

    @staticmethod
    def backward(ctx, grad):  # grad: (n,)
        x, b_dec, W_enc, rows, latents = ctx.saved_tensors
        width = W_enc.shape[1]
        grad_b_enc = torch.zeros(width, dtype=grad.dtype, device=grad.device).index_add_(0, latents, grad)
        # (d, width) in the layout training_sae keeps W_enc in; detached from its transpose, so it
        # is no view and autograd may add AuxK's W_enc gradient into it in place (_DecodeColumns)
        grad_w = sum_by_latent(latents, rows, grad, x - b_dec, width).t().detach()
        return None, -(W_enc @ grad_b_enc), grad_w, grad_b_enc, None, None, None


def sum_by_latent(latents: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, width: int) -> torch.Tensor:
    """Σ over each latent's pairs of weight · table[row]: (width, d), the transposed product of
    the pairs with ``table``. One ``embedding_bag`` with a bag per latent (the pairs sorted by
    latent, rows ascending within each), whose bags run on every core; ``torch.sparse.mm`` of
    the same pairs as a COO matrix walks them on one thread."""
    # a stable sort of int32 keys: 6 ms of CPU for 131k pairs, where int64 keys took 183 ms
    order = torch.argsort(latents.to(torch.int32), stable=True)
    counts = torch.bincount(latents, minlength=width)
    offsets = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(rows[order], table.contiguous(), offsets, mode="sum", per_sample_weights=weights[order])


def codes_at(sae: SAE, x: torch.Tensor, z: torch.Tensor, rows: torch.Tensor, latents: torch.Tensor) -> SparseCodes:
    """ReLU'd, differentiable activations at the selected pairs (rows sorted ascending)."""
    values = torch.relu(_PreActsAt.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, rows, latents, z))
    counts = torch.bincount(rows, minlength=x.shape[0])
    offsets = torch.cumsum(counts, 0) - counts
    return SparseCodes(rows, latents, values, offsets)


def decode_sparse(W_dec: torch.Tensor, codes: SparseCodes) -> torch.Tensor:
    """Σ over a token's pairs of value · W_dec[latent]: (batch, d), no bias."""
    return _DecodeSparse.apply(W_dec, codes.values, codes.latents, codes.rows, codes.offsets)


class _DecodeSparse(torch.autograd.Function):
    """``embedding_bag`` forward; a backward that reads each pair once: dW_dec is
    ``sum_by_latent`` of the output gradient's rows, d(values) the product grad · W_decᵀ sampled
    at the pairs. (embedding_bag's own backward sorts the pairs by latent: 2-3x slower on a CPU.)"""

    @staticmethod
    def forward(ctx, W_dec, values, latents, rows, offsets):
        ctx.save_for_backward(W_dec, values, latents, rows, offsets)
        return F.embedding_bag(latents, W_dec, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad):  # grad: (batch, d)
        W_dec, values, latents, rows, offsets = ctx.saved_tensors
        width, batch = W_dec.shape[0], grad.shape[0]
        grad_w = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_w = sum_by_latent(latents, rows, values, grad, width)  # (width, d)
        if ctx.needs_input_grad[1]:
            crow = torch.cat([offsets, offsets.new_tensor([latents.numel()])])  # rows ascending: CSR
            with warnings.catch_warnings():  # "sparse CSR support is in beta", once per process
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(crow, latents, torch.zeros_like(values), (batch, width), check_invariants=False)
            grad_values = torch.sparse.sampled_addmm(pattern, grad, W_dec.t(), beta=0.0).values()
        return grad_w, grad_values, None, None, None


def select_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest latents of each row: (rows, latents), each (batch·k,)."""
    latents = z.topk(k, dim=-1, sorted=False).indices  # (batch, k)
    rows = torch.arange(z.shape[0], device=z.device).repeat_interleave(k)
    return rows, latents.flatten()


# BatchTopK's threshold is found from a strided sample of about this many pre-activations: a
# lower bound on it (a sample value a margin below the expected rank) cuts the batch down to
# ~1.5·k·batch candidates, among which the exact threshold is a small kthvalue.
THRESHOLD_SAMPLE = 1 << 18

# Pre-activations compared with BatchTopK's lower bound per block: an 8 MB mask at a time (at
# 1 MB, nonzero's per-call cost made the search 4x slower on 2 cores; at 8 MB it is as fast as
# one mask over the whole (batch, width)).
MASK_BLOCK = 1 << 23


def select_batch_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k·batch largest positive pre-activations of the whole batch (all ranks' slices):
    this rank's (rows, latents), rows ascending.

    Exact: a lower bound t on the threshold (a sample value a margin below the expected rank,
    lowered until at least k·batch pre-activations reach it on all ranks together) leaves the
    candidates z ≥ t, and the threshold is the k·batch-th largest of every rank's candidates.
    One pass over z after the sample, as TopK's per-row topk is."""
    n = k * z.shape[0] * distributed.world().size
    flat = z.flatten()
    stride = max(1, flat.numel() // THRESHOLD_SAMPLE) | 1  # odd: a power-of-two width sees every latent
    sample = distributed.all_gather(flat[::stride], step="the BatchTopK threshold")
    expected = n * sample.numel() / (flat.numel() * distributed.world().size)  # sample values above it
    rank = int(1.5 * expected + 6 * expected**0.5) + 1
    while True:
        if rank < sample.numel():
            lower = sample.kthvalue(sample.numel() - rank + 1).values
        else:
            lower = torch.tensor(-torch.inf, device=z.device)
        rows, latents = _at_least(z, lower)
        found = torch.tensor(rows.numel(), device=z.device)
        if rank >= sample.numel() or distributed.all_reduce(found, step="the BatchTopK threshold") >= n:
            break
        rank *= 4
    values = z[rows, latents]
    gathered = _all_gather_padded(values)
    threshold = gathered.kthvalue(gathered.numel() - n + 1).values if gathered.numel() > n else lower
    keep = (values >= threshold) & (values > 0)
    return rows[keep], latents[keep]


def _at_least(z: torch.Tensor, lower: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, latents) where z >= lower, rows ascending, found a block of rows at a time: a
    (batch, width) mask would add a quarter of z to the step's peak memory."""
    block = max(1, MASK_BLOCK // z.shape[1])
    rows, latents = [], []
    for start in range(0, z.shape[0], block):
        block_rows, block_latents = (z[start : start + block] >= lower).nonzero(as_tuple=True)  # row-major
        rows.append(block_rows + start)
        latents.append(block_latents)
    return torch.cat(rows), torch.cat(latents)


def _all_gather_padded(values: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-d ``values`` (lengths may differ), padded with -inf to a common length."""
    if distributed.world().size == 1:
        return values
    length = int(distributed.all_reduce(torch.tensor(values.numel(), device=values.device), "max", step="the BatchTopK threshold"))
    padded = torch.full((length,), -torch.inf, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    return distributed.all_gather(padded, step="the BatchTopK threshold")


def select_dead(z: torch.Tensor, dead: torch.Tensor, k_aux: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k_aux largest pre-activations among dead latents of each row: (rows, latents). Reads
    only the dead latents' columns of z."""
    dead_latents = dead.nonzero().squeeze(1)
    rows, picked = select_topk(z[:, dead_latents], min(k_aux, dead_latents.numel()))
    return rows, dead_latents[picked]


# AuxK's (batch, n) blocks are padded to a multiple of this many columns: with rows of an odd
# width (819 dead latents of 8,192) every row starts off a 64-byte line, and the product
# grad @ W_colsᵀ took 31 ms instead of 21 (batch 4096, d 576, 2 cores).
COLUMN_ALIGN = 16


def decode_dead_columns(sae: SAE, x: torch.Tensor, z: torch.Tensor, latents: torch.Tensor, k: int) -> torch.Tensor:
    """Σ over each row's k largest pre-activations among ``latents``, ReLU'd, of value ·
    W_dec[latent]: (batch, d), no bias. AuxK's decoding when its picks fill a good share of the
    dead latents' columns (see losses.DENSE_AUX_DENSITY): dense matmuls over those columns only."""
    return _DecodeColumns.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, sae.W_dec, z, latents, k)


class _DecodeColumns(torch.autograd.Function):
    """``decode_dead_columns`` as one step, forward and backward: the activations of the chosen
    columns are a (batch, n) block with zeros where a pre-activation is not picked, and every
    gradient is a dense product with that block or with its gradient (the pattern: where it is
    positive). b_dec's gradient by ``_PreActsAt``'s identity; x gets none.

    One function instead of autograd over gather, mask, product and index: those kept the
    block's mask, pre-activations and gradient as separate (batch, n) tensors and scattered
    each (n, d) gradient through an index backward, doubling AuxK's cost over its four matmuls.

    The block is n_pad = n rounded up to COLUMN_ALIGN columns wide, the padding never active.

    The (width, d) gradients meet the main path's in autograd's input buffer, which adds one
    into the other in place where it may: neither may be a view (nor shared). W_dec's comes as
    n sparse rows, added into the main path's with no (width, d) matrix of its own; W_enc's is
    dense (a sparse tensor cannot take W_enc's transposed layout) and, like _PreActsAt's, detached
    from its transpose. As views, both sums were out of place, and W_dec's a second fill (8,192 ×
    576, 2 cores: fills 9.0 -> 5.3 ms a step, sums 4.9 -> 3.1)."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, W_dec, z, latents, k):
        n = latents.numel()
        padded = torch.cat([latents, latents[:1].expand(-n % COLUMN_ALIGN)])  # (n_pad,): repeats of one latent
        values = z.index_select(1, padded)  # (batch, n_pad): the columns' pre-activations, then their activations
        values[:, n:] = -torch.inf  # the padding: never among a row's largest, zeroed below
        floor = torch.zeros(z.shape[0], 1, dtype=z.dtype, device=z.device)  # ReLU: only positives
        if k < n:  # above each row's (k+1)-th largest: its k largest
            floor = floor.maximum(kth_largest(values, k + 1))
        _keep_above_(values, values - floor)
        W_cols = W_dec.index_select(0, padded)  # (n_pad, d)
        ctx.save_for_backward(x, b_dec, W_enc, values, latents, W_cols)
        ctx.width = W_dec.shape[0]
        return values @ W_cols

    @staticmethod
    def backward(ctx, grad):  # grad: (batch, d)
        x, b_dec, W_enc, values, latents, W_cols = ctx.saved_tensors
        n = latents.numel()
        grad_values = _keep_above_(grad @ W_cols.t(), values)  # (batch, n_pad); 0 where not active, padding included
        grad_cols = grad_values.sum(dim=0)[:n]  # (n,): b_enc's gradient at those latents
        grad_b_enc = grad_cols.new_zeros(ctx.width).index_copy_(0, latents, grad_cols)
        grad_w_enc = _rows_at(latents, (grad_values.t() @ (x - b_dec))[:n], ctx.width).t().detach()  # as _PreActsAt's
        grad_w_dec = torch.sparse_coo_tensor(
            latents[None], (values.t() @ grad)[:n], (ctx.width, grad.shape[1]), is_coalesced=True, check_invariants=False
        )
        grad_b_dec = -(grad_cols @ W_enc.t().index_select(0, latents))  # W_enc's columns are its storage's rows
        return None, grad_b_dec, grad_w_enc, grad_b_enc, grad_w_dec, None, None, None


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, 1): each row's k-th largest value. On a CPU, numpy's introselect on blocks of rows,
    one per intra-op thread (it lets go of the GIL): 8 ms for AuxK's (4096, 832) block on 2
    cores, where ``topk`` takes 20."""
    if values.device.type != "cpu":
        return values.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    array, column = values.detach().numpy(), values.shape[1] - k
    out = np.empty(values.shape[0], dtype=array.dtype)

    def select(rows: slice) -> None:
        out[rows] = np.partition(array[rows], column, axis=1)[:, column]

    threads = torch.get_num_threads()
    step = -(-values.shape[0] // threads)
    list(_threads(threads).map(select, [slice(start, start + step) for start in range(0, values.shape[0], step)]))
    return torch.from_numpy(out).unsqueeze(1)


@cache
def _threads(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(n, thread_name_prefix="kth-largest")


def _keep_above_(values: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """``values`` zeroed in place where ``margin`` <= 0: ReLU's backward kernel, one pass
    (``torch.where`` and ``masked_fill_`` on a comparison's mask take 2-4x as long on a CPU), and
    no second (batch, n) block at AuxK's forward and backward peaks."""
    return torch.ops.aten.threshold_backward.grad_input(values, margin, 0.0, grad_input=values)


def _rows_at(latents: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    """A (width, d) matrix holding ``rows`` at ``latents``, zeros elsewhere."""
    return rows.new_zeros(width, rows.shape[1]).index_copy_(0, latents, rows)
