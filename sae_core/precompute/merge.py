"""Merge precompute's streaming accumulators (sae_core.precompute.stats) across ranks, exactly.

Each rank streams a contiguous block of the corpus into its own ``StreamingStats``; afterwards
``reduce_stats`` folds them into rank 0's, and the result is bit for bit what one process
streaming the whole corpus would hold:

- counts, fixed-point sums and histograms are integers: all-reduced (sums of integers do not
  depend on the order); maxima all-reduced with max;
- a feature's histogram and interval samples live on a grid over (0, scale], scale a power of
  two: every rank first coarsens its grid to the largest scale of any rank (bins merge exactly,
  as when one process sees its maximum grow);
- top-K contexts: every rank's K candidates per feature gathered, then the K best by (value
  descending, context ascending), the order one process keeps;
- interval samples: the filled reservoir slots gathered and offered to rank 0's reservoir; the
  top ``per_bin`` priorities of a union are the top of the tops, and priorities are unique;
- sparse pair counters: keys gathered and coalesced.
"""

from __future__ import annotations

import torch

from sae_core.inputs import distributed
from sae_core.precompute.stats import (
    Reservoir,
    SparseCounter,
    StreamingStats,
    TopContexts,
    add_fixed,
    carry_fixed,
    merge_fine_bins,
)


def reduce_stats(stats: StreamingStats) -> StreamingStats | None:
    """Every rank's ``stats`` merged into rank 0's (returned there); None on the other ranks."""
    if distributed.world().size == 1:
        return stats
    align_scales(stats)
    reduce_dense(stats)
    top = merge_top(stats.top)
    samples = merge_reservoir(stats.intervals.reservoir)
    coact_pairs = merge_counter(stats.coact.pairs, "co-activation counts")
    token_pairs = merge_counter(stats.tokens.pairs, "the token index")
    if not distributed.is_main():
        return None
    stats.top, stats.intervals.reservoir = top, samples
    stats.coact.pairs, stats.tokens.pairs = coact_pairs, token_pairs
    return stats


def align_scales(stats: StreamingStats) -> None:
    """Coarsen every rank's histograms and interval grids to the largest scale of any rank."""
    feats = stats.features
    scale = distributed.all_reduce(feats.scale.clone(), "max", step="merging activation scales")
    had = feats.scale > 0
    doublings = torch.zeros_like(feats.count)
    doublings[had] = torch.log2(scale[had] / feats.scale[had]).round().long()
    rows = (doublings > 0).nonzero().squeeze(1)
    if rows.numel():
        feats.hist[rows] = merge_fine_bins(feats.hist[rows], doublings[rows])
    stats.intervals.rescale(doublings)
    feats.scale = scale


def reduce_dense(stats: StreamingStats) -> None:
    """All-reduce the per-feature and per-token integer sums and the maxima."""
    feats = stats.features
    for name, tensor in {
        "token counts": stats.n_tokens,
        "firing counts": feats.count,
        "activation sums": feats.fixed_sum,
        "histograms": feats.hist,
        "co-activation occurrences": stats.coact.occurrences,
        "token occurrences": stats.tokens.occurrences,
    }.items():
        distributed.all_reduce(tensor, "sum", step=f"merging {name}")
    carry_fixed(feats.fixed_sum)
    distributed.all_reduce(feats.max, "max", step="merging maxima")


def merge_top(top: TopContexts) -> TopContexts | None:
    """The K best contexts per feature over all ranks' candidates (on rank 0)."""
    values = distributed.gather_ragged(top.value.T.contiguous(), step="merging top examples")  # k rows per rank
    contexts = distributed.gather_ragged(top.context.T.contiguous(), step="merging top examples")
    if values is None:
        return None
    n, k = top.value.shape
    value, context = torch.cat(values).T, torch.cat(contexts).T  # (F, ranks * k)
    empty = context < 0
    context_key = torch.where(empty, torch.iinfo(torch.int64).max, context)
    by_context = context_key.argsort(dim=1, stable=True)
    by_value = value.gather(1, by_context).argsort(dim=1, descending=True, stable=True)
    order = by_context.gather(1, by_value)[:, :k]
    merged = TopContexts(n, k)
    merged.value = value.gather(1, order)
    merged.context = torch.where(merged.value > 0, context.gather(1, order), -1)
    return merged


def merge_reservoir(reservoir: Reservoir) -> Reservoir | None:
    """Rank 0's reservoir after every other rank's filled slots are offered to it."""
    filled = (reservoir.priority >= 0).nonzero()  # (m, 2): group, slot
    group, slot = filled[:, 0], filled[:, 1]
    items = torch.stack(
        [group, reservoir.priority[group, slot], reservoir.context[group, slot], reservoir.value[group, slot].view(torch.int32).long()],
        dim=1,
    )  # (m, 4) int64; the float32 value travels as its bits
    parts = distributed.gather_ragged(items, step="merging interval samples")
    if parts is None:
        return None
    for part in parts[1:]:
        value = part[:, 3].int().view(torch.float32)
        reservoir.insert(part[:, 0], part[:, 1], part[:, 2], value)
    return reservoir


def merge_counter(counter: SparseCounter, what: str) -> SparseCounter | None:
    """A counter holding the union of every rank's keys, with counts and sums added (on rank 0)."""
    counter.coalesce()
    columns = [counter.keys.unsqueeze(1), counter.counts.unsqueeze(1)]
    if counter.with_sums:
        columns.append(counter.fixed_sums)
    parts = distributed.gather_ragged(torch.cat(columns, dim=1), step=f"merging {what}")
    if parts is None:
        return None
    table = torch.cat(parts)  # (entries, 2 or 4): key, count[, whole, fraction]
    keys, inverse = torch.unique(table[:, 0], sorted=True, return_inverse=True)
    merged = SparseCounter(with_sums=counter.with_sums)
    merged.keys = keys
    merged.counts = torch.zeros_like(keys).index_add_(0, inverse, table[:, 1])
    if counter.with_sums:
        merged.fixed_sums = add_fixed(torch.zeros(keys.numel(), 2, dtype=torch.int64), inverse, table[:, 2:])
    return merged
