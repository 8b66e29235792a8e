"""What a request names, found in the store: an SAE or a release by name, a feature by index. Browse, labels
and live all look them up here, and a miss is always a ``NotFoundError`` (404 on the server)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sae_core.errors import NotFoundError
from sae_core.store.db import FeatureRow, ReleaseRow, SaeRow
from sae_core.store.releases import get_release


def find_sae(session: Session, name: str) -> SaeRow:
    """The SAE named ``name``, once its precompute is complete (until then it is a staging row
    that no page shows)."""
    row = session.scalars(
        sa.select(SaeRow).where(SaeRow.name == name, SaeRow.status == "complete")
    ).one_or_none()
    if row is None:
        raise NotFoundError.sae(name)
    return row


def check_feature_index(sae: SaeRow, index: int) -> int:
    """``index`` when the SAE has such a feature (for reads that need no row of it)."""
    if not 0 <= index < sae.d_sae:
        raise NotFoundError.feature(sae.name, index, sae.d_sae)
    return index


def find_feature(session: Session, sae: SaeRow, index: int) -> FeatureRow:
    row = session.get(FeatureRow, (sae.id, check_feature_index(sae, index)))
    if row is None:
        raise NotFoundError.feature(sae.name, index, sae.d_sae)
    return row


def find_release(session: Session, name: str) -> ReleaseRow:
    """The release named ``name``."""
    release = get_release(session, name)
    if release is None:
        raise NotFoundError.release(name)
    return release
