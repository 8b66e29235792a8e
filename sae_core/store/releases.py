"""Releases in the store: named sets of SAEs on one subject model (layers x widths).

Precompute puts every SAE it publishes into a release (``join_release``, in the publishing
transaction); an SAE precomputed alone is a release of one, named after it. Readers find a
release by name and list its complete SAEs by layer and width.
"""

from __future__ import annotations

from collections.abc import Collection

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from sae_core.store.db import ReleaseRow, SaeRow, StoreError, SubjectModelRow, utcnow


def list_releases(session: Session) -> list[ReleaseRow]:
    """Every release that holds at least one complete SAE, oldest first."""
    holding = sa.select(SaeRow.release_id).where(SaeRow.status == "complete")
    return list(
        session.scalars(
            sa.select(ReleaseRow)
            .where(ReleaseRow.id.in_(holding))
            .order_by(ReleaseRow.created_at, ReleaseRow.name)
        )
    )


def get_release(session: Session, name: str) -> ReleaseRow | None:
    return session.scalars(sa.select(ReleaseRow).where(ReleaseRow.name == name)).one_or_none()


def release_saes(session: Session, release_id: int) -> list[SaeRow]:
    """The complete SAEs of a release, by layer, then width, then name."""
    return list(
        session.scalars(
            sa.select(SaeRow)
            .where(SaeRow.release_id == release_id, SaeRow.status == "complete")
            .order_by(SaeRow.layer, SaeRow.d_sae, SaeRow.name)
        )
    )


def claim_release(
    conn: Connection, name: str, model: str, sae_names: Collection[str], *, force: bool
) -> None:
    """Check, before any work, that ``name`` can hold the SAEs ``sae_names`` of subject ``model``:
    a release of another model is refused, and so is one that holds other SAEs unless ``force``;
    then those SAEs leave it, each for a release of its own name."""
    release = conn.execute(
        sa.select(ReleaseRow.id, SubjectModelRow.name.label("model"))
        .join(SubjectModelRow, SubjectModelRow.id == ReleaseRow.model_id)
        .where(ReleaseRow.name == name)
    ).first()
    if release is None:
        return
    if release.model != model:
        raise StoreError(
            f"release {name!r} holds SAEs of {release.model}, not {model}; choose another --release"
        )
    others = conn.execute(
        sa.select(SaeRow.id, SaeRow.name, SaeRow.model_id)
        .where(SaeRow.release_id == release.id, SaeRow.name.not_in(list(sae_names)))
        .order_by(SaeRow.name)
    ).all()
    if others and not force:
        raise StoreError(
            f"release {name!r} already holds {', '.join(o.name for o in others)}; "
            "pass --force to take the name, or choose another --release"
        )
    for other in others:
        if conn.scalar(sa.select(ReleaseRow.id).where(ReleaseRow.name == other.name)) is not None:
            raise StoreError(
                f"{other.name} cannot leave release {name!r} for one of its own name; choose another --release"
            )
        own = _create(conn, other.name, other.model_id)
        conn.execute(sa.update(SaeRow).where(SaeRow.id == other.id).values(release_id=own))


def join_release(conn: Connection, sae_id: int, name: str) -> int:
    """Put the SAE into the release ``name``, created on the SAE's model when new (``claim_release``
    has checked the name); releases left empty go. Returns the release id."""
    model_id = conn.scalar(sa.select(SaeRow.model_id).where(SaeRow.id == sae_id))
    release_id = conn.scalar(sa.select(ReleaseRow.id).where(ReleaseRow.name == name))
    if release_id is None:
        release_id = _create(conn, name, model_id)
    conn.execute(sa.update(SaeRow).where(SaeRow.id == sae_id).values(release_id=release_id))
    held = sa.select(SaeRow.release_id).where(SaeRow.release_id.is_not(None))
    conn.execute(sa.delete(ReleaseRow).where(ReleaseRow.id.not_in(held)))
    return release_id


def _create(conn: Connection, name: str, model_id: int) -> int:
    return conn.scalar(
        sa.insert(ReleaseRow)
        .values(name=name, model_id=model_id, created_at=utcnow())
        .returning(ReleaseRow.id)
    )
