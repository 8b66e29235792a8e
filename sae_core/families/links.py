"""Each feature's nearest features in another SAE on the same hook.

Two top-n lists per feature and direction: by cosine of decoder directions (exact, a chunk of
rows at a time, never the full n_a x n_b matrix) and by Jaccard of the token sets the features
fire on (from ``CoFiring``'s counts). A link is a pair in either list; it carries its exact cosine
and the three counts that give its Jaccard, so both numbers can be checked from the row alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae_core.families.cofiring import CoFiring, Shared
from sae_core.precompute.results import Neighbours, nonzero_entries, rows_per_chunk, top_in_rows

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


def jaccard_top(shared: Shared, occ_a: torch.Tensor, occ_b: torch.Tensor, *, n: int, memory_budget: int) -> Neighbours:
    """Top ``n`` features of b for each feature of a by Jaccard (ties: the lower feature of b),
    from the shared-token counts a chunk of a's rows at a time: never every pair ranked at once
    (that took 2.7 GB over a half-full 4,096 x 16,384 table, ~100k tokens)."""
    width_a, width_b = occ_a.numel(), occ_b.numel()
    tie = width_b - 1 - torch.arange(width_b)
    chunk = rows_per_chunk(128 * width_b, memory_budget)  # int64 counts, and ~15 int64s per pair if all co-fired
    parts = []
    for start in range(0, width_a, chunk):
        stop = min(start + chunk, width_a)
        i, j, both = nonzero_entries(shared.rows(start, stop), start)  # (m,) each: the pairs that co-fired
        score = both / (occ_a[i] + occ_b[j] - both)  # float32
        parts.append(top_in_rows(score, i - start, j, tie[j], rows=stop - start, n=n))
    return Neighbours(*(torch.cat(field) for field in zip(*parts, strict=True)))


@torch.no_grad()
def nearest_both_ways(unit_a: torch.Tensor, unit_b: torch.Tensor, *, n: int, memory_budget: int) -> tuple[Neighbours, Neighbours]:
    """Exact top ``n`` by cosine of b's rows for each row of a, and of a's rows for each row of b,
    from one pass over the a x b products, a chunk of a's rows at a time: each chunk's row tops
    are a's answers, and its column tops merge into b's running top n."""
    width_a, width_b = unit_a.shape[0], unit_b.shape[0]
    chunk = rows_per_chunk(4 * width_b, memory_budget)
    index, score = [], []
    back_index = torch.zeros(width_b, 0, dtype=torch.int64)  # (n_b, <= n) best rows of a so far
    back_score = torch.zeros(width_b, 0)
    for start in range(0, width_a, chunk):
        cos = unit_a[start : start + chunk] @ unit_b.T  # (chunk, n_b)
        top = cos.topk(min(n, width_b), dim=1)
        index.append(top.indices)
        score.append(top.values.double())
        col = cos.topk(min(n, cos.shape[0]), dim=0)  # (<= n, n_b)
        back_score = torch.cat([back_score, col.values.T], dim=1)
        back_index = torch.cat([back_index, col.indices.T + start], dim=1)
        best = back_score.topk(min(n, back_score.shape[1]), dim=1)
        back_score, back_index = best.values, back_index.gather(1, best.indices)
    return Neighbours(torch.cat(index), torch.cat(score)), Neighbours(back_index, back_score.double())


def pair_links(
    unit_a: torch.Tensor,
    unit_b: torch.Tensor,
    occ_a: torch.Tensor,
    occ_b: torch.Tensor,
    shared: Shared,
    by_cosine: Neighbours,
    *,
    n: int = TOP_N,
    memory_budget: int,
) -> Links:
    """Links a -> b. unit_a (n_a, d), unit_b (n_b, d): unit decoder rows; occ_a (n_a,), occ_b (n_b,):
    tokens each feature fires on; shared: ``CoFiring.shared(a, b)``; by_cosine: each feature
    of a's top n in b by cosine (``nearest_both_ways``)."""
    width_a, width_b = unit_a.shape[0], unit_b.shape[0]
    by_jaccard = jaccard_top(shared, occ_a, occ_b, n=n, memory_budget=memory_budget)
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
    return Links(source, target, cosine, shared.at(source, target), occ_a[source], occ_b[target])


def links_both_ways(
    unit_a: torch.Tensor, unit_b: torch.Tensor, cofiring: CoFiring, a: int, b: int, *, n: int = TOP_N, memory_budget: int
) -> tuple[Links, Links]:
    """Links a -> b and b -> a between SAEs a and b of ``cofiring`` (unit decoder rows given)."""
    cos_ab, cos_ba = nearest_both_ways(unit_a, unit_b, n=n, memory_budget=memory_budget)
    occ = cofiring.occurrences
    return (
        pair_links(unit_a, unit_b, occ[a], occ[b], cofiring.shared(a, b), cos_ab, n=n, memory_budget=memory_budget),
        pair_links(unit_b, unit_a, occ[b], occ[a], cofiring.shared(b, a), cos_ba, n=n, memory_budget=memory_budget),
    )
