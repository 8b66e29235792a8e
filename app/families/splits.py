"""What a child fires on that its parent does not: tokens that carry much of the child's
activation in its top examples and little of the parent's."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from typing import NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.families.reads import Node, by_sae, of_nodes, rows_in
from app.families.schemas import FamilyEdgePublic, SplitPublic, SplitTokenPublic
from app.vocab import get_vocabulary
from sae_core.store.db import ContextRow, ExampleRow, SaeRow, unpack_levels_rows

MIN_CHILD_SHARE = 0.05  # a token worth naming carries at least 5% of the child's activation
RARE_RATIO = 0.25  # ... and under a quarter of that share among the parent's
SPLIT_TOKENS = 5  # per child

# Every top example of some features of one SAE, with its context's tokens.
TOP_EXAMPLES = (
    sa.select(ExampleRow.feature_idx, ExampleRow.acts, ContextRow.token_ids)
    .join(ContextRow, sa.and_(ContextRow.sae_id == ExampleRow.sae_id, ContextRow.id == ExampleRow.context_id))
    .where(of_nodes(ExampleRow.sae_id, ExampleRow.feature_idx), ExampleRow.kind == "top")
)


class TokenShares(NamedTuple):
    """A feature's token shares: the tokens it fired on in its top examples, ascending, and the
    share of its summed activation each carries (arrays, so a split reads only the few tokens
    it names instead of building a mapping of every token)."""

    tokens: np.ndarray  # (n,) int64 token ids, ascending
    shares: np.ndarray  # (n,) float64

    def of(self, tokens: np.ndarray) -> np.ndarray:
        """The shares of ``tokens`` (0 for a token this feature never fired on)."""
        if not self.tokens.size:
            return np.zeros(tokens.shape)
        at = np.searchsorted(self.tokens, tokens).clip(max=self.tokens.size - 1)
        return np.where(self.tokens[at] == tokens, self.shares[at], 0.0)


NO_SHARES = TokenShares(np.zeros(0, dtype=np.int64), np.zeros(0))  # a dead feature: no examples


def token_shares(session: Session, sae_id: int, index: int) -> Counter:
    """Token id -> share of the feature's activation, summed over its top examples (each example's
    activations scaled to its max, so every example counts alike)."""
    tokens, shares = shares_of(session, [(sae_id, index)])[(sae_id, index)]
    return Counter(dict(zip(tokens.tolist(), shares.tolist(), strict=True)))


def shares_of(session: Session, nodes: Collection[Node]) -> dict[Node, TokenShares]:
    """``token_shares`` of every node, from one query per SAE: a family page splits ~30 nodes, and
    a query each (its statement, its 20 rows decoded to dense arrays) was most of the page's CPU.
    An example's activations scaled to its max are its stored levels / 255 (``pack_acts``), so the
    shares are summed from the levels as stored."""
    shares: dict[Node, TokenShares] = {}
    for sae_id, indexes in by_sae(nodes).items():
        rows = rows_in(session, TOP_EXAMPLES, sae_id, indexes)
        if rows:
            shares |= {(sae_id, index): found for index, found in _shares(*_fired(rows)).items()}
    return {node: shares.get(node, NO_SHARES) for node in nodes}


def _fired(rows: Sequence[sa.Row]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every token where an example fired, over all ``rows`` (feature index, packed acts, packed
    token ids) at once: (n,) feature index, token id and level. A family page reads ~600 examples,
    and decoding each apart (``unpack_levels``, ``unpack_tokens``) cost ~5 numpy calls a row."""
    indexes, acts_blobs, token_blobs = zip(*rows, strict=True)
    counts, positions, levels = unpack_levels_rows(acts_blobs)
    row = np.repeat(np.arange(len(rows)), counts)  # (n,) the row of each fired token
    tokens = np.frombuffer(b"".join(token_blobs), dtype="<i4")
    lengths = np.fromiter(map(len, token_blobs), np.int64, len(rows)) // 4
    tokens_at = np.cumsum(lengths) - lengths  # (rows,) where each row's tokens begin
    features = np.array(indexes, dtype=np.int64)
    return features[row], tokens[tokens_at[row] + positions].astype(np.int64), levels


def _shares(features: np.ndarray, tokens: np.ndarray, levels: np.ndarray) -> dict[int, TokenShares]:
    """Feature index -> its ``TokenShares``, in one unique and two bincounts over every fired token.
    The sums are of integers, so exact, and each share one division, whatever the order."""
    pairs, inverse = np.unique(features << 32 | tokens, return_inverse=True)  # by feature, then token
    sums = np.bincount(inverse.ravel(), weights=levels.astype(np.float64))
    owners, starts, counts = np.unique(pairs >> 32, return_index=True, return_counts=True)
    totals = np.bincount(np.repeat(np.arange(owners.size), counts), weights=sums)
    shares = sums / np.repeat(np.where(totals > 0, totals, 1.0), counts)
    return {
        feature: TokenShares(pairs[start : start + count] & 0xFFFFFFFF, shares[start : start + count])
        for feature, start, count, total in zip(owners.tolist(), starts.tolist(), counts.tolist(), totals.tolist(), strict=True)
        if total
    }


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
    shares = shares_of(session, {nodes[node] for node in drawn})
    splits = []
    for child, edge in sorted(parent_of.items()):
        vocab = get_vocabulary(session, saes[nodes[child][0]].model_id)
        tokens = [
            SplitTokenPublic(text=vocab.text(t), token_id=t, child_share=mine, parent_share=theirs)
            for t, mine, theirs in own_tokens(shares[nodes[child]], shares[nodes[edge.source]])
        ]
        splits.append(SplitPublic(child=child, parent=edge.source, tokens=tokens))
    return splits


def own_tokens(child: TokenShares, parent: TokenShares) -> list[tuple[int, float, float]]:
    """(token, child share, parent share) of the child's ``SPLIT_TOKENS`` own tokens, by how much
    more of the child's activation they carry than of the parent's (ties: larger token first).
    Only the few tokens over ``MIN_CHILD_SHARE`` (at most 20) are looked up in the parent."""
    strong = child.shares >= MIN_CHILD_SHARE
    tokens, mine = child.tokens[strong], child.shares[strong]
    theirs = parent.of(tokens)
    own = theirs < RARE_RATIO * mine
    ranked = sorted(zip((mine - theirs)[own].tolist(), tokens[own].tolist(), mine[own].tolist(), theirs[own].tolist(), strict=True), reverse=True)
    return [(token, share, parent_share) for _, token, share, parent_share in ranked[:SPLIT_TOKENS]]
