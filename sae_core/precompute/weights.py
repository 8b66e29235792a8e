"""What a feature does by its weights alone: logit effects and nearest decoder directions.

Both are (F, something) products computed in chunks of features (never the F x vocab or F x F
matrix at once): logit effects in blocks of a fixed number of features, decoder neighbours in
chunks sized to the memory budget, at most a fixed number of features.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from tqdm import tqdm

from sae_core.precompute.results import Neighbours, rows_per_chunk
from sae_core.precompute.stats import one_thread

# decoder rows whose logits are made at once, whatever the memory budget: 48 MB of float32 logits
# over a 49,152-token vocabulary (sized from the 1 GiB budget, the block was 682 rows, 134 MB, and
# ~250 MB above the tail's resident memory with its topk and bin copies). Fixed, so that the stored
# effects do not depend on the budget either: how the matmul rounds a row may depend on the rows
# multiplied with it
LOGIT_ROWS = 256
# decoder rows whose cosines are made at once, at most: 16 MB at 4,096 features, where the 1 GiB
# budget alone made the whole 4,096 x 4,096 matrix (64 MB, the tail's peak for one SAE). Each row's
# cosines and neighbours come out the same in any chunk (checked at 4k and 16k features)
NEIGHBOUR_ROWS = 1024
SEGMENT = 128  # values per segment of a logit row whose extreme stands for it (see extremes)


class Extremes(NamedTuple):
    values: torch.Tensor  # (rows, n) largest first (smallest first for the bottom)
    indices: torch.Tensor  # (rows, n)


class LogitEffects(NamedTuple):
    top_ids: torch.Tensor  # (F, n) token ids, largest effect first
    top_values: torch.Tensor  # (F, n)
    bottom_ids: torch.Tensor  # (F, n) most negative first
    bottom_values: torch.Tensor  # (F, n)
    hist_lo: torch.Tensor  # (F,) smallest effect over the vocabulary
    hist_hi: torch.Tensor  # (F,) largest
    hist_counts: torch.Tensor  # (F, bins) equal bins over [lo, hi]


@torch.no_grad()
def logit_effects(W_dec: torch.Tensor, norm_scale: torch.Tensor, W_U: torch.Tensor, *, n: int, bins: int) -> LogitEffects:
    """Direct effect of each decoder direction on the logits, through the final norm's scale:
    (W_dec[i] * norm_scale) @ W_U^T. W_dec (F, d), norm_scale (d,), W_U (vocab, d).

    Every chunk's logits go into one buffer, mapped and faulted in once: a fresh block per chunk
    cost a 16,384-wide SAE 14.2 s instead of 11.4 (the same effects). Smaller chunks would make a
    smaller buffer but not a faster one: at 128 rows the matmul repacks the unembedding twice as
    often, and one run in two took 15 s. (Fresh blocks under glibc's mmap threshold are worse:
    from the heap, 24 MB ones were not reused, and 32 chunks of 128 rows kept 800 MB.)"""
    buffer = torch.empty(min(LOGIT_ROWS, W_dec.shape[0]), W_U.shape[0], dtype=torch.result_type(W_dec, W_U), device=W_U.device)
    parts = [
        chunk_effects(W_dec[start : start + LOGIT_ROWS] * norm_scale, W_U, buffer, n=n, bins=bins)
        for start in tqdm(range(0, W_dec.shape[0], LOGIT_ROWS), desc="logit effects", unit="chunk", leave=False)
    ]
    return LogitEffects(*(torch.cat(field) for field in zip(*parts, strict=True)))


def chunk_effects(scaled: torch.Tensor, W_U: torch.Tensor, buffer: torch.Tensor, *, n: int, bins: int) -> LogitEffects:
    """``logit_effects`` of a chunk of scaled decoder rows (chunk, d), its logits made in the
    first rows of ``buffer`` (at least chunk x vocab).

    After the matmul, each of torch's threads takes a block of rows (their top, bottom and
    histogram) on one thread of its own: split op by op instead, the histogram's many passes
    each paid a fork and a join (a 682-row chunk at load 7 on 2 cores: 978 ms CPU and 3.6 s wall,
    now 734 ms and 2.3 s; the rows' results do not depend on the split)."""
    logits = torch.matmul(scaled, W_U.T, out=buffer[: scaled.shape[0]])  # (chunk, vocab)
    workers = torch.get_num_threads()
    with one_thread(), ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(functools.partial(row_effects, n=n, bins=bins), logits.chunk(workers)))
    return LogitEffects(*(torch.cat(field) for field in zip(*parts, strict=True)))


def row_effects(logits: torch.Tensor, *, n: int, bins: int) -> LogitEffects:
    """``chunk_effects`` of a block of its logits (rows, vocab), which it overwrites."""
    top = extremes(logits, n, largest=True)
    bottom = extremes(logits, n, largest=False)
    lo, hi = bottom.values[:, 0], top.values[:, 0]  # the extremes: no pass of their own over the chunk
    return LogitEffects(top.indices, top.values, bottom.indices, bottom.values, lo, hi, row_histograms(logits, lo, hi, bins))


def extremes(values: torch.Tensor, n: int, *, largest: bool) -> Extremes:
    """``values.topk(n, dim=1, largest=largest)`` of (rows, m) values, exactly, at a third of its
    CPU (256 rows of a 49,152-token vocabulary: 43 ms for both ends, 14 ms so). Each row's top
    ``n`` lie in its ``n`` segments of ``SEGMENT`` values with the highest maxima (plus the tail
    that fills no segment), so topk runs over those alone. That is the row's answer whenever it is
    the only one: the ``n`` values found are strictly ordered, beat the next candidate and the best
    segment left out.
    A row with ties there (where topk's order among equal values decides) is ranked whole."""
    rows, m = values.shape
    segments = m // SEGMENT
    if segments < 4 * (n + 1):  # too few segments to leave many out
        return Extremes(*values.topk(n, dim=1, largest=largest))
    by_segment = values[:, : segments * SEGMENT].view(rows, segments, SEGMENT)
    best = (by_segment.amax(dim=2) if largest else by_segment.amin(dim=2)).topk(n + 1, dim=1, largest=largest)  # (rows, n + 1)
    within = torch.arange(SEGMENT)
    candidate = torch.cat(  # (rows, n * SEGMENT + tail) indices into the row
        [(best.indices[:, :n, None] * SEGMENT + within).view(rows, -1), torch.arange(segments * SEGMENT, m).expand(rows, -1)], dim=1
    )
    # n + 1 found: the n-th must also beat the next candidate, or a tie there decides the n-th
    found = values.gather(1, candidate).topk(n + 1, dim=1, largest=largest)
    ahead = torch.gt if largest else torch.lt
    certain = ahead(found.values[:, :-1], found.values[:, 1:]).all(dim=1) & ahead(found.values[:, n - 1], best.values[:, n])
    value, index = found.values[:, :n].contiguous(), candidate.gather(1, found.indices[:, :n])
    unsure = (~certain).nonzero().squeeze(1)
    if unsure.numel():
        whole = values[unsure].topk(n, dim=1, largest=largest)
        value[unsure], index[unsure] = whole.values, whole.indices
    return Extremes(value, index)


def row_histograms(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """(rows, m) values -> (rows, bins) counts over equal bins of each row's [lo, hi].
    Overwrites ``values`` (in-place passes: this runs over F x vocab elements). Each value's bin is
    truncated to an integer and counted within its row: added in float32 to a row offset before
    truncating, a value just under a bin edge rounded up into the next bin. A row at a time, so
    that its passes (shift, scale, clamp, truncate, count) stay in the core's cache: a row of a
    49,152-token vocabulary is 192 KB, where each pass over a block of rows went to memory (a
    2,048-row chunk on one thread: 0.19-0.32 CPU-s in blocks of 64 rows, 0.14-0.17 by row)."""
    scale = bins / (hi - lo).clamp(min=1e-12)  # (rows,)
    counts = torch.empty(values.shape[0], bins, dtype=torch.int64)
    index = torch.empty(values.shape[1], dtype=torch.int32)  # (m,) bin of each value of the row
    for row, value in enumerate(values):
        index.copy_(value.sub_(lo[row]).mul_(scale[row]).clamp_(0, bins - 1))  # truncates
        counts[row] = torch.bincount(index, minlength=bins)
    return counts


@torch.no_grad()
def decoder_neighbours(W_dec: torch.Tensor, *, n: int, memory_budget: int) -> Neighbours:
    """Top ``n`` other features by cosine similarity of decoder directions, a chunk of rows at a time."""
    n_features = W_dec.shape[0]
    unit = torch.nn.functional.normalize(W_dec, dim=1)  # (F, d)
    chunk = min(rows_per_chunk(4 * n_features, memory_budget), NEIGHBOUR_ROWS)
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
