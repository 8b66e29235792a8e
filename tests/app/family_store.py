"""A synthetic release of three SAEs on one layer (48, 96 and 192 features, the synthetic store's
features each) with planted family links and a feature map, for the family pages' tests.

Planted (``Family``): feature 1 of the smallest SAE ("capital cities like Paris") has children
0, 10 and 11 in the middle SAE (0 is labelled ``<script>alert(1)</script> tags``); feature 20 of
the largest is a child of both 10 and 11 (a graph, not a tree). Every feature of the three SAEs
has a place on the map.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sae_core.store.db import SaeRow
from sae_core.store.families import FeatureLinkRow, FeatureMapRow, mark_mapped
from sae_core.store.releases import join_release
from tests.app.synthetic_store import StoreSpec, build_synthetic_store

RELEASE = "tiny-release"
SAES = (("tiny-48", 48), ("tiny-96", 96), ("tiny-192", 192))
# (from SAE, feature, to SAE, feature, cosine, n_both, n_self, n_other): each stored both ways
LINKS = (
    ("tiny-48", 1, "tiny-96", 0, 0.91, 50, 100, 60),
    ("tiny-48", 1, "tiny-96", 10, 0.85, 40, 100, 45),
    ("tiny-48", 1, "tiny-96", 11, 0.62, 30, 100, 35),
    ("tiny-96", 10, "tiny-192", 20, 0.80, 20, 45, 25),
    ("tiny-96", 11, "tiny-192", 20, 0.70, 15, 35, 25),
    ("tiny-48", 2, "tiny-96", 5, 0.20, 1, 80, 90),  # a weak link, under the default threshold
)


class Family(NamedTuple):
    release: str = RELEASE
    parent: tuple[str, int] = ("tiny-48", 1)
    children: tuple[tuple[str, int], ...] = (("tiny-96", 0), ("tiny-96", 10), ("tiny-96", 11))
    grandchild: tuple[str, int] = ("tiny-192", 20)
    script_child: tuple[str, int] = ("tiny-96", 0)


def build_family_store(engine: Engine) -> Family:
    model_id = None
    for name, width in SAES:
        build_synthetic_store(engine, StoreSpec(sae_name=name, n_features=width, n_contexts=60), model_id=model_id)
        with engine.connect() as conn:
            model_id = conn.scalar(sa.select(SaeRow.model_id).where(SaeRow.name == name))
    rng = np.random.default_rng(0)
    with engine.begin() as conn:
        ids = {name: conn.scalar(sa.select(SaeRow.id).where(SaeRow.name == name)) for name, _ in SAES}
        for sae_id in ids.values():
            join_release(conn, sae_id, RELEASE)
        rows = []
        for a, i, b, j, cosine, both, n_a, n_b in LINKS:
            rows.append(dict(sae_id=ids[a], feature_idx=i, other_sae_id=ids[b], other_idx=j, cosine=cosine, n_both=both, n_self=n_a, n_other=n_b))
            rows.append(dict(sae_id=ids[b], feature_idx=j, other_sae_id=ids[a], other_idx=i, cosine=cosine, n_both=both, n_self=n_b, n_other=n_a))
        conn.execute(sa.insert(FeatureLinkRow), rows)
        conn.execute(
            sa.insert(FeatureMapRow),
            [
                dict(sae_id=ids[name], feature_idx=f, x=float(x), y=float(y))
                for name, width in SAES
                for f, (x, y) in enumerate(rng.uniform(0, 1, (width, 2)))
            ],
        )
        mark_mapped(conn, ids.values())
    return Family()
