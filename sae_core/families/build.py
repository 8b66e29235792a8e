"""Links and map of a set of SAEs on one hook, computed from their decoders and the co-firing
counts of the precompute pass, and written to the store in one transaction."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import combinations
from typing import NamedTuple

import numpy as np
import sqlalchemy as sa
import torch
from sqlalchemy.engine import Engine

from sae_core.families.cofiring import CoFiring
from sae_core.families.layout import feature_layout
from sae_core.families.links import TOP_N, Links, links_both_ways, unit_directions
from sae_core.precompute.writer import insert_rows
from sae_core.store.families import FeatureLinkRow, FeatureMapRow, mark_mapped


class FamilySae(NamedTuple):
    sae_id: int  # the published row
    W_dec: torch.Tensor  # (d_sae, d_in)


class FamiliesResult(NamedTuple):
    n_links: int
    n_points: int


def all_links(saes: Sequence[FamilySae], cofiring: CoFiring, *, memory_budget: int) -> Iterator[tuple[int, int, Links]]:
    """(a, b, links a -> b) for every ordered pair of SAEs in the set (positions in ``saes``)."""
    units = [unit_directions(s.W_dec) for s in saes]
    for a, b in combinations(range(len(saes)), 2):
        forward, backward = links_both_ways(units[a], units[b], cofiring, a, b, n=TOP_N, memory_budget=memory_budget)
        yield a, b, forward
        yield b, a, backward


def link_rows(sae_id: int, other_id: int, links: Links) -> Iterator[dict]:
    columns = zip(
        links.source.tolist(), links.target.tolist(), links.cosine.tolist(),
        links.n_both.tolist(), links.n_source.tolist(), links.n_target.tolist(), strict=True,
    )  # fmt: skip
    for source, target, cosine, both, n_self, n_other in columns:
        yield dict(sae_id=sae_id, feature_idx=source, other_sae_id=other_id, other_idx=target,
                   cosine=cosine, n_both=both, n_self=n_self, n_other=n_other)  # fmt: skip


def build_families(
    engine: Engine,
    saes: Sequence[FamilySae],
    cofiring: CoFiring,
    *,
    memory_budget: int,
    seed: int = 0,
    positions: Sequence[np.ndarray] | None = None,
) -> FamiliesResult:
    """Replace the links and map positions of ``saes`` (SAEs of one release on one hook, in the
    order ``cofiring`` counted them). ``positions``: their map if it was made already
    (``feature_layout`` of ``map_units(saes)``), else it is made here."""
    ids = [s.sae_id for s in saes]
    links = [(saes[a].sae_id, saes[b].sae_id, found) for a, b, found in all_links(saes, cofiring, memory_budget=memory_budget)]
    if positions is None:
        positions = feature_layout(map_units(saes), seed=seed, memory_budget=memory_budget)
    with engine.begin() as conn:
        for table in (FeatureLinkRow, FeatureMapRow):
            conn.execute(sa.delete(table).where(table.sae_id.in_(ids)))
        n_links = insert_rows(conn, FeatureLinkRow, (row for a, b, found in links for row in link_rows(a, b, found)))
        n_points = insert_rows(conn, FeatureMapRow, map_rows(ids, positions))
        mark_mapped(conn, ids)
    return FamiliesResult(n_links, n_points)


def map_units(saes: Sequence[FamilySae]) -> list[torch.Tensor]:
    """What the map places: each SAE's unit decoder rows."""
    return [unit_directions(s.W_dec) for s in saes]


def map_rows(ids: Sequence[int], positions: Sequence[np.ndarray]) -> Iterator[dict]:
    for sae_id, points in zip(ids, positions, strict=True):
        for index, (x, y) in enumerate(points.tolist()):
            yield dict(sae_id=sae_id, feature_idx=index, x=x, y=y)
