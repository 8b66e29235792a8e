"""The family panel of a feature page: its links into the other SAEs of its release on its hook."""

from __future__ import annotations

from itertools import groupby
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.previews import neighbour_previews
from app.schemas import FamilyLinkPublic, FamilyPublic, NeighbourPublic
from sae_core.store.db import ReleaseRow, SaeRow
from sae_core.store.families import FeatureLinkRow, jaccard, same_dictionary

PANEL_LINKS = 3  # per other SAE, by cosine: the closest few; the family page shows them all

LINKS = FeatureLinkRow.__table__
# What the family views read of an SAE of the release (the panel of each linked SAE, the family
# page of each row): enough to name it, read its vocabulary and tell whether it is a prefix of
# the same Matryoshka dictionary (``same_dictionary``).
OTHER_SAE = (SaeRow.id, SaeRow.name, SaeRow.d_sae, SaeRow.model_id, SaeRow.path, SaeRow.layer, SaeRow.train_cfg)


class PanelLinks(NamedTuple):
    """A feature's links shown on its panel, each other SAE with its closest ``PANEL_LINKS``."""

    release: str
    by_sae: list[tuple[sa.Row, list[sa.Row]]]  # (the other SAE's OTHER_SAE columns, its links)

    def previews_wanted(self) -> list[tuple[sa.Row, list[tuple[int, float]]]]:
        """What ``neighbour_previews`` reads for the panel: each linked feature, scored by cosine."""
        return [(other, [(link.other_idx, link.cosine) for link in links]) for other, links in self.by_sae]


def panel_links(session: Session, sae: SaeRow, index: int) -> PanelLinks:
    """The stored links of one feature, by the other SAE's width and name, then cosine; with the
    other SAEs and the release's name, in one query (a feature page's most frequent reads)."""
    release = sa.select(ReleaseRow.name).where(ReleaseRow.id == sae.release_id).scalar_subquery()
    rows = session.execute(
        sa.select(LINKS, *OTHER_SAE, release.label("release"))
        .join(SaeRow, SaeRow.id == LINKS.c.other_sae_id)
        .where(LINKS.c.sae_id == sae.id, LINKS.c.feature_idx == index)
        .order_by(SaeRow.d_sae, SaeRow.name, LINKS.c.cosine.desc())
    ).all()
    by_sae = []
    for _, group in groupby(rows, key=lambda row: row.other_sae_id):
        links = list(group)
        by_sae.append((links[0], links[:PANEL_LINKS]))
    release_name = rows[0].release if rows else None
    return PanelLinks(release=release_name or "", by_sae=by_sae)


def family_panel(*, session: Session, sae: SaeRow, index: int) -> FamilyPublic | None:
    """Parents, children and peers of a feature (None when its SAE has no linked SAEs)."""
    links = panel_links(session, sae, index)
    return panel_of(sae, index, links, neighbour_previews(session, links.previews_wanted()))


def panel_of(
    sae: SaeRow, index: int, links: PanelLinks, previews: list[list[NeighbourPublic]]
) -> FamilyPublic | None:
    """The panel of ``links``, given the previews of ``links.previews_wanted()``."""
    if not links.by_sae:
        return None
    family = FamilyPublic(release=links.release, parents=[], children=[], peers=[])
    for (other, shown), other_previews in zip(links.by_sae, previews, strict=True):
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
            for link, preview in zip(shown, other_previews, strict=True)
        ]
    return family
