"""Which family of a real store shows a split clearly, by a rule rather than by a chosen index.

A clear split: a feature of the smallest SAE on a layer whose label scores well (it is about
something), with two or more children in the next width up, each linked by decoder cosine of at
least ``MIN_COSINE``, and the two closest children firing on different tokens: the overlap of
their top examples' token shares (sum over tokens of the smaller share) at most ``MAX_OVERLAP``.
Candidates are ranked by the children's cosines times how little they overlap.

The README's screenshot test takes the first; to look at the others:

    python -m tests.e2e.family_pick sqlite:///saescope.db [RELEASE]
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.families.splits import token_shares
from sae_core.store.db import FeatureRow, ReleaseRow, SaeRow, create_engine_for
from sae_core.store.families import FeatureLinkRow
from sae_core.store.releases import release_saes

MIN_COSINE = 0.5  # above the family page's default threshold (0.4): the edges are drawn
MAX_OVERLAP = 0.3  # the two children share under a third of their top tokens' weight
MIN_LABEL_F1 = 0.5  # the parent's label says what it is
CANDIDATES = 200  # parents examined, most children first: token shares cost a query each


class Split(NamedTuple):
    sae: str  # the parent's SAE
    index: int
    label: str | None
    children: tuple[tuple[str, int, float], ...]  # (SAE, index, cosine), closest first
    overlap: float

    @property
    def score(self) -> float:
        return (self.children[0][2] + self.children[1][2]) * (1 - self.overlap)


def overlap(a: dict[int, float], b: dict[int, float]) -> float:
    return sum(min(share, b.get(token, 0.0)) for token, share in a.items())


def clear_splits(session: Session, release: str) -> list[Split]:
    """Every clear split of the release's layers (see the module docstring), best first."""
    release_id = session.scalar(sa.select(ReleaseRow.id).where(ReleaseRow.name == release))
    by_layer: dict[int, list[SaeRow]] = defaultdict(list)
    for sae in release_saes(session, release_id):
        by_layer[sae.layer].append(sae)
    found = []
    for saes in by_layer.values():
        if len(saes) < 2:
            continue
        parent_sae, child_sae = sorted(saes, key=lambda s: s.d_sae)[:2]
        links = session.execute(
            sa.select(FeatureLinkRow.feature_idx, FeatureLinkRow.other_idx, FeatureLinkRow.cosine)
            .join(
                FeatureRow,
                sa.and_(
                    FeatureRow.sae_id == FeatureLinkRow.sae_id,
                    FeatureRow.idx == FeatureLinkRow.feature_idx,
                ),
            )
            .where(
                FeatureLinkRow.sae_id == parent_sae.id,
                FeatureLinkRow.other_sae_id == child_sae.id,
                FeatureLinkRow.cosine >= MIN_COSINE,
                FeatureRow.label_f1 >= MIN_LABEL_F1,
            )
            .order_by(FeatureLinkRow.feature_idx, FeatureLinkRow.cosine.desc())
        ).all()
        children: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for parent, child, cosine in links:
            children[parent].append((child, cosine))
        ranked = sorted(
            (p for p in children if len(children[p]) >= 2), key=lambda p: -len(children[p])
        )
        for parent in ranked[:CANDIDATES]:
            (a, cos_a), (b, cos_b) = children[parent][:2]
            shared = overlap(
                token_shares(session, child_sae.id, a), token_shares(session, child_sae.id, b)
            )
            if shared <= MAX_OVERLAP:
                label = session.scalar(
                    sa.select(FeatureRow.label).where(
                        FeatureRow.sae_id == parent_sae.id, FeatureRow.idx == parent
                    )
                )
                pairs = ((child_sae.name, a, cos_a), (child_sae.name, b, cos_b))
                found.append(Split(parent_sae.name, parent, label, pairs, shared))
    return sorted(found, key=lambda s: -s.score)


def main(url: str, release: str | None = None) -> None:
    engine = create_engine_for(url, readonly=True)
    with Session(engine) as session:
        releases = [release] if release else list(session.scalars(sa.select(ReleaseRow.name)))
        for name in releases:
            for split in clear_splits(session, name)[:15]:
                children = ", ".join(f"{s}#{i} ({c:.2f})" for s, i, c in split.children)
                print(
                    f"{split.score:.2f}  {split.sae}#{split.index} {split.label!r} -> {children}; overlap {split.overlap:.2f}"
                )
    engine.dispose()


if __name__ == "__main__":
    main(*sys.argv[1:])
