"""The family panel of a feature page: its links into the other SAEs of its release on its hook."""

from __future__ import annotations

from itertools import groupby

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.previews import neighbour_previews
from app.schemas import FamilyLinkPublic, FamilyPublic
from sae_core.store.db import ReleaseRow, SaeRow
from sae_core.store.families import FeatureLinkRow, jaccard, same_dictionary

PANEL_LINKS = 3  # per other SAE, by cosine: the closest few; the family page shows them all


def feature_links(session: Session, sae_id: int, index: int) -> list[FeatureLinkRow]:
    """The stored links of one feature, by the other SAE's width and name, then cosine."""
    return list(
        session.scalars(
            sa.select(FeatureLinkRow)
            .join(SaeRow, SaeRow.id == FeatureLinkRow.other_sae_id)
            .where(FeatureLinkRow.sae_id == sae_id, FeatureLinkRow.feature_idx == index)
            .order_by(SaeRow.d_sae, SaeRow.name, FeatureLinkRow.cosine.desc())
        )
    )


def family_panel(*, session: Session, sae: SaeRow, index: int) -> FamilyPublic | None:
    """Parents, children and peers of a feature (None when its SAE has no linked SAEs)."""
    links = feature_links(session, sae.id, index)
    if not links:
        return None
    family = FamilyPublic(
        release=session.scalar(sa.select(ReleaseRow.name).where(ReleaseRow.id == sae.release_id)) or "",
        parents=[],
        children=[],
        peers=[],
    )
    for other_id, group in groupby(links, key=lambda link: link.other_sae_id):
        shown = list(group)[:PANEL_LINKS]
        other = session.get(SaeRow, other_id)
        (previews,) = neighbour_previews(session, other, [[(link.other_idx, link.cosine) for link in shown]])
        side = family.parents if other.d_sae < sae.d_sae else family.children if other.d_sae > sae.d_sae else family.peers
        side += [
            FamilyLinkPublic(
                sae=other.name,
                d_sae=other.d_sae,
                cosine=link.cosine,
                jaccard=jaccard(link.n_both, link.n_self, link.n_other),
                n_both=link.n_both,
                n_self=link.n_self,
                n_other=link.n_other,
                same_latent=link.other_idx == index and same_dictionary(sae, other),
                feature=preview,
            )
            for link, preview in zip(shown, previews, strict=True)
        ]
    return family
