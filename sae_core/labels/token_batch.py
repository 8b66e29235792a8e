"""Several features' tokens laid end to end, so the rule search treats a chunk of features at once.

A token's contexts are kept as the id of its distinct row of context flags (its "signature",
found once per SAE by ``ContextLibrary``): real windows hold a few thousand distinct rows, so the per-feature context counts the search
needs are one ``bincount`` over (feature, signature) and one small matrix product, instead of a
pass over every token's flags.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sae_core.labels.evidence import TokenSet


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
        """The tokens of ``sets``, all gathered from one ``ContextLibrary``. Their signatures are
        renumbered to the distinct rows the batch holds, in the library's order (the order of
        ``signatures`` on the batch's own rows)."""
        library_flags = sets[0].flags
        if any(s.flags is not library_flags for s in sets):
            raise ValueError("a batch's token sets must come from one ContextLibrary")
        owner = np.repeat(np.arange(len(sets)), [len(s.fires) for s in sets])
        in_library = np.concatenate([s.signature for s in sets])
        present = np.zeros(len(library_flags), dtype=bool)  # a mask, not np.unique's sort
        present[in_library] = True
        signature = (np.cumsum(present) - 1)[in_library]
        flags = library_flags[present]
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

    def spans(self) -> np.ndarray:
        """Where each feature's tokens start, and where the last one's end. (F + 1,) int64."""
        return np.searchsorted(self.owner, np.arange(self.n_features + 1))  # owners ascend

    def count(self, mask: np.ndarray) -> np.ndarray:
        """Tokens in ``mask`` (N,) of each feature. (F,) int64."""
        return np.bincount(self.owner[mask], minlength=self.n_features)

    def signature_counts(self, mask: np.ndarray) -> np.ndarray:
        """Tokens in ``mask`` (N,) of each feature and signature, as floats for the products
        below: float32 (half the work of float64) while every sum of them, at most N, is exact
        in it. (F, S)."""
        size = self.n_features * len(self.flags)
        exact = np.float32 if len(self.owner) < 2**24 else np.float64
        counts = np.bincount(self.cell[mask], minlength=size).astype(exact)
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
        (..., N): tokens last, so that each row of the middle axes is contiguous (the search
        reads them a row at a time)."""
        per_cell = np.moveaxis(table, 0, -2)  # (..., F, S)
        return np.take(per_cell.reshape(*table.shape[1:-1], -1), self.cell, axis=-1)
