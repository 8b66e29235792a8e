"""What a child fires on that its parent does not: tokens that carry much of the child's
activation in its top examples and little of the parent's."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.families.schemas import FamilyEdgePublic, SplitPublic, SplitTokenPublic
from app.vocab import get_vocabulary
from sae_core.store.db import ContextRow, ExampleRow, SaeRow, unpack_levels, unpack_tokens

MIN_CHILD_SHARE = 0.05  # a token worth naming carries at least 5% of the child's activation
RARE_RATIO = 0.25  # ... and under a quarter of that share among the parent's
SPLIT_TOKENS = 5  # per child

Node = tuple[int, int]  # (sae_id, feature index)


def token_shares(session: Session, sae_id: int, index: int) -> Counter:
    """Token id -> share of the feature's activation, summed over its top examples (each example's
    activations scaled to its max, so every example counts alike)."""
    return shares_of(session, [(sae_id, index)])[(sae_id, index)]


def shares_of(session: Session, nodes: Collection[Node]) -> dict[Node, Counter]:
    """``token_shares`` of every node, from one query per SAE: a family page splits ~30 nodes, and
    a query each (its statement, its 20 rows decoded to dense arrays) was most of the page's CPU.
    An example's activations scaled to its max are its stored levels / 255 (``pack_acts``), so the
    shares are summed from the levels as stored."""
    tokens: dict[Node, list[np.ndarray]] = defaultdict(list)
    levels: dict[Node, list[np.ndarray]] = defaultdict(list)
    for sae_id, indexes in by_sae(nodes).items():
        rows = session.execute(
            sa.select(ExampleRow.feature_idx, ExampleRow.acts, ContextRow.token_ids)
            .join(ContextRow, sa.and_(ContextRow.sae_id == ExampleRow.sae_id, ContextRow.id == ExampleRow.context_id))
            .where(ExampleRow.sae_id == sae_id, ExampleRow.feature_idx.in_(indexes), ExampleRow.kind == "top")
        )
        for index, acts, token_ids in rows:
            positions, fired = unpack_levels(acts)
            tokens[sae_id, index].append(unpack_tokens(token_ids)[positions])
            levels[sae_id, index].append(fired)
    return {node: _shares(tokens[node], levels[node]) for node in nodes}


def by_sae(nodes: Collection[Node]) -> dict[int, list[int]]:
    """Feature indexes by SAE: a query per SAE, each on its (sae_id, index) primary key."""
    grouped = defaultdict(list)
    for sae_id, index in nodes:
        grouped[sae_id].append(index)
    return grouped


def _shares(tokens: list[np.ndarray], levels: list[np.ndarray]) -> Counter:
    if not tokens:
        return Counter()
    ids, inverse = np.unique(np.concatenate(tokens), return_inverse=True)
    sums = np.bincount(inverse, weights=np.concatenate(levels).astype(np.float64))
    total = sums.sum()
    return Counter(dict(zip(ids.tolist(), (sums / total).tolist(), strict=True))) if total else Counter()


def splits_of(
    session: Session, nodes: list[tuple[int, int]], edges: list[FamilyEdgePublic], saes: dict[int, SaeRow]
) -> list[SplitPublic]:
    """For each node drawn below another it links to (in a larger SAE), against its strongest
    such parent: the tokens it fires on that the parent rarely does. A Matryoshka latent is not
    a child of its own copy in a narrower prefix (it fires on exactly the same tokens)."""
    parent_of: dict[int, FamilyEdgePublic] = {}
    for edge in edges:
        parent, child = nodes[edge.source], nodes[edge.target]
        if saes[parent[0]].d_sae < saes[child[0]].d_sae and not edge.same_latent:
            if edge.target not in parent_of or edge.weight > parent_of[edge.target].weight:
                parent_of[edge.target] = edge
    drawn = {node for edge in parent_of.values() for node in (edge.source, edge.target)}
    by_node = shares_of(session, {nodes[node] for node in drawn})
    shares = {node: by_node[nodes[node]] for node in drawn}
    splits = []
    for child, edge in sorted(parent_of.items()):
        vocab = get_vocabulary(session, saes[nodes[child][0]].model_id)
        mine, theirs = shares[child], shares[edge.source]
        own = [
            (share - theirs.get(token, 0.0), token)
            for token, share in mine.items()
            if share >= MIN_CHILD_SHARE and theirs.get(token, 0.0) < RARE_RATIO * share
        ]
        tokens = [
            SplitTokenPublic(text=vocab.text(t), token_id=t, child_share=mine[t], parent_share=theirs.get(t, 0.0))
            for _, t in sorted(own, reverse=True)[:SPLIT_TOKENS]
        ]
        splits.append(SplitPublic(child=child, parent=edge.source, tokens=tokens))
    return splits
