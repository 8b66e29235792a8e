"""Co-firing across SAEs that read one hook, counted in the precompute pass.

Every batch's tokens go through every SAE of the set; a feature's token set is the tokens where it
is among the token's ``max_active`` largest activations (exactly where it fires, for TopK and
BatchTopK SAEs with k <= max_active, as for co-activation within one SAE). For each pair of SAEs
(a, b) and each pair of features (i of a, j of b) the accumulator counts the tokens in both sets,
so that Jaccard(i, j) = both / (count_i + count_j - both) needs nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations
from typing import NamedTuple

import torch

from sae_core.precompute.stats import SparseCounter, active_sets


class SparseActs(NamedTuple):
    """One SAE's activations on a batch's counted tokens, as sparse entries."""

    token: torch.Tensor  # (n,) counted token of each entry
    feature: torch.Tensor  # (n,)
    value: torch.Tensor  # (n,) > 0


class Shared(NamedTuple):
    """Tokens shared by the features of one SAE (rows) with those of another (columns)."""

    rows: Callable[[int, int], torch.Tensor]  # (start, stop) -> (stop - start, width_b) int64
    at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # i (m,), j (m,) -> (m,) int64


class PairCounts:
    """Tokens shared by feature i of SAE a and feature j of SAE b, under key i * n_b + j.

    A dense int32 table when the n_a x n_b counts fit the memory share (index_add: ~50x faster
    than sorting keys), else a ``SparseCounter``."""

    def __init__(self, n_a: int, n_b: int, *, dense: bool):
        self.n_b = n_b
        self.dense = torch.zeros(n_a * n_b, dtype=torch.int32) if dense else None
        self.sparse = None if dense else SparseCounter(with_sums=False)

    def add(self, keys: torch.Tensor) -> None:
        if self.dense is not None:
            self.dense.index_add_(0, keys, torch.ones(keys.shape, dtype=torch.int32))
        else:
            self.sparse.add(keys)

    def items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, counts) of every pair that shared a token, keys ascending."""
        if self.dense is not None:
            keys = self.dense.nonzero().squeeze(1)
            return keys, self.dense[keys].long()
        self.sparse.coalesce()
        return self.sparse.keys, self.sparse.counts

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        keys, counts = self.items()  # sparse either way: a checkpoint holds only what fired
        return {f"{prefix}.keys": keys, f"{prefix}.counts": counts}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        keys, counts = state[f"{prefix}.keys"], state[f"{prefix}.counts"]
        if self.dense is not None:
            self.dense.zero_()
            self.dense[keys] = counts.int()
        else:
            self.sparse.load_state_dict(
                {f"{prefix}.keys": keys, f"{prefix}.counts": counts, f"{prefix}.fixed_sums": torch.zeros(0, 2, dtype=torch.int64)},
                prefix,
            )


class CoFiring:
    """Per SAE, tokens each feature fires on; per pair of SAEs, tokens each pair of features shares.
    ``widths``: the SAEs' d_sae, in the order ``update`` receives their activations."""

    def __init__(self, widths: Sequence[int], *, max_active: int, memory_budget: int):
        self.widths = list(widths)
        self.max_active = max_active
        self.n_tokens = 0
        self.occurrences = [torch.zeros(w, dtype=torch.int64) for w in self.widths]
        pairs = sorted(combinations(range(len(self.widths)), 2), key=lambda ab: self.widths[ab[0]] * self.widths[ab[1]])
        room = memory_budget // 2  # dense tables, smallest first, while they fit half the budget
        self.pairs = {}
        for a, b in pairs:
            size = 4 * self.widths[a] * self.widths[b]
            self.pairs[a, b] = PairCounts(self.widths[a], self.widths[b], dense=size <= room)
            room -= size if size <= room else 0

    def update(self, acts: Sequence[SparseActs], n_tokens: int) -> None:
        """One batch: each SAE's activations over the same ``n_tokens`` counted tokens."""
        active = [active_sets(a.token, a.feature, a.value, n_tokens, self.max_active) for a in acts]  # (N, width) each
        self.n_tokens += n_tokens
        for sae, sets in enumerate(active):
            self.occurrences[sae] += torch.bincount(sets[sets >= 0], minlength=self.widths[sae])
        padded = [bool((sets < 0).any()) for sets in active]  # a TopK SAE's tokens fill every slot: no mask to apply
        for (a, b), counts in self.pairs.items():
            left, right = active[a].unsqueeze(2), active[b].unsqueeze(1)  # (N, wa, 1), (N, 1, wb)
            keys = left * self.widths[b] + right  # (N, wa, wb)
            if padded[a] or padded[b]:
                keys = keys[(left >= 0) & (right >= 0)]
            counts.add(keys.view(-1))

    def shared(self, a: int, b: int) -> Shared:
        """Tokens shared by features of SAE a with features of SAE b (either order): read from
        the dense table in place (transposed for b, a), or looked up in the sorted sparse keys."""
        for x, y in ((a, b), (b, a)):
            counts = self.pairs.get((x, y))
            if counts is not None and counts.dense is not None:
                table = counts.dense.view(self.widths[x], self.widths[y])
                table = table if x == a else table.T  # (width_a, width_b)
                return Shared(
                    lambda start, stop, t=table: t[start:stop].long(),
                    lambda i, j, t=table: t[i, j].long(),
                )
        keys, both = self.pair(a, b)
        width_b = self.widths[b]

        def rows(start: int, stop: int) -> torch.Tensor:
            lo, hi = torch.searchsorted(keys, torch.tensor([start * width_b, stop * width_b])).tolist()
            out = torch.zeros((stop - start) * width_b, dtype=torch.int64)
            out[keys[lo:hi] - start * width_b] = both[lo:hi]
            return out.view(stop - start, width_b)

        def at(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
            wanted = i * width_b + j
            if not keys.numel():
                return torch.zeros_like(wanted)
            where = torch.searchsorted(keys, wanted).clamp(max=keys.numel() - 1)
            return torch.where(keys[where] == wanted, both[where], 0)

        return Shared(rows, at)

    def pair(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features i of SAE a and j of SAE b (either order) that shared tokens: keys
        i * width_b + j ascending, and the number of tokens shared."""
        if (a, b) in self.pairs:
            return self.pairs[a, b].items()
        keys, counts = self.pairs[b, a].items()  # keys j * width_a + i
        swapped = (keys % self.widths[a]) * self.widths[b] + keys // self.widths[a]
        order = swapped.argsort()
        return swapped[order], counts[order]

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        state = {f"{prefix}.n_tokens": torch.tensor(self.n_tokens)}
        state.update({f"{prefix}.occurrences.{s}": o for s, o in enumerate(self.occurrences)})
        for (a, b), counts in self.pairs.items():
            state.update(counts.state_dict(f"{prefix}.pairs.{a}.{b}"))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self.n_tokens = int(state[f"{prefix}.n_tokens"])
        self.occurrences = [state[f"{prefix}.occurrences.{s}"].clone() for s in range(len(self.widths))]
        for (a, b), counts in self.pairs.items():
            counts.load_state_dict(state, f"{prefix}.pairs.{a}.{b}")
