"""Attribution graphs in the store: saved under a shareable slug, found again by the key of what
was asked, so the same (release, prompt, target, thresholds, limits) is computed once."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sae_core.store.db import FeatureRow, GraphRow, utcnow


def request_key(**asked) -> str:
    """sha256 of everything that decides a graph (keyword arguments, JSON-serialisable)."""
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()


def find_graph(session: Session, key: str) -> GraphRow | None:
    return session.scalars(sa.select(GraphRow).where(GraphRow.request_key == key)).one_or_none()


def get_graph(session: Session, slug: str) -> GraphRow | None:
    return session.scalars(sa.select(GraphRow).where(GraphRow.slug == slug)).one_or_none()


def list_graphs(session: Session, release_id: int, *, limit: int = 50) -> list[GraphRow]:
    """The release's newest graphs first."""
    return list(
        session.scalars(
            sa.select(GraphRow)
            .where(GraphRow.release_id == release_id)
            .order_by(GraphRow.created_at.desc(), GraphRow.id.desc())
            .limit(limit)
        )
    )


def save_graph(
    session: Session, *, release_id: int, key: str | None, prompt: str, source: str, document: str
) -> GraphRow:
    """Save a finished graph (committing); when another process saved the same request first,
    return that one. The slug of a computed graph comes from its request, of an imported one
    from its text."""
    slug = (key or hashlib.sha256(document.encode()).hexdigest())[:16]
    if key is None and (row := get_graph(session, slug)) is not None:
        return row
    row = GraphRow(
        slug=slug,
        release_id=release_id,
        request_key=key,
        prompt=prompt,
        source=source,
        document=document,
        created_at=utcnow(),
    )
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return find_graph(session, key) if key else get_graph(session, slug)
    return row


def feature_labels(
    session: Session, sae_ids: dict[int, int], wanted: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], str]:
    """(layer, feature) -> label for the ``wanted`` features; ``sae_ids`` maps layer -> SAE id."""
    by_sae: dict[int, set[int]] = {}
    for layer, feature in wanted:
        if layer in sae_ids:
            by_sae.setdefault(sae_ids[layer], set()).add(feature)
    layer_of = {sae_id: layer for layer, sae_id in sae_ids.items()}
    labels: dict[tuple[int, int], str] = {}
    for sae_id, features in by_sae.items():
        rows = session.execute(
            sa.select(FeatureRow.idx, FeatureRow.label).where(
                FeatureRow.sae_id == sae_id,
                FeatureRow.idx.in_(sorted(features)),
                FeatureRow.label.is_not(None),
            )
        )
        labels.update({(layer_of[sae_id], idx): label for idx, label in rows})
    return labels
