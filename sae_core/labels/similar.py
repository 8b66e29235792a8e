"""Words alike in the subject model's own eyes: the "a token like `save`" part of a rule.

A sparse feature fires on a family of words (`save`, `saving`, `Saved`; `Paris`, `London`) of
which its training examples show only some; a rule that lists the tokens it saw explains nothing
held out. A ``like`` key stands for the word and every word whose input embedding in the subject
model has cosine at least ``SIMILAR_COSINE`` with it. A word's direction is the mean of its
tokens' (``x`` and `` x`` are one word, as everywhere in the rule language), each measured from
the mean embedding: SmolLM2's embeddings share a large common direction, and measured from the
origin the median token has ~800 others at cosine >= 0.6 (measured from the mean: 2).

Scoring tests that cosine exactly (``SimilarWords.like``). The rule search instead reads a table of
each word's most similar words in the vocabulary (``alike_table``): at most ``MAX_SIMILAR``, so a
word with more alike words than that is undercounted by the search (never by the score).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors import safe_open

from sae_core.inputs.cache import cache_dir

# Inflections and case (`save`/`saving`/`Save`: 0.7-0.79 from the mean); frequent short words bunch
# too (`if`/`the` 0.71), which a key's measured precision rules out. Chosen on the demo 4k SAE's
# tuning split: 0.5 -> median F1 0.250, 0.6 -> 0.250, 0.7 -> 0.261 (no like keys: 0.261).
SIMILAR_COSINE = 0.7
MAX_SIMILAR = 16  # words the search lists as like a word, itself first
_BLOCK = 2048  # words whose similarities are computed at once: (2048, words) float32 at a time


class SimilarWords(NamedTuple):
    vectors: np.ndarray  # (T, d) float32: each text id's unit embedding direction
    table: np.ndarray  # (T + 1, <= MAX_SIMILAR) int32: see ``alike_table``

    @classmethod
    def of(cls, embedding: np.ndarray, text_id: np.ndarray, n_texts: int) -> SimilarWords:
        """The words of a vocabulary whose token ``i`` has embedding ``embedding[i]`` (V, d) and
        text id ``text_id[i]``, with their table (see ``alike_table``)."""
        vectors = word_vectors(embedding, text_id, n_texts)
        return cls(vectors, alike_table(vectors))

    @classmethod
    def load(
        cls, folder: Path, vocab_size: int, text_id: np.ndarray, n_texts: int
    ) -> SimilarWords | None:
        """``of`` the input embedding of the model in ``folder``, its table computed once per
        model and vocabulary (~20 CPU-s for SmolLM2) and kept under the cache; None when the
        folder holds no embedding."""
        embedding = input_embedding(folder, vocab_size)
        if embedding is None:
            return None
        vectors = word_vectors(embedding, text_id, n_texts)
        key = hashlib.blake2b(vectors.tobytes(), digest_size=16)
        key.update(f"{SIMILAR_COSINE} {MAX_SIMILAR}".encode())
        path = cache_dir() / "similar" / f"{key.hexdigest()}.npy"
        if path.is_file():
            return cls(vectors, np.load(path))
        table = alike_table(vectors)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        with open(partial, "wb") as out:  # written whole, then renamed: never read half-written
            np.save(out, table)
        partial.replace(path)
        return cls(vectors, table)

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


def word_vectors(embedding: np.ndarray, text_id: np.ndarray, n_texts: int) -> np.ndarray:
    """Each word's unit direction (n_texts, d) float32: the sum of its tokens' unit embeddings,
    each measured from the mean embedding, scaled to unit length."""
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
    return _unit(vectors)


def alike_table(vectors: np.ndarray) -> np.ndarray:
    """Each word's most similar words at cosine >= ``SIMILAR_COSINE``, most similar first (so
    itself first), at most ``MAX_SIMILAR``: (T + 1, width) int32, -1 past them, the last row
    (the padding text id) empty; as wide as the fullest row."""
    n_words = len(vectors)
    width = min(MAX_SIMILAR, n_words)
    table = np.full((n_words + 1, width), -1, dtype=np.int32)
    for start in range(0, n_words, _BLOCK):
        block = slice(start, min(start + _BLOCK, n_words))
        cosine = vectors[block] @ vectors.T  # (block, T)
        top = np.argpartition(-cosine, width - 1, axis=1)[:, :width]
        top_cosine = np.take_along_axis(cosine, top, axis=1)
        order = np.argsort(-top_cosine, axis=1, kind="stable")
        top, top_cosine = (np.take_along_axis(a, order, axis=1) for a in (top, top_cosine))
        table[block] = np.where(top_cosine >= SIMILAR_COSINE, top, -1)
    filled = int((table >= 0).sum(axis=1).max(initial=1))  # most words have few alike
    return table[:, : max(filled, 1)]


def _unit(rows: np.ndarray) -> np.ndarray:
    """``rows`` scaled to unit length (rows of zeros stay zero). float32."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32)


def model_folder(source: str, name: str) -> Path | None:
    """Where a subject model's weights are on this machine: the folder it was loaded from, or
    saescope's converted copy of a named model; None when neither is here."""
    if _has_weights(Path(source)):
        return Path(source)
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
