"""What a child fires on that its parent does not: tokens that carry much of the child's
activation in its top examples and little of the parent's."""

from __future__ import annotations

from collections import Counter

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.families.schemas import FamilyEdgePublic, SplitPublic, SplitTokenPublic
from app.vocab import get_vocabulary
from sae_core.store.db import ContextRow, ExampleRow, SaeRow, unpack_acts, unpack_tokens

MIN_CHILD_SHARE = 0.05  # a token worth naming carries at least 5% of the child's activation
RARE_RATIO = 0.25  # ... and under a quarter of that share among the parent's
SPLIT_TOKENS = 5  # per child


def token_shares(session: Session, sae_id: int, index: int) -> Counter:
    """Token id -> share of the feature's activation, summed over its top examples (each example's
    activations scaled to its max, so every example counts alike)."""
    rows = session.execute(
        sa.select(ExampleRow.acts, ExampleRow.max_act, ContextRow.token_ids)
        .join(ContextRow, sa.and_(ContextRow.sae_id == ExampleRow.sae_id, ContextRow.id == ExampleRow.context_id))
        .where(ExampleRow.sae_id == sae_id, ExampleRow.feature_idx == index, ExampleRow.kind == "top")
    )
    tokens, weights = [], []
    for acts, max_act, token_ids in rows:
        ids = unpack_tokens(token_ids)
        values = unpack_acts(acts, max_act, len(ids))
        fired = values.nonzero()[0]
        tokens.append(ids[fired])
        weights.append(values[fired] / max_act)
    if not tokens:
        return Counter()
    ids, inverse = np.unique(np.concatenate(tokens), return_inverse=True)
    sums = np.bincount(inverse, weights=np.concatenate(weights).astype(np.float64))
    shares = Counter(dict(zip(ids.tolist(), sums.tolist(), strict=True)))
    total = sum(shares.values())
    return Counter({t: v / total for t, v in shares.items()}) if total else shares


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
    shares = {}
    for edge in parent_of.values():
        for node in (edge.source, edge.target):
            if node not in shares:
                shares[node] = token_shares(session, *nodes[node])
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
