"""What a child fires on that its parent does not: tokens that carry much of the child's
activation in its top examples and little of the parent's."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.families.schemas import FamilyEdgePublic, SplitPublic, SplitTokenPublic
from app.vocab import get_vocabulary
from sae_core.store.db import ContextRow, ExampleRow, SaeRow

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
    shares: dict[Node, Counter] = {}
    for sae_id, indexes in by_sae(nodes).items():
        rows = session.execute(
            sa.select(ExampleRow.feature_idx, ExampleRow.acts, ContextRow.token_ids)
            .join(ContextRow, sa.and_(ContextRow.sae_id == ExampleRow.sae_id, ContextRow.id == ExampleRow.context_id))
            .where(ExampleRow.sae_id == sae_id, ExampleRow.feature_idx.in_(indexes), ExampleRow.kind == "top")
        ).all()
        if rows:
            shares |= {(sae_id, index): counter for index, counter in _shares(*_fired(rows)).items()}
    return {node: shares.get(node, Counter()) for node in nodes}


def by_sae(nodes: Collection[Node]) -> dict[int, list[int]]:
    """Feature indexes by SAE: a query per SAE, each on its (sae_id, index) primary key."""
    grouped = defaultdict(list)
    for sae_id, index in nodes:
        grouped[sae_id].append(index)
    return grouped


def _fired(rows: Sequence[sa.Row]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every token where an example fired, over all ``rows`` (feature index, packed acts, packed
    token ids) at once: (n,) feature index, token id and level. A family page reads ~600 examples,
    and decoding each apart (``unpack_levels``, ``unpack_tokens``) cost ~5 numpy calls a row.

    Each acts blob is ``pack_acts``'s: a little-endian uint16 count n, n uint16 positions, then
    n uint8 levels; so entry k of a row's n sits at byte 2 + 2k (position) and 2 + 2n + k (level)."""
    counts = np.array([int.from_bytes(acts[:2], "little") for _, acts, _ in rows], dtype=np.int64)
    acts_at = _starts([len(acts) for _, acts, _ in rows])  # (rows,) where each blob begins
    tokens_at = _starts([len(tokens) // 4 for _, _, tokens in rows])
    row = np.repeat(np.arange(len(rows)), counts)  # (n,) the row of each fired token
    k = np.arange(row.size) - np.repeat(_starts(counts.tolist()), counts)  # (n,) its rank in its row
    acts = np.frombuffer(b"".join(acts for _, acts, _ in rows), dtype=np.uint8)
    at = acts_at[row] + 2 + 2 * k
    positions = acts[at].astype(np.int64) | acts[at + 1].astype(np.int64) << 8
    levels = acts[acts_at[row] + 2 + 2 * counts[row] + k]
    tokens = np.frombuffer(b"".join(tokens for _, _, tokens in rows), dtype="<i4")
    features = np.array([index for index, _, _ in rows], dtype=np.int64)
    return features[row], tokens[tokens_at[row] + positions].astype(np.int64), levels


def _starts(lengths: list[int]) -> np.ndarray:
    """Where each of consecutive runs of ``lengths`` begins."""
    return np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]).astype(np.int64)


def _shares(features: np.ndarray, tokens: np.ndarray, levels: np.ndarray) -> dict[int, Counter]:
    """Feature index -> {token id: its share of the feature's summed levels}, tokens ascending.
    The sums are of integers, so exact, and each share one division, whatever the order."""
    pairs, inverse = np.unique(features << 32 | tokens, return_inverse=True)  # by feature, then token
    sums = np.bincount(inverse.ravel(), weights=levels.astype(np.float64))
    shares = {}
    for feature in np.unique(features).tolist():
        mine = pairs >> 32 == feature
        total = sums[mine].sum()
        if total:
            shares[feature] = Counter(dict(zip((pairs[mine] & 0xFFFFFFFF).tolist(), (sums[mine] / total).tolist(), strict=True)))
    return shares


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
