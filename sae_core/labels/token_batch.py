"""Several features' tokens laid end to end, so the rule search treats a chunk of features at once.

A token's contexts are kept as the id of its distinct row of context flags (its "signature"):
real windows hold a few thousand distinct rows, so the per-feature context counts the search
needs are one ``bincount`` over (feature, signature) and one small matrix product, instead of a
pass over every token's flags.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sae_core.labels.evidence import TokenSet


def signatures(contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of ``contexts`` (N, C) bool, (S, C), and each row's index among them,
    (N,). Rows are packed to 64-bit words first: sorting a word or two per row is far faster
    than sorting rows of flags."""
    packed = np.packbits(contexts, axis=1)  # (N, ceil(C / 8)) uint8
    packed = np.pad(packed, ((0, 0), (0, -packed.shape[1] % 8)))
    words = packed.view(np.uint64)  # (N, ceil(C / 64))
    order = np.lexsort(words.T)
    ordered = words[order]
    starts = np.r_[True, (ordered[1:] != ordered[:-1]).any(axis=1)]
    signature = np.empty(len(contexts), dtype=np.int64)
    signature[order] = np.cumsum(starts) - 1
    return contexts[order[starts]], signature


class TokenBatch(NamedTuple):
    n_features: int
    owner: np.ndarray  # (N,) int64: the feature (0..F-1) of each token
    text_ids: np.ndarray  # (N,) int32, as in TokenSet
    prev_ids: np.ndarray  # (N,) int32
    next_ids: np.ndarray  # (N,) int32
    window_ids: np.ndarray  # (N, WINDOW) int32
    signature: np.ndarray  # (N,) int64: the token's row of ``flags``
    flags: np.ndarray  # (S, C) bool: each distinct row of TokenSet.contexts
    cell: np.ndarray  # (N,) int64: owner * S + signature, what per-feature counts bin
    fires: np.ndarray  # (N,) bool
    keep: np.ndarray  # (N,) bool

    @classmethod
    def of(cls, sets: list[TokenSet]) -> TokenBatch:
        owner = np.repeat(np.arange(len(sets)), [len(s.fires) for s in sets])
        contexts = np.concatenate([s.contexts for s in sets])
        flags, signature = signatures(contexts)
        return cls(
            len(sets),
            owner,
            *(np.concatenate(parts) for parts in zip(*(s[:4] for s in sets), strict=True)),
            signature,
            flags,
            owner * len(flags) + signature,
            np.concatenate([s.fires for s in sets]),
            np.concatenate([s.keep for s in sets]),
        )

    def count(self, mask: np.ndarray) -> np.ndarray:
        """Tokens in ``mask`` (N,) of each feature. (F,) int64."""
        return np.bincount(self.owner[mask], minlength=self.n_features)

    def signature_counts(self, mask: np.ndarray) -> np.ndarray:
        """Tokens in ``mask`` (N,) of each feature and signature, as floats for the products
        below (exact: counts stay far below 2**53). (F, S) float64."""
        size = self.n_features * len(self.flags)
        counts = np.bincount(self.cell[mask], minlength=size).astype(np.float64)
        return counts.reshape(self.n_features, len(self.flags))

    def column_sums(self, mask: np.ndarray) -> np.ndarray:
        """Tokens in ``mask`` (N,) of each feature in each context. (F, C) int64."""
        return (self.signature_counts(mask) @ self.flags).astype(np.int64)

    def pair_sums(self, mask: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Tokens in ``mask`` (N,) of each feature in both its contexts ``rows`` (F, r) and each
        context. (F, r, C) int64."""
        counts = self.signature_counts(mask)  # (F, S)
        inside = self.flags.T[rows]  # (F, r, S): signatures holding each feature's contexts
        both = (counts[:, None, :] * inside).reshape(-1, len(self.flags)) @ self.flags
        return both.reshape(*rows.shape, -1).astype(np.int64)

    def by_signature(self, table: np.ndarray) -> np.ndarray:
        """Each token's entry of ``table`` (F, ..., S), a value per feature and signature.
        (N, ...)."""
        per_cell = np.moveaxis(table, -1, 1)  # (F, S, ...)
        return per_cell.reshape(self.n_features * len(self.flags), *table.shape[1:-1])[self.cell]
