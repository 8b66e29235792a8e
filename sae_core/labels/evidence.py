"""What the store says about where a feature fires, split into evidence to make a label from and
held-out evidence to score it on.

For one feature: its top examples and half of its interval samples make the label; the other
half of the interval samples (every activation bin, alternating ranks) plus as many random
contexts from other features' examples score it. The feature's activation is known at every token
of its own examples; on the random contexts it is taken as zero (they were not among its examples,
and a feature fires on a small fraction of tokens, so few of those tokens are mislabelled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sae_core.labels.rules import context_masks
from sae_core.store.db import (
    ContextRow,
    ExampleRow,
    SaeRow,
    SubjectModelRow,
    VocabRow,
    unpack_acts,
    unpack_tokens,
)

MIN_NEGATIVE_CONTEXTS = 4  # a feature with one held-out example still meets some non-firing text


class Vocab(NamedTuple):
    """Token texts from the store, with tokens of identical text merged into one "text id"."""

    texts: list[str]  # text of each distinct token text, indexed by text id
    text_id: np.ndarray  # (vocab_size,) int32: token id -> text id
    index: dict[str, int]  # text -> text id
    bos_token_id: int | None

    @classmethod
    def load(cls, session: Session, sae: SaeRow) -> Vocab:
        model = session.get(SubjectModelRow, sae.model_id)
        rows = session.execute(
            sa.select(VocabRow.token_id, VocabRow.text).where(VocabRow.model_id == sae.model_id)
        ).all()
        size = max([model.vocab_size] + [token_id + 1 for token_id, _ in rows])
        index: dict[str, int] = {}
        text_id = np.zeros(size, dtype=np.int32)
        texts: list[str] = []
        for token_id, text in sorted(rows):
            if text not in index:
                index[text] = len(texts)
                texts.append(text)
            text_id[token_id] = index[text]
        return cls(texts, text_id, index, model.bos_token_id)

    def ids_of(self, texts) -> np.ndarray:
        """Text ids of the given token texts; texts not in the vocabulary are dropped."""
        return np.array([self.index[t] for t in texts if t in self.index], dtype=np.int32)


class ContextTokens(NamedTuple):
    """One stored window, ready for labelling (BOS dropped; seq = tokens kept)."""

    text_ids: np.ndarray  # (seq,) int32
    prev_ids: np.ndarray  # (seq,) int32, text id of the previous token, -1 where there is none
    contexts: np.ndarray  # (len(CONTEXT_NAMES), seq) bool
    keep: np.ndarray  # (full_seq,) bool: which positions of the stored window these are


class TokenSet(NamedTuple):
    """Tokens of several windows laid end to end, with whether the feature fires on each."""

    text_ids: np.ndarray  # (n,) int32
    prev_ids: np.ndarray  # (n,) int32
    contexts: np.ndarray  # (len(CONTEXT_NAMES), n) bool
    fires: np.ndarray  # (n,) bool

    @classmethod
    def join(cls, windows: list[tuple[ContextTokens, np.ndarray]]) -> TokenSet:
        """``windows``: (context, fires (seq,) bool) pairs."""
        return cls(
            np.concatenate([c.text_ids for c, _ in windows]),
            np.concatenate([c.prev_ids for c, _ in windows]),
            np.concatenate([c.contexts for c, _ in windows], axis=1),
            np.concatenate([f for _, f in windows]),
        )


@dataclass
class ContextLibrary:
    """Every stored window of one SAE, decoded and lexed once on first use."""

    vocab: Vocab
    token_ids: dict[int, np.ndarray]  # context id -> (full_seq,) int32
    _decoded: dict[int, ContextTokens] = field(default_factory=dict)

    def __post_init__(self):
        self.ids = np.fromiter(
            self.token_ids, dtype=np.int64, count=len(self.token_ids)
        )  # (n_contexts,)

    @classmethod
    def load(
        cls, session: Session, sae: SaeRow, vocab: Vocab, ids: list[int] | None = None
    ) -> ContextLibrary:
        """All the SAE's windows, or only ``ids``."""
        query = sa.select(ContextRow.id, ContextRow.token_ids).where(ContextRow.sae_id == sae.id)
        if ids is not None:
            query = query.where(ContextRow.id.in_(ids))
        rows = session.execute(query)
        return cls(vocab, {cid: unpack_tokens(blob) for cid, blob in rows})

    def get(self, context_id: int) -> ContextTokens:
        if context_id not in self._decoded:
            self._decoded[context_id] = self._decode(self.token_ids[context_id])
        return self._decoded[context_id]

    def _decode(self, token_ids: np.ndarray) -> ContextTokens:
        keep = (
            token_ids != self.vocab.bos_token_id
            if self.vocab.bos_token_id is not None
            else np.ones(len(token_ids), bool)
        )
        text_ids = self.vocab.text_id[token_ids]  # (full_seq,)
        prev_ids = np.concatenate([[-1], text_ids[:-1]]).astype(np.int32)
        texts = [self.vocab.texts[i] for i in text_ids]
        masks = context_masks(texts)  # (C, full_seq)
        return ContextTokens(text_ids[keep], prev_ids[keep], masks[:, keep], keep)

    def window(self, context_id: int, acts: np.ndarray | None) -> tuple[ContextTokens, np.ndarray]:
        """A window with where the feature fires; ``acts`` None means a negative (fires nowhere)."""
        tokens = self.get(context_id)
        fires = (
            acts[tokens.keep] > 0
            if acts is not None
            else np.zeros(len(tokens.text_ids), dtype=bool)
        )
        return tokens, fires


class Example(NamedTuple):
    kind: str  # "top" | "interval"
    bin: int
    rank: int
    context_id: int
    acts: np.ndarray  # (full_seq,) float32, the feature's activation at each token


def load_examples(
    session: Session,
    sae_id: int,
    lo: int,
    hi: int,
    seq_len: dict[int, int],
    *,
    contexts: list[int] | None = None,
) -> dict[int, list[Example]]:
    """Examples of features lo..hi-1 (only those in ``contexts`` if given), by feature.
    ``seq_len``: context id -> stored length."""
    query = sa.select(ExampleRow).where(
        ExampleRow.sae_id == sae_id, ExampleRow.feature_idx >= lo, ExampleRow.feature_idx < hi
    )
    if contexts is not None:
        query = query.where(ExampleRow.context_id.in_(contexts))
    rows = session.execute(
        query.order_by(ExampleRow.feature_idx, ExampleRow.kind, ExampleRow.bin, ExampleRow.rank)
    ).scalars()
    out: dict[int, list[Example]] = {}
    for row in rows:
        acts = unpack_acts(row.acts, row.max_act, seq_len[row.context_id])
        out.setdefault(row.feature_idx, []).append(
            Example(row.kind, row.bin, row.rank, row.context_id, acts)
        )
    return out


class HeldOut(NamedTuple):
    """The contexts a label is scored on; stored with the label so the score can be recomputed."""

    positives: list[int]  # context ids of the feature's held-out examples
    negatives: list[int]  # context ids of other features' examples

    def to_json(self) -> dict:
        return {"positives": self.positives, "negatives": self.negatives}

    @classmethod
    def from_json(cls, data: dict) -> HeldOut:
        return cls([int(c) for c in data["positives"]], [int(c) for c in data["negatives"]])


class FeatureEvidence(NamedTuple):
    train: TokenSet  # make the label from these
    heldout: TokenSet  # score it on these
    heldout_contexts: HeldOut
    train_examples: list[Example]  # what an explainer may see


def split_examples(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train, held out): alternate interval samples (every bin on both sides); top examples train.
    With fewer than two interval samples, alternate the top examples instead."""
    interval = [e for e in examples if e.kind == "interval"]
    top = [e for e in examples if e.kind != "interval"]
    alternating, rest = (interval, top) if len(interval) >= 2 else (top, interval)
    train = rest + alternating[0::2]
    train_contexts = {e.context_id for e in train}
    heldout = [e for e in alternating[1::2] if e.context_id not in train_contexts]
    return train, heldout


def sample_negatives(
    pool: np.ndarray, exclude: set[int], n: int, rng: np.random.Generator
) -> list[int]:
    """``n`` distinct context ids from ``pool`` not in ``exclude`` (fewer if the pool is small)."""
    wanted = n + len(exclude)
    if len(pool) <= 4 * wanted:
        order = rng.permutation(len(pool))
    else:  # a few random draws beat shuffling a large pool for every feature
        order = dict.fromkeys(rng.integers(0, len(pool), size=2 * wanted).tolist())
    out: list[int] = []
    for i in order:
        cid = int(pool[i])
        if cid not in exclude:
            out.append(cid)
            if len(out) == n:
                break
    return out


def build_evidence(
    library: ContextLibrary, feature_idx: int, examples: list[Example], *, seed: int
) -> FeatureEvidence | None:
    """Train and held-out tokens of one feature; None when it has no held-out example."""
    train, heldout = split_examples(examples)
    if not heldout or not train:
        return None
    rng = np.random.default_rng([seed, feature_idx])
    own = {e.context_id for e in examples}
    n_train_neg = max(len({e.context_id for e in train}), MIN_NEGATIVE_CONTEXTS)
    n_heldout_neg = max(len(heldout), MIN_NEGATIVE_CONTEXTS)
    negatives = sample_negatives(library.ids, own, n_train_neg + n_heldout_neg, rng)
    held = HeldOut([e.context_id for e in heldout], negatives[n_train_neg:])
    train_set = TokenSet.join(
        [library.window(e.context_id, e.acts) for e in train]
        + [library.window(c, None) for c in negatives[:n_train_neg]]
    )
    return FeatureEvidence(train_set, heldout_tokens(library, examples, held), held, train)


def heldout_tokens(library: ContextLibrary, examples: list[Example], held: HeldOut) -> TokenSet:
    """The held-out tokens of a feature, from the stored contexts and its own examples' activations."""
    acts = {e.context_id: e.acts for e in examples}
    return TokenSet.join(
        [library.window(c, acts[c]) for c in held.positives if c in acts]
        + [library.window(c, None) for c in held.negatives if c in library.token_ids]
    )
