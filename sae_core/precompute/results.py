"""From the first pass's accumulators to what the store shows: intervals, neighbours by
co-activation, the token index, each feature's words and the density histogram. Vectorised over all features."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from sae_core.precompute.memory import give_back_freed
from sae_core.precompute.stats import (
    FINE_BINS,
    Reservoir,
    SparseCounter,
    StreamingStats,
    TrianglePairs,
    one_thread,
    ranks_within_groups,
)


class Intervals(NamedTuple):
    """Per feature, ``bins`` activation intervals over (0, max] and a random sample of each."""

    lo: torch.Tensor  # (F, bins) lower edge (exclusive)
    hi: torch.Tensor  # (F, bins) upper edge (inclusive)
    count: torch.Tensor  # (F, bins) nonzero token activations in the interval
    share: torch.Tensor  # (F, bins) count / all nonzero activations of the feature
    samples: Reservoir  # groups feature * bins + bin; per slot a context and its max activation
    n_fine: torch.Tensor  # (F,) fine bins covering (0, max], see fine_bins_to_max


def fine_bins_to_max(stats: StreamingStats) -> torch.Tensor:
    """(F,) number of fine bins covering (0, max]: in [FINE_BINS/2 + 1, FINE_BINS], 0 if never fired."""
    feats = stats.features
    ratio = torch.where(feats.scale > 0, feats.max / feats.scale.clamp(min=1e-30), torch.zeros(()))
    return torch.ceil(ratio * FINE_BINS).long()


def final_intervals(stats: StreamingStats, bins: int, per_bin: int) -> Intervals:
    """Split each feature's (0, max] into ``bins`` runs of fine bins of near-equal length: fine
    bin g of n goes to interval (g * bins) // n, so edges sit on the fine grid and both the
    shares and the samples are exact for the edges stored."""
    feats = stats.features
    n_fine = fine_bins_to_max(stats)  # (F,)
    n_safe = n_fine.clamp(min=1).unsqueeze(1)
    interval_of = (torch.arange(FINE_BINS).unsqueeze(0) * bins // n_safe).clamp(max=bins - 1)  # (F, G)
    count = torch.zeros(feats.hist.shape[0], bins, dtype=torch.int64).scatter_add_(1, interval_of, feats.hist)
    share = count / feats.count.clamp(min=1).unsqueeze(1)
    starts = (torch.arange(bins + 1).unsqueeze(0) * n_safe + bins - 1) // bins  # (F, bins + 1) fine-bin index
    edges = starts * (feats.scale / FINE_BINS).unsqueeze(1)
    fine = stats.intervals.reservoir
    filled = (fine.priority >= 0).nonzero()  # (m, 2) rows: group, slot
    group, slot = filled[:, 0], filled[:, 1]
    feature, g = group // FINE_BINS, group % FINE_BINS
    samples = Reservoir(feats.hist.shape[0] * bins, per_bin)
    samples.fill(
        feature * bins + interval_of[feature, g],
        fine.priority[group, slot],
        fine.context[group, slot],
        fine.value[group, slot],
    )
    return Intervals(lo=edges[:, :-1], hi=edges[:, 1:], count=count, share=share, samples=samples, n_fine=n_fine)


def ordered_samples(samples: Reservoir) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(groups, size) contexts and values of each group in descending priority, and a mask of
    filled slots."""
    order = samples.priority.argsort(dim=1, descending=True, stable=True)
    filled = samples.priority.gather(1, order) >= 0
    return samples.context.gather(1, order), samples.value.gather(1, order), filled


def rows_per_chunk(row_bytes: int, memory_budget: int) -> int:
    """Rows of ``row_bytes`` each such that a few such chunks fit ``memory_budget`` bytes."""
    return max(1, memory_budget // (4 * row_bytes))


class Neighbours(NamedTuple):
    index: torch.Tensor  # (F, n) neighbour feature, -1 where fewer exist
    score: torch.Tensor  # (F, n)


def coactivation_neighbours(stats: StreamingStats, n: int, *, memory_budget: int) -> Neighbours:
    """Top ``n`` features by Jaccard similarity of their active-token sets,
    |A ∩ B| / |A ∪ B|: symmetric, in [0, 1], and not dominated by the densest features the way raw
    counts are. A chunk of rows of the symmetric pair counts at a time, so memory is bounded by the
    budget, not by the number of pairs (ranking every pair at once took 1.3 GB over the 7.5 M pairs
    of a 4,096-wide SAE at ~100k tokens). Only pairs that co-fired can be neighbours, so each chunk
    is scored and ranked over those alone (scoring every entry of dense chunks, F x F in all, took
    21 of the 16,384-wide SAE's 63 CPU-seconds of results at 16k tokens, for its 1 M pairs). Ties go
    to the features after this one first, then wrap around: i + 1, ..., F - 1, 0, ..., i - 1.
    On one thread: small sorts and gathers, which two threads ran 9x slower in CPU-seconds at load 10."""
    coact, n_features = stats.coact, stats.n_features
    # ~15 int64s per pair entry; rows_per_chunk's quarter of the budget, quartered again: the chunk
    # is ranked on top of all the pass holds, and a quarter of 1 GB raised the peak of a 4,096-wide
    # SAE's precompute at 100k tokens from ~1,160 to ~1,300 MiB (a sixteenth: no rise, same time)
    chunk = rows_per_chunk(4 * 128 * n_features, memory_budget)
    parts = []
    with one_thread():
        entries = pair_entries(coact.pairs, n_features)
        for start in range(0, n_features, chunk):
            stop = min(start + chunk, n_features)
            i, j, both = entries(start, stop)  # (m,) each
            jaccard = both / (coact.occurrences[i] + coact.occurrences[j] - both)  # (m,) float32
            parts.append(top_in_rows(jaccard, i - start, j, (i - j) % n_features, rows=stop - start, n=n))
    give_back_freed()  # the chunks' temporaries, before the rows are made and written
    return Neighbours(*(torch.cat(field) for field in zip(*parts, strict=True)))


def top_in_rows(score: torch.Tensor, row: torch.Tensor, col: torch.Tensor, tie: torch.Tensor, *, rows: int, n: int) -> Neighbours:
    """The ``n`` columns of highest score in each of ``rows`` rows, from entries (m,) of a sparse
    matrix of float32 scores >= 0; among equal scores the larger ``tie`` (int64 in [0, 2^32),
    distinct within a row) first; -1 and 0 where a row has fewer entries. One int64 key per entry
    (a float >= 0 orders as its bits do) and one ranking of the entries."""
    key = (score.view(torch.int32).long() << 32).add_(tie)
    perm, rank = ranks_within_groups(row, key)
    kept = rank < n
    chosen, rank = perm[kept], rank[kept]
    index = torch.full((rows, n), -1, dtype=torch.int64)
    value = torch.zeros(rows, n, dtype=torch.float64)
    index[row[chosen], rank] = col[chosen]
    value[row[chosen], rank] = score[chosen].double()
    return Neighbours(index, value)


PairEntries = Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def pair_entries(pairs: TrianglePairs | SparseCounter, n_features: int) -> PairEntries:
    """``entries(start, stop)``: (i, j, count) of every pair {i, j} that co-fired, for each i in
    [start, stop) (both halves of the symmetric counts, in no particular order)."""
    if isinstance(pairs, TrianglePairs):
        return lambda start, stop: nonzero_entries(pairs.rows(start, stop), start)
    return sparse_entries(pairs, n_features)


def nonzero_entries(both: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nonzero entries (i, j, count) of rows ``start``, ``start + 1``, ... of the pair counts."""
    row, col = both.nonzero(as_tuple=True)
    return row + start, col, both[row, col]


def sparse_entries(pairs: SparseCounter, n_features: int) -> PairEntries:
    """``pair_entries`` of pair counts held sparse (keys i * F + j, i < j, ascending): a chunk's
    pairs as i are a range of the keys, and as j a range of them ordered by j."""
    pairs.coalesce()
    keys, counts = pairs.keys, pairs.counts
    first, second = keys // n_features, keys % n_features
    second_sorted, by_second = second.sort()

    def entries(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lo, hi = torch.searchsorted(keys, torch.tensor([start * n_features, stop * n_features])).tolist()
        lo_j, hi_j = torch.searchsorted(second_sorted, torch.tensor([start, stop])).tolist()
        pick = by_second[lo_j:hi_j]
        return (
            torch.cat([first[lo:hi], second[pick]]),
            torch.cat([second[lo:hi], first[pick]]),
            torch.cat([counts[lo:hi], counts[pick]]),
        )

    return entries


class TokenFeatures(NamedTuple):
    """Rows of the token index: for each vocabulary token, the features with the highest mean
    activation on it (zeros included), best first."""

    token_id: torch.Tensor  # (m,)
    rank: torch.Tensor  # (m,)
    feature: torch.Tensor  # (m,)
    mean_act: torch.Tensor  # (m,) float64
    count: torch.Tensor  # (m,) firings on the token


def token_feature_pairs(stats: StreamingStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(token id, feature) of every pair the pass counted, in the order of ``stats.tokens.pairs``."""
    stats.tokens.pairs.coalesce()
    keys = stats.tokens.pairs.keys
    return keys // stats.n_features, keys % stats.n_features


def token_index(stats: StreamingStats, per_token: int) -> TokenFeatures:
    tokens = stats.tokens
    token_id, feature = token_feature_pairs(stats)
    mean = tokens.pairs.sums / tokens.occurrences[token_id]
    perm, rank = ranks_within_groups(token_id, mean)
    keep = rank < per_token
    chosen = perm[keep]
    return TokenFeatures(token_id[chosen], rank[keep], feature[chosen], mean[chosen], tokens.pairs.counts[chosen])


class FeatureWords(NamedTuple):
    """Each feature's words: the vocabulary tokens it fires on most often, a feature's together
    and most firings first (ties by token id)."""

    feature: torch.Tensor  # (m,) ascending
    token_id: torch.Tensor  # (m,)
    count: torch.Tensor  # (m,) firings on the token
    occurrences: torch.Tensor  # (m,) the token's occurrences in the corpus


def feature_words(stats: StreamingStats, per_feature: int) -> FeatureWords:
    token_id, feature = token_feature_pairs(stats)
    counts = stats.tokens.pairs.counts
    perm, rank = ranks_within_groups(feature, counts)
    keep = rank < per_feature
    chosen = perm[keep]
    token_id = token_id[chosen]
    return FeatureWords(feature[chosen], token_id, counts[chosen], stats.tokens.occurrences[token_id])


def density_histogram(count: torch.Tensor, n_tokens: int, bins: int = 40) -> dict:
    """Histogram of log10(firing rate) over features that fired, from log10(1 / n_tokens) to 0;
    features that never fired are counted as ``dead``."""
    alive = count > 0
    low = -torch.log10(torch.tensor(float(max(n_tokens, 2))))
    edges = torch.linspace(float(low), 0.0, bins + 1)
    density = torch.log10(count[alive].double() / max(n_tokens, 1)).float()
    counts = torch.histc(density, bins=bins, min=float(low), max=0.0) if density.numel() else torch.zeros(bins)
    return {
        "edges": [round(float(e), 4) for e in edges],
        "counts": [int(c) for c in counts],
        "dead": int((~alive).sum()),
        "measured_over_tokens": int(n_tokens),
    }
