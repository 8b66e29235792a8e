"""The store's family tables (sae_core.families writes them, app.families reads them): links
between features of SAEs on one hook, and each feature's place on the feature map."""

from __future__ import annotations

from collections.abc import Collection

import sqlalchemy as sa
from sqlalchemy import Float, ForeignKey, Integer
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapped, mapped_column

from sae_core.store.db import Base, SaeRow, utcnow


class FeatureLinkRow(Base):
    """Feature ``feature_idx`` of SAE ``sae_id`` and one of its nearest features in another SAE on
    the same hook (among its top 5 there by decoder cosine or by co-firing Jaccard). Every link is
    stored from both ends' point of view when it is in both ends' lists."""

    __tablename__ = "feature_links"

    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    feature_idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    other_sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    other_idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    cosine: Mapped[float] = mapped_column(Float)  # of the two decoder directions
    n_both: Mapped[int] = mapped_column(Integer)  # precompute tokens where both fire
    n_self: Mapped[int] = mapped_column(Integer)  # tokens where this feature fires
    n_other: Mapped[int] = mapped_column(Integer)  # tokens where the other fires
    # Jaccard = n_both / (n_self + n_other - n_both), 0 when neither fires


class FeatureMapRow(Base):
    """A feature's position on its hook's feature map (UMAP of all the hook's decoder directions)."""

    __tablename__ = "feature_map"

    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    feature_idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    x: Mapped[float] = mapped_column(Float)  # in [0, 1]
    y: Mapped[float] = mapped_column(Float)


def mark_mapped(conn: Connection, sae_ids: Collection[int]) -> None:
    """Record that the feature map of ``sae_ids`` was written now; call it in the transaction that
    writes the map's points. A server keeps a built map while its SAEs' marks hold."""
    conn.execute(sa.update(SaeRow).where(SaeRow.id.in_(sae_ids)).values(map_built_at=utcnow()))


def dictionary_width(sae: SaeRow) -> int | None:
    """The width of the Matryoshka dictionary a stored SAE is (its own) or is a nested prefix of
    (``prefix_of``, recorded by ``SAE.nested``); None for any other SAE."""
    meta = sae.train_cfg or {}
    if not meta.get("matryoshka_prefixes"):
        return None
    return meta.get("prefix_of") or sae.d_sae


def same_dictionary(a: SaeRow, b: SaeRow) -> bool:
    """Whether two stored SAEs are nested SAEs of one Matryoshka dictionary (its prefixes, or the
    whole): precomputed from the same folder and layer. Latent i is then one latent, with the
    same weights and activations, in both."""
    return a.path == b.path and a.layer == b.layer and dictionary_width(a) is not None and dictionary_width(a) == dictionary_width(b)


def jaccard(n_both: int, n_self: int, n_other: int) -> float:
    union = n_self + n_other - n_both
    return n_both / union if union > 0 else 0.0
