"""The family page's graph: a feature's relatives across all widths of its release on its hook,
found by following stored links at or above the threshold, and laid out in rows by width
(smallest on top), each row ordered by where its nodes' links land in the rows above."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.families.panel import OTHER_SAE
from app.families.reads import Node, of_nodes, rows_of
from app.families.schemas import FamilyEdgePublic, FamilyGraphPublic, FamilyNodePublic, Measure
from app.families.splits import splits_of
from sae_core.errors import NotFoundError
from sae_core.store.db import FeatureRow, ReleaseRow, SaeRow
from sae_core.store.families import FeatureLinkRow, jaccard, same_dictionary
from sae_core.store.lookup import check_feature_index, find_sae

DEFAULT_THRESHOLD = {"cosine": 0.4, "jaccard": 0.1}  # a link a reader would call a relative
HOPS = 2  # parents of children (a child's second parent) and children of parents
PER_ROW = 12  # strongest nodes kept per SAE: a drawing stays readable
WIDTH, ROW_GAP, MARGIN = 960.0, 120.0, 60.0  # SVG user units
MIN_R, MAX_R = 5.0, 20.0

LINKS = FeatureLinkRow.__table__


# Each feature's stored links, and the columns a node shows: ``rows_of`` statements.
LINKS_OF = sa.select(LINKS).where(of_nodes(LINKS.c.sae_id, LINKS.c.feature_idx))
FEATURES_OF = sa.select(FeatureRow.sae_id, FeatureRow.idx, FeatureRow.label, FeatureRow.label_f1, FeatureRow.density).where(
    of_nodes(FeatureRow.sae_id, FeatureRow.idx)
)
# The SAEs of a release on one layer, with the release's name: the rows of a drawing.
RELEASE_SAES = (
    sa.select(*OTHER_SAE, ReleaseRow.name.label("release"))
    .join(ReleaseRow, ReleaseRow.id == SaeRow.release_id)
    .where(SaeRow.release_id == sa.bindparam("release_id"), SaeRow.layer == sa.bindparam("layer"), SaeRow.status == "complete")
)


def measure(link: sa.Row, by: Measure) -> float:
    return link.cosine if by == "cosine" else jaccard(link.n_both, link.n_self, link.n_other)


class StoredLinks:
    """The stored links of nodes, as plain rows of ``feature_links``, each node's read once: the
    links that grow a family are those its edges are drawn from."""

    def __init__(self, session: Session):
        self.session = session
        self.of: dict[Node, list[sa.Row]] = {}

    def from_nodes(self, nodes: Iterable[Node]) -> list[sa.Row]:
        nodes = list(nodes)
        unread = [node for node in nodes if node not in self.of]
        self.of |= {node: [] for node in unread}
        for link in rows_of(self.session, LINKS_OF, unread):
            self.of[link.sae_id, link.feature_idx].append(link)
        return [link for node in nodes for link in self.of[node]]


def grow(links: StoredLinks, focus: Node, family: set[int], by: Measure, threshold: float) -> set[Node]:
    """The focus and what links reach from it in ``HOPS`` steps at or above the threshold,
    keeping the ``PER_ROW`` strongest reached per SAE."""
    nodes, frontier = {focus}, {focus}
    for _ in range(HOPS):
        best: dict[Node, float] = {}
        for link in links.from_nodes(frontier):
            target = (link.other_sae_id, link.other_idx)
            weight = measure(link, by)
            if link.other_sae_id in family and weight >= threshold and target not in nodes:
                best[target] = max(best.get(target, 0.0), weight)
        per_sae = defaultdict(list)
        for node, weight in best.items():
            per_sae[node[0]].append((weight, node))
        kept = set()
        for sae_id, ranked in per_sae.items():
            room = PER_ROW - sum(1 for n in nodes if n[0] == sae_id)
            kept |= {node for _, node in sorted(ranked, reverse=True)[: max(room, 0)]}
        nodes |= kept
        frontier = kept
    return nodes


def family_saes(session: Session, sae: SaeRow) -> tuple[str, list]:
    """The release's name and its SAEs on ``sae``'s layer, by width (only ``sae`` when it is in no
    release)."""
    if not sae.release_id:
        return sae.name, [sae]
    saes = session.connection().execute(RELEASE_SAES, {"release_id": sae.release_id, "layer": sae.layer}).all()
    return saes[0].release, sorted(saes, key=lambda s: (s.d_sae, s.name))


def family_graph(
    *, session: Session, sae_name: str, index: int, by: Measure = "cosine", threshold: float | None = None
) -> FamilyGraphPublic:
    sae = find_sae(session, sae_name)
    focus = (sae.id, check_feature_index(sae, index))
    threshold = DEFAULT_THRESHOLD[by] if threshold is None else threshold
    release, saes = family_saes(session, sae)
    order = {s.id: row for row, s in enumerate(saes)}
    links = StoredLinks(session)
    nodes = sorted(grow(links, focus, set(order), by, threshold), key=lambda n: (order[n[0]], n[1]))
    features = node_features(session, nodes)
    if focus not in features:
        raise NotFoundError.feature(sae.name, index, sae.d_sae)
    position = {node: i for i, node in enumerate(nodes)}
    edges = graph_edges(links, position, {s.id: s for s in saes}, by, threshold)
    rows = [s for s in saes if any(n[0] == s.id for n in nodes)]
    places = layout(nodes, edges, [s.id for s in rows])
    densest = max([features[n].density for n in nodes] + [1e-12])
    public = [
        FamilyNodePublic(
            sae=saes[order[n[0]]].name,
            d_sae=saes[order[n[0]]].d_sae,
            index=n[1],
            label=features[n].label,
            label_f1=features[n].label_f1,
            density=features[n].density,
            focus=n == focus,
            x=places[n][0],
            y=places[n][1],
            r=round(MIN_R + (MAX_R - MIN_R) * math.sqrt(features[n].density / densest), 2),
        )
        for n in nodes
    ]
    return FamilyGraphPublic(
        sae=sae.name,
        index=index,
        release=release,
        by=by,
        threshold=threshold,
        width=WIDTH,
        height=2 * MARGIN + ROW_GAP * max(len(rows) - 1, 0),
        rows=[(s.name, s.d_sae, MARGIN + ROW_GAP * r) for r, s in enumerate(rows)],
        nodes=public,
        edges=edges,
        splits=splits_of(session, nodes, edges, {s.id: s for s in saes}),
    )


def graph_edges(links: StoredLinks, position: dict[Node, int], saes: dict[int, sa.Row], by: Measure, threshold: float) -> list[FamilyEdgePublic]:
    """Links between drawn nodes at or above the threshold, one edge per pair (the stronger of
    the two directions' rows), from the smaller SAE to the larger (the drawing's nodes are in row
    order, so that is the smaller ``position``); one latent in two nested SAEs of a Matryoshka
    dictionary is marked as the same latent."""
    best: dict[tuple[int, int], tuple[float, sa.Row]] = {}
    for link in links.from_nodes(position):
        far = position.get((link.other_sae_id, link.other_idx))
        weight = measure(link, by)
        if far is None or weight < threshold:
            continue
        near = position[link.sae_id, link.feature_idx]
        key = (min(near, far), max(near, far))
        if key not in best or weight > best[key][0]:
            best[key] = (weight, link)
    return [
        FamilyEdgePublic(
            source=s,
            target=t,
            cosine=link.cosine,
            jaccard=jaccard(link.n_both, link.n_self, link.n_other),
            weight=weight,
            same_latent=link.feature_idx == link.other_idx and same_dictionary(saes[link.sae_id], saes[link.other_sae_id]),
        )
        for (s, t), (weight, link) in sorted(best.items())
    ]


def layout(nodes: list[Node], edges: list[FamilyEdgePublic], rows: list[int]) -> dict[Node, tuple[float, float]]:
    """Row r at y = MARGIN + r * ROW_GAP; in each row, nodes spread evenly, ordered by the mean x
    of their neighbours in the rows above (a one-pass barycentre), then by index."""
    neighbours = defaultdict(list)
    for edge in edges:
        neighbours[edge.source].append(edge.target)
        neighbours[edge.target].append(edge.source)
    places: dict[Node, tuple[float, float]] = {}
    for r, sae_id in enumerate(rows):
        members = [i for i, n in enumerate(nodes) if n[0] == sae_id]

        def anchor(i: int) -> float:
            xs = [places[nodes[j]][0] for j in neighbours[i] if nodes[j] in places]
            return sum(xs) / len(xs) if xs else WIDTH / 2

        members.sort(key=lambda i: (anchor(i), nodes[i][1]))
        step = (WIDTH - 2 * MARGIN) / len(members)
        for slot, i in enumerate(members):
            places[nodes[i]] = (round(MARGIN + step * (slot + 0.5), 1), MARGIN + ROW_GAP * r)
    return places


def node_features(session: Session, nodes: list[Node]) -> dict[Node, sa.Row]:
    return {(row.sae_id, row.idx): row for row in rows_of(session, FEATURES_OF, nodes)}
