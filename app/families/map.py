"""A release as a whole: the feature map of one of its hooks (where UMAP placed the features at
precompute), and a feature search over all of its SAEs."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.families.schemas import (
    FeatureMapPublic,
    MapSaePublic,
    ReleaseResultsPublic,
    SaeResultsPublic,
)
from app.prepared import PreparedJSON
from app.schemas import FeatureSearch
from app.search import search_features
from app.store_cache import StoreCache, label_version, published
from sae_core.errors import NotFoundError
from sae_core.store.db import FeatureRow
from sae_core.store.families import FeatureMapRow
from sae_core.store.lookup import find_release
from sae_core.store.releases import list_releases, release_saes


class NoMapError(NotFoundError):
    def __init__(self, name: str, layer: int | None):
        where = f" at layer {layer}" if layer is not None else ""
        super().__init__(
            f"release {name!r} has no feature map{where} (maps need two or more SAEs on one layer)"
        )


def search_release(
    *, session: Session, release_name: str, search: FeatureSearch
) -> ReleaseResultsPublic:
    """The label / token search of every SAE of the release, each SAE's results apart (its scores
    are its own), by layer then width."""
    release = find_release(session, release_name)
    return ReleaseResultsPublic(
        release=release.name,
        saes=[
            SaeResultsPublic(
                sae=s.name,
                layer=s.layer,
                d_sae=s.d_sae,
                results=search_features(session=session, sae_name=s.name, search=search),
            )
            for s in release_saes(session, release.id)
        ],
    )


@dataclass(frozen=True)
class FeatureMap:
    """A map as served: the model (for the page) and its JSON (for the API and the page's script),
    serialised and gzipped once."""

    points: FeatureMapPublic
    json: PreparedJSON


def get_feature_map(*, session: Session, release_name: str, layer: int | None = None) -> FeatureMap:
    """The map of ``layer`` (default: the first layer of the release that has one).

    A map is tens of thousands of rows joined with the features table, a few hundred ms of CPU, so
    a built map is kept per store and served again while its *version* holds: the SAEs on it, each
    with when its map was written (``mark_mapped``), and the newest label id (every label change,
    from any process, appends to ``labels``). Checking the version is one small query beside the
    release's SAEs."""
    release = find_release(session, release_name)
    mapped = [s for s in release_saes(session, release.id) if s.map_built_at is not None]
    layers = sorted({s.layer for s in mapped})
    if not layers or (layer is not None and layer not in layers):
        raise NoMapError(release_name, layer)
    layer = layers[0] if layer is None else layer
    on_map = sorted((s for s in mapped if s.layer == layer), key=lambda s: (s.d_sae, s.name))
    version = (tuple((published(s), s.map_built_at) for s in on_map), label_version(session))

    def build() -> FeatureMap:
        points = _build_map(session, release.name, layer, layers, on_map)
        return FeatureMap(points, PreparedJSON.of(points.model_dump_json()))

    return _maps.read(session, (release.name, layer), version, build)


def prepare_maps(session: Session) -> None:
    """Build every release's map (its first layer's) into the cache now, at a worker's start, so
    no user waits for it: a 21k-point map takes ~190 ms to build against ~10 ms to serve, and each
    web worker keeps its own."""
    for release in list_releases(session):
        try:
            get_feature_map(session=session, release_name=release.name)
        except NoMapError:
            pass


def _build_map(
    session: Session, release: str, layer: int, layers: list[int], on_map: list
) -> FeatureMapPublic:
    rows = session.execute(
        sa.select(
            FeatureMapRow.sae_id,
            FeatureMapRow.feature_idx,
            FeatureMapRow.x,
            FeatureMapRow.y,
            FeatureRow.density,
            FeatureRow.label,
        )
        .join(
            FeatureRow,
            sa.and_(
                FeatureRow.sae_id == FeatureMapRow.sae_id,
                FeatureRow.idx == FeatureMapRow.feature_idx,
            ),
        )
        .where(FeatureMapRow.sae_id.in_([s.id for s in on_map]))
        .order_by(FeatureMapRow.sae_id, FeatureMapRow.feature_idx)
    ).all()
    position = {s.id: i for i, s in enumerate(on_map)}
    return FeatureMapPublic.model_construct(  # built from typed columns: skip validating 30k points
        release=release,
        layer=layer,
        layers=layers,
        saes=[MapSaePublic(name=s.name, d_sae=s.d_sae) for s in on_map],
        sae=[position[r.sae_id] for r in rows],
        index=[r.feature_idx for r in rows],
        x=[round(r.x, 4) for r in rows],
        y=[round(r.y, 4) for r in rows],
        density=[r.density for r in rows],
        label=[r.label for r in rows],
    )


_maps: StoreCache[FeatureMap] = StoreCache(size=8)
