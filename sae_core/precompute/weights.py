"""What a feature does by its weights alone: logit effects and nearest decoder directions.

Both are (F, something) products computed in chunks of features so that memory stays within the
budget (never the F x vocab or F x F matrix at once).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from tqdm import tqdm

from sae_core.precompute.results import Neighbours, rows_per_chunk
from sae_core.precompute.stats import one_thread

HISTOGRAM_ROWS = 64  # rows binned at once: a small copy of the logit chunk, still one bincount per 3M values


class LogitEffects(NamedTuple):
    top_ids: torch.Tensor  # (F, n) token ids, largest effect first
    top_values: torch.Tensor  # (F, n)
    bottom_ids: torch.Tensor  # (F, n) most negative first
    bottom_values: torch.Tensor  # (F, n)
    hist_lo: torch.Tensor  # (F,) smallest effect over the vocabulary
    hist_hi: torch.Tensor  # (F,) largest
    hist_counts: torch.Tensor  # (F, bins) equal bins over [lo, hi]


@torch.no_grad()
def logit_effects(
    W_dec: torch.Tensor, norm_scale: torch.Tensor, W_U: torch.Tensor, *, n: int, bins: int, memory_budget: int
) -> LogitEffects:
    """Direct effect of each decoder direction on the logits, through the final norm's scale:
    (W_dec[i] * norm_scale) @ W_U^T. W_dec (F, d), norm_scale (d,), W_U (vocab, d)."""
    n_features, vocab = W_dec.shape[0], W_U.shape[0]
    # sized for float32 logits + an int32 bin index per chunk, and kept so: how the matmul rounds a
    # short last chunk depends on its rows, and the stored effects stay byte for byte as they were
    chunk = rows_per_chunk(4 * vocab + 4 * vocab, memory_budget)
    parts = [
        chunk_effects(W_dec[start : start + chunk] * norm_scale, W_U, n=n, bins=bins)
        for start in tqdm(range(0, n_features, chunk), desc="logit effects", unit="chunk", leave=False)
    ]
    return LogitEffects(*(torch.cat(field) for field in zip(*parts, strict=True)))


def chunk_effects(scaled: torch.Tensor, W_U: torch.Tensor, *, n: int, bins: int) -> LogitEffects:
    """``logit_effects`` of a chunk of scaled decoder rows (chunk, d). A function of its own so that
    a chunk's logits are freed before the next chunk's are made (a loop variable held two).

    After the matmul, each of torch's threads takes a block of rows (their top, bottom and
    histogram) on one thread of its own: split op by op instead, the histogram's many passes
    each paid a fork and a join (a 682-row chunk at load 7 on 2 cores: 978 ms CPU and 3.6 s wall,
    now 734 ms and 2.3 s; the rows' results do not depend on the split)."""
    logits = scaled @ W_U.T  # (chunk, vocab)
    workers = torch.get_num_threads()
    with one_thread(), ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(functools.partial(row_effects, n=n, bins=bins), logits.chunk(workers)))
    return LogitEffects(*(torch.cat(field) for field in zip(*parts, strict=True)))


def row_effects(logits: torch.Tensor, *, n: int, bins: int) -> LogitEffects:
    """``chunk_effects`` of a block of its logits (rows, vocab), which it overwrites."""
    top = logits.topk(n, dim=1)
    bottom = logits.topk(n, dim=1, largest=False)
    lo, hi = bottom.values[:, 0], top.values[:, 0]  # the extremes: no pass of their own over the chunk
    return LogitEffects(top.indices, top.values, bottom.indices, bottom.values, lo, hi, row_histograms(logits, lo, hi, bins))


def row_histograms(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """(rows, m) values -> (rows, bins) counts over equal bins of each row's [lo, hi].
    Overwrites ``values`` (in-place passes: this runs over F x vocab elements). Each value's bin is
    truncated to an integer before the row's offset is added: added in float32 to a large offset, a
    value just under a bin edge rounded up into the next bin, so the counts depended on the chunk.
    The bin indices go through HISTOGRAM_ROWS rows at a time: all at once they were a second
    copy of the chunk (134 MB of the 1 GiB budget's logit chunk)."""
    rows = values.shape[0]
    scale = bins / (hi - lo).clamp(min=1e-12).unsqueeze(1)
    values.sub_(lo.unsqueeze(1)).mul_(scale).clamp_(0, bins - 1)  # (rows, m) bin of each value, still float
    counts = []
    for start in range(0, rows, HISTOGRAM_ROWS):
        index = values[start : start + HISTOGRAM_ROWS].to(torch.int32)  # (block, m)
        index.add_(torch.arange(index.shape[0], dtype=torch.int32).unsqueeze(1) * bins)  # row offsets
        counts.append(torch.bincount(index.view(-1), minlength=index.shape[0] * bins).view(-1, bins))
    return torch.cat(counts) if counts else torch.zeros(0, bins, dtype=torch.int64)


@torch.no_grad()
def decoder_neighbours(W_dec: torch.Tensor, *, n: int, memory_budget: int) -> Neighbours:
    """Top ``n`` other features by cosine similarity of decoder directions, a chunk of rows at a time."""
    n_features = W_dec.shape[0]
    unit = torch.nn.functional.normalize(W_dec, dim=1)  # (F, d)
    chunk = rows_per_chunk(4 * n_features, memory_budget)
    parts = [
        chunk_neighbours(unit, start, chunk, n=min(n, n_features - 1))
        for start in tqdm(range(0, n_features, chunk), desc="decoder neighbours", unit="chunk", leave=False)
    ]
    return Neighbours(*(torch.cat(field) for field in zip(*parts, strict=True)))


def chunk_neighbours(unit: torch.Tensor, start: int, chunk: int, *, n: int) -> Neighbours:
    """``decoder_neighbours`` of rows [start, start + chunk) of the unit decoder rows (F, d). A
    function of its own, as ``chunk_effects`` is: a loop variable held the last chunk's cosines
    while the next were made (268 MB each at 16,384 features and the 1 GiB budget)."""
    cos = unit[start : start + chunk] @ unit.T  # (chunk, F)
    rows = torch.arange(cos.shape[0])
    cos[rows, rows + start] = -float("inf")  # never its own neighbour
    top = cos.topk(n, dim=1)
    return Neighbours(top.indices, top.values.double())
