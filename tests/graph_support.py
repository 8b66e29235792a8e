"""A store with a release of random TopK SAEs on three layers of the tiny Llama, for the graph
tests (CLI, jobs, pages). Layer 2's SAE is the synthetic store's, labels and examples included
(feature 0's label holds a <script> tag)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from sae_core.store.db import ReleaseRow, SaeRow, create_engine_for, utcnow
from tests.live_support import LIVE_STORE, build_live_store, random_sae

RELEASE = "tiny-release"
GRAPH_LAYERS = (0, 1, 2)


def build_graph_store(folder: Path) -> str:
    url = build_live_store(folder)
    engine = create_engine_for(url)
    with engine.begin() as conn:
        base = conn.execute(sa.select(SaeRow)).mappings().one()
        release_id = conn.execute(
            sa.insert(ReleaseRow)
            .values(name=RELEASE, model_id=base["model_id"], created_at=utcnow())
            .returning(ReleaseRow.id)
        ).scalar_one()
        conn.execute(sa.update(SaeRow).values(release_id=release_id))
        for layer in GRAPH_LAYERS:
            if layer == base["layer"]:
                continue
            path = folder / f"sae-l{layer}"
            random_sae(
                32, d_sae=LIVE_STORE.n_features, architecture="topk", k=8, layer=layer, seed=layer
            ).save(path)
            row = {k: v for k, v in base.items() if k != "id"}
            row.update(name=f"tiny-l{layer}", layer=layer, path=str(path), release_id=release_id)
            conn.execute(sa.insert(SaeRow).values(**row))
    engine.dispose()
    return url
