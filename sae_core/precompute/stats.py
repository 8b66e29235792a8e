"""Streaming accumulators: every statistic precompute keeps about every feature, one batch at a time.

Each accumulator folds in the sparse activations of a batch with a few bincount / scatter / sort
calls over all features at once (no Python loop over features), and round-trips through
``state_dict`` so that a killed run resumes bit for bit. All of them merge exactly, which is what
sharding the corpus over workers needs (sae_core.precompute.merge): counts are integers, sums of
activations are kept in fixed point (``to_fixed``) so their total does not depend on the order of
addition, and sample priorities are unique per feature, so no tie depends on arrival order.

Activation bins before the maximum is known. A feature's histogram and its interval samples use
``FINE_BINS`` equal bins over (0, scale], where ``scale`` is the smallest power of two at or above
the feature's running maximum. When a batch raises the maximum past the scale, the scale doubles
d times and every 2^d neighbouring bins merge into one: counts add, and a bin's random-priority
sample is the top of the union of its parts, so nothing is lost or approximated. At the end the
maximum lies in (scale/2, scale], so (0, max] spans between FINE_BINS/2 and FINE_BINS fine bins;
the shown intervals are equal splits of those fine bins (edges snap to the fine grid, so each
interval's share and sample are exact).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch

FINE_BINS = 64  # fine bins over (0, scale]: >= 32 over (0, max], so 5 intervals snap within 1/32 of max
MASK32 = 0xFFFFFFFF
# Fraction bits of the fixed-point sums: values are float32, so every activation >= 2^-8 adds
# exactly and smaller ones lose < 2^-32; one coalesce can add 2^31 values to a slot before the
# fraction column could overflow.
FRACTION_BITS = 32
CONTEXT_BITS = 31  # low bits of a sample priority: the context id, unique up to 2^31 contexts


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block. The accumulators do hundreds of small scatters,
    sorts and gathers per batch: split over threads, each op pays a fork and a join, and when other
    work holds a core the join waits for a whole time slice (measured at load 6 on 2 cores: a
    50k-item ``ranks_within_groups`` in 0.02 CPU-s on one thread, 0.9 on two; a 3-width release's
    statistics 0.68 CPU-s per batch against 4.1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x, for x > 0 (exact: frexp, no logarithms)."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.ones_like(x), exponent - (mantissa == 0.5).to(exponent.dtype))


def fine_bin(value: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Fine bin g of each value: value in (g, g+1] * scale / FINE_BINS (exact: scale is a power of 2)."""
    return (torch.ceil(value / scale * FINE_BINS).long() - 1).clamp_(0, FINE_BINS - 1)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32-style); int64 arithmetic never overflows with 32-bit inputs."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    return (x >> 16) ^ x


def sample_priority(seed: int, context: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """Random priority in [0, 2^63) of a (context, feature) pair: a 32-bit hash, so it does not
    depend on batching, resuming or sharding, only on the seed; the context id in the low bits
    makes it unique within a feature, so which sample wins never depends on arrival order."""
    salted = mix32((context + seed * 0x9E3779B9) & MASK32)
    return (mix32(salted ^ feature) << CONTEXT_BITS) | (context & ((1 << CONTEXT_BITS) - 1))


def to_fixed(value: torch.Tensor) -> torch.Tensor:
    """(n,) float32 -> (n, 2) int64 fixed point: whole part and FRACTION_BITS bits of fraction."""
    v = value.double()  # exact, as is every step below (scaling by a power of two, floor)
    whole = torch.floor(v)
    return torch.stack([whole, torch.floor((v - whole) * 2.0**FRACTION_BITS)], dim=1).long()


def add_fixed(total: torch.Tensor, index: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """total (m, 2) += fixed (n, 2) at rows ``index`` (n,), in place, carries normalised. Integer
    addition, so the result does not depend on the order."""
    return carry_fixed(total.index_add_(0, index, fixed))


def carry_fixed(total: torch.Tensor) -> torch.Tensor:
    """Move whole units out of the fraction column of (m, 2) fixed-point sums, in place."""
    total[:, 0] += total[:, 1] >> FRACTION_BITS
    total[:, 1] &= (1 << FRACTION_BITS) - 1
    return total


def fixed_to_float(total: torch.Tensor) -> torch.Tensor:
    """(m, 2) fixed-point sums -> (m,) float64, rounded once."""
    return total[:, 0].double() + total[:, 1].double() * 2.0**-FRACTION_BITS


def ranks_within_groups(group: torch.Tensor, order_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort items by (group, order_key descending); return (permutation, rank of each item within
    its group). Ties keep input order."""
    by_key = torch.sort(order_key, descending=True, stable=True).indices
    perm = by_key[torch.sort(group[by_key], stable=True).indices]
    sorted_group = group[perm]
    _, counts = torch.unique_consecutive(sorted_group, return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return perm, torch.arange(perm.numel()) - starts


class FeatureStats:
    """Per feature: firing count, sum and max of activations, and the histogram of nonzero
    activations over FINE_BINS bins of (0, scale]."""

    def __init__(self, n_features: int):
        self.count = torch.zeros(n_features, dtype=torch.int64)
        self.fixed_sum = torch.zeros(n_features, 2, dtype=torch.int64)  # to_fixed units
        self.max = torch.zeros(n_features)
        self.scale = torch.zeros(n_features)  # power of two >= max; 0 until the feature fires
        self.hist = torch.zeros(n_features, FINE_BINS, dtype=torch.int64)

    def update(self, feature: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Fold in nonzero activations (n,); returns the doublings of each feature's scale (F,)."""
        n = self.count.numel()
        self.count += torch.bincount(feature, minlength=n)
        add_fixed(self.fixed_sum, feature, to_fixed(value))
        batch_max = torch.zeros(n).scatter_reduce_(0, feature, value, "amax")
        self.max = torch.maximum(self.max, batch_max)
        doublings = self._grow_scale(batch_max)
        bins = feature * FINE_BINS + fine_bin(value, self.scale[feature])
        self.hist.view(-1).add_(torch.bincount(bins, minlength=n * FINE_BINS))
        return doublings

    def _grow_scale(self, batch_max: torch.Tensor) -> torch.Tensor:
        grown = batch_max > self.scale
        new_scale = torch.where(grown, pow2_ceil(batch_max.clamp(min=1e-30)), self.scale)
        doublings = torch.zeros_like(self.count)
        had = grown & (self.scale > 0)
        doublings[had] = torch.log2(new_scale[had] / self.scale[had]).round().long()
        self.scale = new_scale
        rows = had.nonzero().squeeze(1)
        if rows.numel():
            self.hist[rows] = merge_fine_bins(self.hist[rows], doublings[rows])
        return doublings

    @property
    def sum(self) -> torch.Tensor:
        """(F,) float64 sum of each feature's activations."""
        return fixed_to_float(self.fixed_sum)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{name}": getattr(self, name) for name in ("count", "fixed_sum", "max", "scale", "hist")}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        for name in ("count", "fixed_sum", "max", "scale", "hist"):
            setattr(self, name, state[f"{prefix}.{name}"].clone())


def coarser_bin(doublings: torch.Tensor) -> torch.Tensor:
    """(rows,) doublings -> (rows, FINE_BINS) new fine bin of each old fine bin."""
    shift = doublings.clamp(max=FINE_BINS.bit_length()).unsqueeze(1)
    return torch.arange(FINE_BINS).unsqueeze(0) >> shift


def merge_fine_bins(hist: torch.Tensor, doublings: torch.Tensor) -> torch.Tensor:
    """(rows, FINE_BINS) counts over (0, s] -> counts over (0, s * 2^d], per row."""
    return torch.zeros_like(hist).scatter_add_(1, coarser_bin(doublings), hist)


class TopContexts:
    """Per feature, the K contexts with the largest maximum activation (one entry per context);
    ties go to the earlier context."""

    def __init__(self, n_features: int, k: int):
        self.value = torch.zeros(n_features, k)  # descending; 0 = empty slot
        self.context = torch.full((n_features, k), -1, dtype=torch.int64)

    def update(self, context_max: torch.Tensor, context_ids: torch.Tensor) -> None:
        """context_max: (B, F) max activation per context and feature; context_ids (B,) ascending,
        all later than any seen before."""
        k = self.value.shape[1]
        # Only a feature whose batch maximum beats its K-th value (0 while a slot is empty) gains
        # an entry; a tie goes to the earlier context, so every other row stays as it is. Once the
        # tables fill, that is a few features per batch instead of all of them.
        rows = (context_max.amax(dim=0) > self.value[:, -1]).nonzero().squeeze(1)
        values = torch.cat([self.value[rows], context_max[:, rows].T], dim=1)  # (rows, k + B)
        contexts = torch.cat([self.context[rows], context_ids.expand(rows.numel(), -1)], dim=1)
        order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
        value = values.gather(1, order)
        self.value[rows] = value
        self.context[rows] = torch.where(value > 0, contexts.gather(1, order), -1)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.value": self.value, f"{prefix}.context": self.context}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self.value = state[f"{prefix}.value"].clone()
        self.context = state[f"{prefix}.context"].clone()


class Reservoir:
    """For each of ``n_groups`` groups, the ``size`` items of highest priority seen so far."""

    def __init__(self, n_groups: int, size: int):
        self.priority = torch.full((n_groups, size), -1, dtype=torch.int64)  # -1 = empty slot
        self.context = torch.zeros((n_groups, size), dtype=torch.int64)
        self.value = torch.zeros((n_groups, size))

    def insert(self, group: torch.Tensor, priority: torch.Tensor, context: torch.Tensor, value: torch.Tensor) -> None:
        """Offer items (n,) to their groups. Only the top ``size`` per group can enter, and those
        arrive one rank at a time, each replacing its group's lowest slot when it beats it."""
        size = self.priority.shape[1]
        # An item at or below its group's lowest priority now can never enter (the lowest only
        # rises): dropping those first leaves the sort a small share of the items once groups fill.
        hopeful = (priority > self.priority[group].amin(dim=1)).nonzero().squeeze(1)
        group, priority, context, value = group[hopeful], priority[hopeful], context[hopeful], value[hopeful]
        perm, rank = ranks_within_groups(group, priority)
        for r in range(size):  # loops over slots, never over features
            pick = perm[rank == r]
            g = group[pick]
            slot = self.priority[g].argmin(dim=1)
            wins = priority[pick] > self.priority[g, slot]
            g, slot, pick = g[wins], slot[wins], pick[wins]
            self.priority[g, slot] = priority[pick]
            self.context[g, slot] = context[pick]
            self.value[g, slot] = value[pick]

    def fill(self, group: torch.Tensor, priority: torch.Tensor, context: torch.Tensor, value: torch.Tensor) -> None:
        """``insert`` into an empty reservoir, in one step: each group keeps its ``size`` items of
        highest priority (>= 0), the r-th highest in slot r, the slot ``insert`` gives it (its
        group's first empty one). Without ``insert``'s filter and loop over ranks: the intervals
        of a 16,384-wide SAE offer all 5 M fine-bin samples at once."""
        perm, rank = ranks_within_groups(group, priority)
        kept = rank < self.priority.shape[1]
        pick, slot = perm[kept], rank[kept]
        g = group[pick]
        self.priority[g, slot] = priority[pick]
        self.context[g, slot] = context[pick]
        self.value[g, slot] = value[pick]

    def take(self, groups: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Remove and return the filled items of ``groups`` as (group, priority, context, value)."""
        filled = self.priority[groups] >= 0
        slot_group = groups.unsqueeze(1).expand_as(filled)
        items = (slot_group[filled], self.priority[groups][filled], self.context[groups][filled], self.value[groups][filled])
        self.priority[groups] = -1
        return items

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{name}": getattr(self, name) for name in ("priority", "context", "value")}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        for name in ("priority", "context", "value"):
            setattr(self, name, state[f"{prefix}.{name}"].clone())


class IntervalSamples:
    """Per feature and fine bin, ``per_bin`` contexts sampled by random priority among those whose
    maximum activation falls in the bin. Merges with the histogram when a feature's scale grows."""

    def __init__(self, n_features: int, per_bin: int, seed: int):
        self.seed = seed
        self.reservoir = Reservoir(n_features * FINE_BINS, per_bin)

    def rescale(self, doublings: torch.Tensor) -> None:
        """Merge fine bins of features whose scale grew (doublings > 0) into the coarser grid."""
        features = (doublings > 0).nonzero().squeeze(1)
        if features.numel() == 0:
            return
        groups = (features.unsqueeze(1) * FINE_BINS + torch.arange(FINE_BINS)).reshape(-1)
        group, priority, context, value = self.reservoir.take(groups)
        feature, old_bin = group // FINE_BINS, group % FINE_BINS
        new_bin = old_bin >> doublings[feature].clamp(max=FINE_BINS.bit_length())
        self.reservoir.insert(feature * FINE_BINS + new_bin, priority, context, value)

    def update(self, context: torch.Tensor, feature: torch.Tensor, value: torch.Tensor, scale: torch.Tensor) -> None:
        """Offer (context, feature) pairs (n,) with their max activation value > 0."""
        group = feature * FINE_BINS + fine_bin(value, scale[feature])
        self.reservoir.insert(group, sample_priority(self.seed, context, feature), context, value)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return self.reservoir.state_dict(prefix)

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self.reservoir.load_state_dict(state, prefix)


class SparseCounter:
    """Counts (and optionally sums, in fixed point) over int64 keys too many to hold densely, e.g.
    (token, feature) or (feature, feature) pairs. New entries buffer until they outnumber half the
    sorted table, then are sorted on their own and merged into it: each merge copies the table
    once, so the total cost stays O(n log n), and a merge's transients scale with the buffer, not
    with table and buffer sorted together. (Merging at a quarter of the table copied a large table
    too often: a 16,384-wide SAE's co-activation pairs, 29.5 M, took 11.7 s against 8.5 sorted
    together, and 6.4-7.4 s merged at a half or at the whole table alike.)"""

    # entries buffered before the first merge: 256 k, 6 MB with sums. (A first coalesce at 4 M held
    # a 4,096-wide SAE's token pairs until its checkpoint after 100k tokens, then sorted 3.2 M
    # entries at once: ~250 MB of sorting and sums.)
    MIN_PENDING = 1 << 18

    def __init__(self, with_sums: bool):
        self.with_sums = with_sums
        self.keys = torch.zeros(0, dtype=torch.int64)  # sorted, unique
        self.counts = torch.zeros(0, dtype=torch.int64)
        self.fixed_sums = torch.zeros(0, 2, dtype=torch.int64)  # to_fixed units
        self._pending: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._pending_n = 0

    def add(self, keys: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        self._pending.append((keys, to_fixed(weights) if self.with_sums else None))
        self._pending_n += keys.numel()
        if self._pending_n > max(self.MIN_PENDING, self.keys.numel() // 2):
            self.coalesce()

    @property
    def sums(self) -> torch.Tensor:
        """(keys,) float64 sum of the weights added under each key."""
        return fixed_to_float(self.fixed_sums)

    def coalesce(self) -> None:
        """Fold buffered entries in: sort and sum the buffer alone, then merge it into the sorted
        table, so the transient memory scales with the buffer rather than with the table (sorting
        both together took ~5x the table's size at once). Sums are integers in fixed point, so the
        result does not depend on when coalescing happens."""
        if not self._pending:
            return
        keys = torch.cat([k for k, _ in self._pending])
        weights = torch.cat([w for _, w in self._pending]) if self.with_sums else None
        self._pending, self._pending_n = [], 0
        new_keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        new_counts = torch.bincount(inverse, minlength=new_keys.numel())
        new_sums = None
        if weights is not None:
            new_sums = add_fixed(torch.zeros(new_keys.numel(), 2, dtype=torch.int64), inverse, weights)
        del keys, weights, inverse
        self._merge(new_keys, new_counts, new_sums)

    def _merge(self, new_keys: torch.Tensor, new_counts: torch.Tensor, new_sums: torch.Tensor | None) -> None:
        """Merge sorted unique keys with their counts (and sums) into the table."""
        n = self.keys.numel()
        at = torch.searchsorted(self.keys, new_keys)
        known = self.keys[at.clamp(max=max(n - 1, 0))] == new_keys if n else torch.zeros_like(at, dtype=torch.bool)
        hit, fresh = known.nonzero().squeeze(1), (~known).nonzero().squeeze(1)
        self.counts.index_add_(0, at[hit], new_counts[hit])
        if new_sums is not None:
            add_fixed(self.fixed_sums, at[hit], new_sums[hit])
        if fresh.numel() == 0:
            return
        # The j-th fresh key lands after the j fresh keys before it and the old keys below it;
        # every old key moves up by the fresh keys that land below it.
        below = at[fresh]  # the old key each fresh one lands below (n: above them all)
        slots = below + torch.arange(fresh.numel())
        moved = torch.bincount(below, minlength=n + 1)[:n].cumsum_(0).add_(torch.arange(n))
        self.keys = _interleave(self.keys, moved, new_keys[fresh], slots)
        self.counts = _interleave(self.counts, moved, new_counts[fresh], slots)
        if new_sums is not None:
            self.fixed_sums = _interleave(self.fixed_sums, moved, new_sums[fresh], slots)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        self.coalesce()
        return {f"{prefix}.keys": self.keys, f"{prefix}.counts": self.counts, f"{prefix}.fixed_sums": self.fixed_sums}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self.keys = state[f"{prefix}.keys"].clone()
        self.counts = state[f"{prefix}.counts"].clone()
        self.fixed_sums = state[f"{prefix}.fixed_sums"].clone()
        self._pending, self._pending_n = [], 0


def _interleave(old: torch.Tensor, old_slots: torch.Tensor, fresh: torch.Tensor, fresh_slots: torch.Tensor) -> torch.Tensor:
    """Rows of ``old`` at ``old_slots`` and rows of ``fresh`` at ``fresh_slots``, together every
    slot of the result once."""
    out = torch.empty((old.shape[0] + fresh.shape[0], *old.shape[1:]), dtype=old.dtype)
    out[old_slots] = old
    out[fresh_slots] = fresh
    return out


class TrianglePairs:
    """Counts of feature pairs (i < j) in a dense int32 upper triangle, F (F - 1) / 2 slots: a
    scatter-add per batch where ``SparseCounter`` sorts the ~k^2 / 2 keys of every token (about
    10x the CPU). It reads as a ``SparseCounter`` without sums does (keys i * F + j ascending,
    counts), so merging across ranks and results are unchanged. A checkpoint saves the triangle
    itself, written from its own memory: listing its keys and counts took ~4x its size in
    temporaries (a 4,096-wide SAE's 34 MB triangle at 100k tokens: from ~1,290 to 1,435 MB), the
    peak of the whole precompute at the pass's last checkpoint. ``CoActivation`` restores either form into either counter."""

    with_sums = False
    fixed_sums = torch.zeros(0, 2, dtype=torch.int64)

    def __init__(self, n_features: int):
        self.n_features = n_features
        i = torch.arange(n_features)
        self.row_offset = i * (n_features - 1) - i * (i - 1) // 2 - i - 1  # slot of (i, j) = row_offset[i] + j
        self.table = torch.zeros(n_features * (n_features - 1) // 2, dtype=torch.int32)

    @staticmethod
    def fits(n_features: int, memory_budget: int) -> bool:
        """Whether the triangle takes at most an eighth of the budget (F <= 8,192 at the default 1 GiB)."""
        return 4 * n_features * (n_features - 1) // 2 <= memory_budget // 8

    def add(self, keys: torch.Tensor) -> None:
        """Count keys i * F + j (i < j) once each."""
        first = keys // self.n_features
        slots = self.row_offset[first] + (keys - first * self.n_features)
        self.table.scatter_add_(0, slots, torch.ones(slots.shape, dtype=torch.int32))

    def coalesce(self) -> None:
        """Nothing is pending: every key is counted as it is added."""

    @property
    def keys(self) -> torch.Tensor:
        slots = self.table.nonzero().squeeze(1)  # ascending, so the keys are too
        first = torch.searchsorted(self.row_offset + torch.arange(self.n_features) + 1, slots, right=True) - 1
        return first * self.n_features + (slots - self.row_offset[first])

    @property
    def counts(self) -> torch.Tensor:
        return self.table[self.table != 0].long()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """(stop - start, F) int64: the count of pair {i, j} for each i in [start, stop) and every
        j, 0 where j == i (both halves of the symmetric matrix, read from the one triangle)."""
        i = torch.arange(start, stop).unsqueeze(1)
        j = torch.arange(self.n_features).unsqueeze(0)
        slot = self.row_offset[torch.minimum(i, j)] + torch.maximum(i, j)  # (rows, F); off by one on the diagonal
        return self.table[slot.clamp_(min=0)].long().masked_fill_(i == j, 0)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.table": self.table}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        if f"{prefix}.table" in state:
            self.table.copy_(state[f"{prefix}.table"])
            return
        self.table.zero_()  # saved by a SparseCounter (a run resumed with a larger memory budget)
        keys = state[f"{prefix}.keys"]
        first = keys // self.n_features
        self.table[self.row_offset[first] + (keys - first * self.n_features)] = state[f"{prefix}.counts"].int()


def active_sets(acts_token: torch.Tensor, feature: torch.Tensor, value: torch.Tensor, n_tokens: int, max_active: int) -> torch.Tensor:
    """Sparse entries (n,) -> (n_tokens, width) each token's active features, padded with -1: its
    ``max_active`` largest (all of them for a TopK SAE with k <= max_active). Only the sets
    matter to callers, not the order within a row."""
    per_token = torch.bincount(acts_token, minlength=n_tokens)
    width = int(per_token.max()) if acts_token.numel() else 0
    if width <= max_active and bool((acts_token[1:] >= acts_token[:-1]).all()):
        # entries grouped by token (as sparse_encode gives them), none to drop: no sort needed
        rank = torch.arange(acts_token.numel()) - (torch.cumsum(per_token, 0) - per_token)[acts_token]
        keep = torch.arange(acts_token.numel())
    else:
        perm, rank = ranks_within_groups(acts_token, value)
        width = min(max_active, width)
        keep, rank = perm[rank < width], rank[rank < width]
    active = torch.full((n_tokens, width), -1, dtype=torch.int64)
    active[acts_token[keep], rank] = feature[keep]
    return active


class CoActivation:
    """Pair counts of features active on the same token, over the whole corpus.

    A token's active set is its ``max_active`` largest activations (all of them for a TopK SAE with
    k <= max_active), so the work per token is bounded by max_active^2 / 2 pairs.
    ``occurrences`` counts, per feature, the tokens whose active set holds it."""

    def __init__(self, n_features: int, max_active: int, memory_budget: int):
        self.n_features = n_features
        self.max_active = max_active
        self.occurrences = torch.zeros(n_features, dtype=torch.int64)
        dense = TrianglePairs.fits(n_features, memory_budget)
        self.pairs = TrianglePairs(n_features) if dense else SparseCounter(with_sums=False)  # key i * F + j, i < j

    def update(self, acts_token: torch.Tensor, feature: torch.Tensor, value: torch.Tensor, n_tokens: int) -> None:
        active = active_sets(acts_token, feature, value, n_tokens, self.max_active)  # (tokens, width)
        active = active.sort(dim=1).values  # padding (-1) first, then distinct features ascending
        width = active.shape[1]
        self.occurrences += torch.bincount(active[active >= 0], minlength=self.n_features)
        first, second = torch.triu_indices(width, width, offset=1)
        a, b = active[:, first].reshape(-1), active[:, second].reshape(-1)  # (tokens * pairs,), a < b where a >= 0
        if bool((active < 0).any()):  # some token has fewer than ``width`` features (a TopK SAE's never)
            both = a >= 0
            a, b = a[both], b[both]
        self.pairs.add(a * self.n_features + b)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.occurrences": self.occurrences, **self.pairs.state_dict(f"{prefix}.pairs")}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self.occurrences = state[f"{prefix}.occurrences"].clone()
        pairs = f"{prefix}.pairs"
        if isinstance(self.pairs, SparseCounter) and f"{pairs}.table" in state:  # saved dense: a smaller budget now
            dense = TrianglePairs(self.n_features)
            dense.load_state_dict(state, pairs)
            state = {f"{pairs}.keys": dense.keys, f"{pairs}.counts": dense.counts, f"{pairs}.fixed_sums": dense.fixed_sums}
        self.pairs.load_state_dict(state, pairs)


class TokenIndex:
    """Per (vocabulary token, feature): how often and how strongly it fires; and per token how
    often it occurs (non-special positions only)."""

    def __init__(self, n_features: int, vocab_size: int):
        self.n_features = n_features
        self.occurrences = torch.zeros(vocab_size, dtype=torch.int64)
        self.pairs = SparseCounter(with_sums=True)  # key token_id * F + feature

    def update(self, token_ids: torch.Tensor, acts_token_ids: torch.Tensor, feature: torch.Tensor, value: torch.Tensor) -> None:
        """token_ids: every counted token of the batch; acts_token_ids: the token id of each entry."""
        self.occurrences += torch.bincount(token_ids, minlength=self.occurrences.numel())
        self.pairs.add(acts_token_ids * self.n_features + feature, value)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.occurrences": self.occurrences, **self.pairs.state_dict(f"{prefix}.pairs")}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self.occurrences = state[f"{prefix}.occurrences"].clone()
        self.pairs.load_state_dict(state, f"{prefix}.pairs")


class BatchActs(NamedTuple):
    """One batch as the accumulators see it: counted (non-special) tokens and their activations."""

    context_ids: torch.Tensor  # (B,) ascending corpus ids
    token_context: torch.Tensor  # (N,) row in context_ids of each counted token
    token_ids: torch.Tensor  # (N,) vocabulary id of each counted token
    token: torch.Tensor  # (n,) entry -> counted token
    feature: torch.Tensor  # (n,)
    value: torch.Tensor  # (n,) > 0


class StreamingStats:
    """All accumulators of the first pass, fed one batch at a time."""

    def __init__(self, n_features: int, vocab_size: int, *, top_k: int, per_bin: int, max_active: int, seed: int, memory_budget: int):
        self.n_features = n_features
        self.n_tokens = torch.zeros((), dtype=torch.int64)
        self.features = FeatureStats(n_features)
        self.top = TopContexts(n_features, top_k)
        self.intervals = IntervalSamples(n_features, per_bin, seed)
        self.coact = CoActivation(n_features, max_active, memory_budget)
        self.tokens = TokenIndex(n_features, vocab_size)

    def update(self, batch: BatchActs) -> None:
        n = self.n_features
        self.n_tokens += batch.token_ids.numel()
        doublings = self.features.update(batch.feature, batch.value)
        self.intervals.rescale(doublings)
        entry_context = batch.token_context[batch.token]
        n_contexts = batch.context_ids.numel()
        context_max = torch.zeros(n_contexts * n).scatter_reduce_(
            0, entry_context * n + batch.feature, batch.value, "amax"
        )  # (B * F,)
        fired = context_max.nonzero().squeeze(1)
        self.top.update(context_max.view(n_contexts, n), batch.context_ids)
        self.intervals.update(batch.context_ids[fired // n], fired % n, context_max[fired], self.features.scale)
        self.coact.update(batch.token, batch.feature, batch.value, batch.token_ids.numel())
        self.tokens.update(batch.token_ids, batch.token_ids[batch.token], batch.feature, batch.value)

    def parts(self) -> dict[str, object]:
        return {
            "features": self.features,
            "top": self.top,
            "intervals": self.intervals,
            "coact": self.coact,
            "tokens": self.tokens,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"n_tokens": self.n_tokens}
        for prefix, part in self.parts().items():
            state.update(part.state_dict(prefix))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.n_tokens = state["n_tokens"].clone()
        for prefix, part in self.parts().items():
            part.load_state_dict(state, prefix)
