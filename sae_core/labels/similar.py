"""Words alike in the subject model's own eyes: the "a token like `save`" part of a rule.

A sparse feature fires on a family of words (`save`, `saving`, `Saved`; `Paris`, `London`) of
which its training examples show only some; a rule that lists the tokens it saw explains nothing
held out. A ``like`` key stands for the word and every word whose input embedding in the subject
model has cosine at least ``SIMILAR_COSINE`` with it. A word's direction is the mean of its
tokens' (``x`` and `` x`` are one word, as everywhere in the rule language), each measured from
the mean embedding: SmolLM2's embeddings share a large common direction, and measured from the
origin the median token has ~800 others at cosine >= 0.6 (measured from the mean: 2).

Scoring tests that cosine exactly (``SimilarWords.like``). The rule search instead reads a table of
each word's most similar words among those of the windows it searches (``SimilarWords.among``):
at most ``MAX_SIMILAR``, so a word with more alike words than that is undercounted by the search
(never by the score).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors import safe_open

# inflections and case (`save`/`saving`/`Save`: 0.7-0.79 from the mean), close kin (`Paris`/`London`
# 0.65); frequent short words bunch too (`if`/`the` 0.71), which a key's measured precision rules out
SIMILAR_COSINE = 0.6
MAX_SIMILAR = 16  # words the search lists as like a word, itself first
_BLOCK = 2048  # words whose similarities are computed at once: (2048, words) float32 at a time


class SimilarWords(NamedTuple):
    vectors: np.ndarray  # (T, d) float32: each text id's unit embedding direction
    # (T + 1, <= MAX_SIMILAR) int32: text ids like each word, -1 past them; row T (padding): none
    table: np.ndarray

    @classmethod
    def of(cls, embedding: np.ndarray, text_id: np.ndarray, n_texts: int) -> SimilarWords:
        """The words of a vocabulary whose token ``i`` has embedding ``embedding[i]`` (V, d) and
        text id ``text_id[i]``; its table lists each word alone until ``among`` fills it."""
        n = min(len(embedding), len(text_id))
        unit = _unit(embedding[:n] - embedding[:n].mean(axis=0))
        # a word's tokens summed a rank at a time: within one rank a word has one token, so
        # fancy-indexed += adds each (np.add.reduceat over rows took 1.8 CPU-s for SmolLM2)
        order = np.argsort(text_id[:n], kind="stable")
        ids = text_id[:n][order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
        vectors = np.zeros((n_texts, embedding.shape[1]), dtype=np.float32)
        for r in range(int(rank.max(initial=-1)) + 1):
            at = order[rank == r]
            vectors[text_id[at]] += unit[at]
        vectors = _unit(vectors)
        table = np.full((n_texts + 1, MAX_SIMILAR), -1, dtype=np.int32)
        table[:n_texts, 0] = np.arange(n_texts)
        return cls(vectors, table)

    def among(self, words: np.ndarray) -> SimilarWords:
        """The table filled for ``words`` (text ids): each one's most similar words among them,
        most similar first (so itself first)."""
        words = np.unique(words[(words >= 0) & (words < len(self.vectors))]).astype(np.int32)
        table = self.table.copy()
        candidates = self.vectors[words]  # (D, d)
        for start in range(0, len(words), _BLOCK):
            block = words[start : start + _BLOCK]
            cosine = self.vectors[block] @ candidates.T  # (b, D)
            width = min(MAX_SIMILAR, len(words))
            top = np.argpartition(-cosine, width - 1, axis=1)[:, :width]
            top_cosine = np.take_along_axis(cosine, top, axis=1)
            order = np.argsort(-top_cosine, axis=1, kind="stable")
            top, top_cosine = (np.take_along_axis(a, order, axis=1) for a in (top, top_cosine))
            table[block, :width] = np.where(top_cosine >= SIMILAR_COSINE, words[top], -1)
        filled = int((table >= 0).sum(axis=1).max())  # most words have few alike: a narrow table
        return self._replace(table=table[:, : max(filled, 1)])

    def like(self, keys: np.ndarray, text_ids: np.ndarray) -> np.ndarray:
        """Where a token of ``text_ids`` (n,) is one of ``keys`` (text ids) or a word like one of
        them. (n,) bool; the padding text id (len(vectors)) is like nothing."""
        words, at = np.unique(text_ids, return_inverse=True)
        known = words < len(self.vectors)
        holds = np.isin(words, keys)
        if len(keys):
            cosine = self.vectors[words[known]] @ self.vectors[keys].T  # (words, keys)
            holds[known] |= (cosine >= SIMILAR_COSINE).any(axis=1)
        return holds[at.reshape(text_ids.shape)]


def _unit(rows: np.ndarray) -> np.ndarray:
    """``rows`` scaled to unit length (rows of zeros stay zero). float32."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32)


def model_folder(source: str, name: str) -> Path | None:
    """Where a subject model's weights are on this machine: the folder it was loaded from, or
    saescope's converted copy of a named model; None when neither is here."""
    if _has_weights(Path(source)):
        return Path(source)
    from sae_core.inputs.subject import cache_dir  # imports torch: only when needed

    converted = cache_dir() / "models" / name
    return converted if _has_weights(converted) else None


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.safetensors"))


def input_embedding(folder: Path, vocab_size: int) -> np.ndarray | None:
    """The input embedding matrix (vocab, d_model) in a transformers model folder's safetensors:
    the 2-D tensor named like an embedding with a row per token; None when there is none."""
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "np") as weights:
            for name in weights.keys():
                shape = weights.get_slice(name).get_shape()
                if (
                    ("embed" in name or "wte" in name)
                    and shape[:1] == [vocab_size]
                    and len(shape) == 2
                ):
                    return weights.get_tensor(name).astype(np.float32)
    return None
