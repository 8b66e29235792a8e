"""Each feature's nearest features in another SAE on the same hook.

Two top-n lists per feature and direction: by cosine of decoder directions (exact, a chunk of
rows at a time, never the full n_a x n_b matrix) and by Jaccard of the token sets the features
fire on (from ``CoFiring``'s counts). A link is a pair in either list; it carries its exact cosine
and the three counts that give its Jaccard, so both numbers can be checked from the row alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae_core.precompute.results import top_per_group
from sae_core.precompute.weights import nearest_rows

TOP_N = 5  # links kept per feature, other SAE and measure: a family, not a neighbourhood


class Links(NamedTuple):
    """Links from features of SAE a (source) to features of SAE b (target), source ascending."""

    source: torch.Tensor  # (m,) feature of a
    target: torch.Tensor  # (m,) feature of b
    cosine: torch.Tensor  # (m,) float64 cosine of their decoder directions
    n_both: torch.Tensor  # (m,) int64 tokens where both fire
    n_source: torch.Tensor  # (m,) tokens where the source fires
    n_target: torch.Tensor  # (m,) tokens where the target fires

    @property
    def jaccard(self) -> torch.Tensor:
        union = self.n_source + self.n_target - self.n_both
        return torch.where(union > 0, self.n_both.double() / union.clamp(min=1), 0.0)


def unit_directions(W_dec: torch.Tensor) -> torch.Tensor:
    """(F, d) decoder rows -> unit rows (float32); a zero row stays zero."""
    return torch.nn.functional.normalize(W_dec.detach().float(), dim=1)


def jaccard_top(keys, both, occ_a, occ_b, *, n: int):
    """Top ``n`` features of b for each feature of a by Jaccard, from the pair counts."""
    width_b = occ_b.numel()
    i, j = keys // width_b, keys % width_b
    score = both / (occ_a[i] + occ_b[j] - both)
    return top_per_group(i, j, score, n_groups=occ_a.numel(), n=n)


def pair_links(
    unit_a: torch.Tensor,
    unit_b: torch.Tensor,
    occ_a: torch.Tensor,
    occ_b: torch.Tensor,
    keys: torch.Tensor,
    both: torch.Tensor,
    *,
    n: int = TOP_N,
    memory_budget: int,
) -> Links:
    """Links a -> b. unit_a (n_a, d), unit_b (n_b, d): unit decoder rows; occ_a (n_a,), occ_b (n_b,):
    tokens each feature fires on; keys, both: ``CoFiring.pair(a, b)``."""
    width_a, width_b = unit_a.shape[0], unit_b.shape[0]
    by_cosine = nearest_rows(unit_a, unit_b, n=n, memory_budget=memory_budget)
    by_jaccard = jaccard_top(keys, both, occ_a, occ_b, n=n)
    rows = torch.arange(width_a).unsqueeze(1)
    candidates = torch.cat(
        [
            (rows * width_b + by_cosine.index).reshape(-1),
            (rows * width_b + by_jaccard.index)[by_jaccard.index >= 0],
        ]
    )
    pairs = torch.unique(candidates)  # sorted: source ascending, then target
    source, target = pairs // width_b, pairs % width_b
    cosine = (unit_a[source] * unit_b[target]).sum(dim=1).double()
    n_both = torch.zeros_like(pairs)
    if keys.numel():  # the pairs that shared tokens: a binary search in the sorted keys
        where = torch.searchsorted(keys, pairs).clamp(max=keys.numel() - 1)
        n_both = torch.where(keys[where] == pairs, both[where], 0)
    return Links(source, target, cosine, n_both, occ_a[source], occ_b[target])
