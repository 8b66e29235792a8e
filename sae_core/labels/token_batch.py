"""Several features' tokens laid end to end, so the rule search reads a chunk of features in one
call (``sae_core.labels.induction``).

A token's contexts are kept as the id of its distinct row of context flags (its "signature",
found once per SAE by ``ContextLibrary``): real windows hold a few thousand distinct rows, so a
feature's context counts are a count per signature and a sum of those rows, instead of a pass
over every token's flags.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sae_core.labels.evidence import TokenSet
from sae_core.labels.rules import WINDOW


class TokenBatch(NamedTuple):
    n_features: int
    owner: np.ndarray  # (N,) int64: the feature (0..F-1) of each token, ascending
    text_ids: np.ndarray  # (N,) int32, as in TokenSet
    prev_ids: np.ndarray  # (N,) int32
    next_ids: np.ndarray  # (N,) int32
    window_ids: np.ndarray  # (N, WINDOW) int32
    signature: np.ndarray  # (N,) int64: the token's row of ``flags``
    flags: np.ndarray  # (S, C) bool: each distinct row of TokenSet.contexts
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
        return cls(
            len(sets),
            owner,
            *(np.concatenate(parts) for parts in zip(*(s[:4] for s in sets), strict=True)),
            (np.cumsum(present) - 1)[in_library],
            library_flags[present],
            np.concatenate([s.fires for s in sets]),
            np.concatenate([s.keep for s in sets]),
        )

    @classmethod
    def empty(cls, n_contexts: int) -> TokenBatch:
        """A batch of no feature (``n_contexts`` columns of flags)."""
        ids = np.zeros(0, dtype=np.int32)
        no = np.zeros(0, dtype=bool)
        return cls(
            0,
            np.zeros(0, dtype=np.int64),
            ids,
            ids,
            ids,
            np.zeros((0, WINDOW), dtype=np.int32),
            np.zeros(0, dtype=np.int64),
            np.zeros((0, n_contexts), dtype=bool),
            no,
            no,
        )

    def spans(self) -> np.ndarray:
        """Where each feature's tokens start, and where the last one's end. (F + 1,) int64."""
        return np.searchsorted(self.owner, np.arange(self.n_features + 1))  # owners ascend
