"""What the store says about where a feature fires, split into evidence to make a label from and
held-out evidence to score it on.

For one feature: its top examples and half of its interval samples make the label, against a
quarter as many random contexts from other features' examples (``TRAIN_NEGATIVE_SHARE``); the
other half of the interval samples (every activation bin, alternating ranks) plus as many random
contexts score it. The feature's activation is known at every token
of its own examples; on the random contexts it is taken as zero (they were not among its examples,
and a feature fires on a small fraction of tokens, so few of those tokens are mislabelled).

Every stored window is decoded and lexed once (``ContextLibrary``), into arrays that a chunk of
features' evidence gathers rows from at once (``gather_evidence``): no Python work per token.
"""

from __future__ import annotations

import multiprocessing
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sae_core.labels.lexical import CONTEXT_NAMES, context_masks
from sae_core.labels.rules import WINDOW, written_word
from sae_core.store.db import (
    ContextRow,
    ExampleRow,
    SaeRow,
    SubjectModelRow,
    VocabRow,
    driver_rows,
    unpack_acts,
    unpack_levels_rows,
    unpack_tokens,
)

MIN_NEGATIVE_CONTEXTS = 4  # a feature with one held-out example still meets some non-firing text
# Negative windows a rule is fitted against, per window of the feature's own. Held-out windows
# are half negative, but they are scored on interval samples, where a feature fires on rarer
# tokens than in its top examples, and the rules fitted against as many negatives were too
# narrow for them (recall 0.22, precision 0.5: median of the demo 4k SAE's F1 in (0, 0.5)).
# On that SAE's tuning split: 1 -> median F1 0.250, 0.5 -> 0.267, 0.25 -> 0.272, 0.1 -> 0.270.
TRAIN_NEGATIVE_SHARE = 0.25
# Windows a lexing worker takes at a time: ~0.1 CPU-s of lexing, a few hundred kB of packed flags
# sent back
WINDOWS_PER_LEX = 512


class Vocab(NamedTuple):
    """Token texts from the store, with tokens a label writes alike merged into one "text id":
    those of identical text, and a word with and without its leading space (```x``` in a phrase
    stands for both, and a rule's key matches both)."""

    texts: list[str]  # a text of each text id (the first token's), indexed by text id
    text_id: np.ndarray  # (vocab_size,) int32: token id -> text id
    index: dict[str, int]  # token text -> text id
    bos_token_id: int | None
    token_texts: list[str]  # (vocab_size,) each token's own text, which the lexer reads

    @classmethod
    def of_texts(cls, token_texts: list[str], bos_token_id: int | None = None) -> Vocab:
        """The vocabulary whose token ``i`` has text ``token_texts[i]``."""
        index: dict[str, int] = {}
        by_word: dict[str, int] = {}
        texts: list[str] = []
        text_id = np.zeros(len(token_texts), dtype=np.int32)
        for token_id, text in enumerate(token_texts):
            word = written_word(text) or text
            if word not in by_word:
                by_word[word] = len(texts)
                texts.append(text)
            index[text] = text_id[token_id] = by_word[word]
        return cls(texts, text_id, index, bos_token_id, token_texts)

    @classmethod
    def load(cls, session: Session, sae: SaeRow) -> Vocab:
        model = session.get(SubjectModelRow, sae.model_id)
        rows = session.execute(
            sa.select(VocabRow.token_id, VocabRow.text).where(VocabRow.model_id == sae.model_id)
        ).all()
        token_texts = [""] * max([model.vocab_size] + [token_id + 1 for token_id, _ in rows])
        for token_id, text in rows:
            token_texts[token_id] = text
        return cls.of_texts(token_texts, model.bos_token_id)

    def ids_of(self, texts) -> np.ndarray:
        """Text ids of the given token texts; texts not in the vocabulary are dropped."""
        return np.array([self.index[t] for t in texts if t in self.index], dtype=np.int32)

    def lookup(self, texts) -> np.ndarray:
        """(len(self.texts) + 1,) bool: True at the text ids of ``texts``; the last entry, where
        the missing neighbour (-1) lands, is False."""
        out = np.zeros(len(self.texts) + 1, dtype=bool)
        out[self.ids_of(texts)] = True
        return out


def signatures(contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of ``contexts`` (N, C) bool, (S, C), and each row's index among them,
    (N,). Rows are packed to 64-bit words first: sorting a word or two per row is far faster
    than sorting rows of flags."""
    packed = np.packbits(contexts, axis=1)  # (N, ceil(C / 8)) uint8
    packed = np.pad(packed, ((0, 0), (0, -packed.shape[1] % 8)))
    words = packed.view(np.uint64)  # (N, ceil(C / 64))
    order = np.lexsort(words.T)
    ordered = words[order]
    starts = np.ones(len(ordered), dtype=bool)  # (no row at all in a library of no window)
    starts[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    signature = np.empty(len(contexts), dtype=np.int64)
    signature[order] = np.cumsum(starts) - 1
    return contexts[order[starts]], signature


class TokenSet(NamedTuple):
    """Tokens of several windows laid end to end, with whether the feature fires on each."""

    text_ids: np.ndarray  # (n,) int32
    prev_ids: np.ndarray  # (n,) int32, text id of the previous token (BOS included), -1: none
    next_ids: np.ndarray  # (n,) int32, text id of the next token, -1 where there is none
    window_ids: np.ndarray  # (n, WINDOW) int32, text ids of the tokens before, -1 where none
    signature: np.ndarray  # (n,) int64: the token's row of ``flags``
    flags: np.ndarray  # (S, len(CONTEXT_NAMES)) bool: the library's distinct rows of contexts
    fires: np.ndarray  # (n,) bool
    keep: np.ndarray  # (n,) bool: a real token (not padding or BOS), which rules may pick

    @property
    def contexts(self) -> np.ndarray:
        """(n, len(CONTEXT_NAMES)) bool: the contexts each token is in."""
        return self.flags[self.signature]


def _lex(windows: list[tuple[str, ...]]) -> list[np.ndarray]:
    """The context flags of each token of ``windows`` (decoded tokens), packed to bits as they
    travel between processes: (len(window), ceil(C / 8)) uint8 each."""
    return [np.packbits(context_masks(list(texts)).T, axis=-1) for texts in windows]


# What a forked lexing worker reads, set in the parent just before the pool forks: the windows
# to lex. A task names its windows by their range alone, so no window is pickled on its way to
# a worker.
_LEXING: list[tuple[str, ...]] | None = None


def _lex_task(start: int) -> list[np.ndarray]:
    return _lex(_LEXING[start : start + WINDOWS_PER_LEX])


# Windows lexed in this process, by their decoded tokens, the most recent last: the SAEs of a
# release store the same windows (the demo's six, 3,840 windows each: 3,834 distinct in all), so
# labelling a release lexes each once. ~1 kB a window.
_LEXED: OrderedDict[tuple[str, ...], np.ndarray] = OrderedDict()
LEXED_WINDOWS = 16_384


def lex_windows(
    vocab: Vocab,
    windows: list[np.ndarray],
    seq: int,
    workers: int,
    meanwhile: Callable[[], object] | None = None,
) -> np.ndarray:
    """(len(windows), seq, C) bool: the contexts of each token of ``windows`` (token ids, each at
    most ``seq`` long). Lexing is Python work per window (~0.2 ms), the bulk of a library:
    windows this process lexed recently are not lexed again, and ``workers`` forked processes
    share the others, ``WINDOWS_PER_LEX`` at a time. ``meanwhile``: work of this process, done
    while they lex (or before lexing here)."""
    global _LEXING
    texts = [tuple(vocab.token_texts[i] for i in t.tolist()) for t in windows]
    missing = list(dict.fromkeys(t for t in texts if t not in _LEXED))
    starts = range(0, len(missing), WINDOWS_PER_LEX)
    workers = min(workers, len(starts))
    meanwhile = meanwhile or (lambda: None)
    if workers <= 1:
        meanwhile()
        lexed = [_lex(missing[i : i + WINDOWS_PER_LEX]) for i in starts]
    else:
        _LEXING = missing
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                results = pool.imap(_lex_task, starts)
                meanwhile()
                lexed = list(results)
        finally:
            _LEXING = None
    found = {t: _LEXED[t] for t in texts if t in _LEXED}
    found.update(zip(missing, (flags for part in lexed for flags in part), strict=True))
    for t, flags in found.items():
        _LEXED[t] = flags
        _LEXED.move_to_end(t)
    while len(_LEXED) > LEXED_WINDOWS:
        _LEXED.popitem(last=False)
    n_bytes = -(-len(CONTEXT_NAMES) // 8)
    packed = np.zeros((len(windows), seq, n_bytes), dtype=np.uint8)
    for r, t in enumerate(texts):
        packed[r, : len(t)] = found[t]
    return np.unpackbits(packed, axis=-1, count=len(CONTEXT_NAMES)).view(bool)


class ContextLibrary:
    """Every stored window of one SAE, decoded and lexed once, as (n_contexts, seq) arrays."""

    def __init__(
        self,
        vocab: Vocab,
        token_ids: dict[int, np.ndarray],
        workers: int = 1,
        meanwhile: Callable[[], object] | None = None,
    ):
        """``workers``: processes lexing the windows (forked: a caller passes more than one only
        where ``fork`` is available); ``meanwhile``: work of this process while they lex."""
        self.vocab = vocab
        self.ids = np.fromiter(token_ids, dtype=np.int64, count=len(token_ids))  # (n_contexts,)
        self.row = {cid: r for r, cid in enumerate(token_ids)}
        seq = max((len(t) for t in token_ids.values()), default=0)
        tokens = np.full((len(self.ids), seq), -1, dtype=np.int64)  # (n_contexts, seq)
        for r, t in enumerate(token_ids.values()):
            tokens[r, : len(t)] = t
        self.token_ids = tokens
        self.lengths = np.fromiter(
            map(len, token_ids.values()), dtype=np.int64, count=len(self.ids)
        )
        missing = len(vocab.texts)  # a text id no rule names (padding, and beyond the window)
        text = np.where(tokens >= 0, vocab.text_id[np.maximum(tokens, 0)], missing).astype(np.int32)
        self.keep = tokens >= 0
        if vocab.bos_token_id is not None:
            self.keep &= tokens != vocab.bos_token_id
        shifted = np.full((len(self.ids), seq + WINDOW), -1, dtype=np.int32)
        shifted[:, WINDOW:] = np.where(tokens >= 0, text, -1)  # BOS is a neighbour, padding none
        self.text = np.where(self.keep, text, missing)
        self.next = np.full_like(self.text, -1)
        self.next[:, :-1] = shifted[:, WINDOW + 1 :]
        # window[:, t, j] = text id j + 1 tokens before t
        self.window = np.stack(
            [shifted[:, WINDOW - j - 1 : WINDOW - j - 1 + seq] for j in range(WINDOW)], axis=-1
        )
        self.prev = self.window[:, :, 0].copy()
        contexts = lex_windows(vocab, list(token_ids.values()), seq, workers, meanwhile)
        # each token's row of distinct context flags, found once here rather than per batch
        self.flags, signature = signatures(contexts.reshape(-1, len(CONTEXT_NAMES)))
        self.signature = signature.reshape(len(self.ids), seq)

    @classmethod
    def load(
        cls,
        session: Session,
        sae: SaeRow,
        vocab: Vocab,
        ids: list[int] | None = None,
        *,
        workers: int = 1,
        meanwhile: Callable[[], object] | None = None,
    ) -> ContextLibrary:
        """All the SAE's windows, or only ``ids`` (``workers``, ``meanwhile``: see ``__init__``)."""
        query = sa.select(ContextRow.id, ContextRow.token_ids).where(ContextRow.sae_id == sae.id)
        if ids is not None:
            query = query.where(ContextRow.id.in_(ids))
        rows = session.execute(query)
        return cls(vocab, {cid: unpack_tokens(blob) for cid, blob in rows}, workers, meanwhile)

    def texts(self, context_id: int) -> list[str]:
        """The decoded tokens of a window, BOS included."""
        r = self.row[context_id]
        return [self.vocab.token_texts[i] for i in self.token_ids[r, : self.lengths[r]]]

    def tokens(self, rows: np.ndarray, fires: np.ndarray) -> TokenSet:
        """The tokens of windows ``rows`` (m,), laid end to end (n = m * seq); ``fires`` (m, seq)
        bool."""
        keep = self.keep[rows].ravel()
        return TokenSet(
            self.text[rows].ravel(),
            self.prev[rows].ravel(),
            self.next[rows].ravel(),
            self.window[rows].reshape(-1, WINDOW),
            self.signature[rows].ravel(),
            self.flags,
            fires.ravel() & keep,
            keep,
        )


class Example(NamedTuple):
    kind: str  # "top" | "interval"
    bin: int
    rank: int
    context_id: int
    max_act: float
    acts_blob: bytes  # the feature's activations in the window, as ``pack_acts`` stores them

    def acts(self, length: int) -> np.ndarray:
        """The feature's activation at every token of the window. (length,) float32."""
        return unpack_acts(self.acts_blob, self.max_act, length)


def load_examples(
    session: Session, sae_id: int, lo: int, hi: int, *, contexts: list[int] | None = None
) -> dict[int, list[Example]]:
    """Examples of features lo..hi-1 (only those in ``contexts`` if given), by feature."""
    query = sa.select(
        ExampleRow.feature_idx,
        ExampleRow.kind,
        ExampleRow.bin,
        ExampleRow.rank,
        ExampleRow.context_id,
        ExampleRow.max_act,
        ExampleRow.acts,
    ).where(ExampleRow.sae_id == sae_id, ExampleRow.feature_idx >= lo, ExampleRow.feature_idx < hi)
    if contexts is not None:
        query = query.where(ExampleRow.context_id.in_(contexts))
    query = query.order_by(ExampleRow.feature_idx, ExampleRow.kind, ExampleRow.bin, ExampleRow.rank)
    rows = driver_rows(session, query)
    out: dict[int, list[Example]] = {}
    for feature_idx, *example in rows:
        out.setdefault(feature_idx, []).append(Example(*example))
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
        order = list(dict.fromkeys(rng.integers(0, len(pool), size=2 * wanted).tolist()))
    out: list[int] = []
    for cid in pool[order].tolist():  # Python ints: reading numpy's one at a time cost more
        if cid not in exclude:
            out.append(cid)
            if len(out) == n:
                break
    return out


class Windows(NamedTuple):
    """Stored windows to lay end to end: the examples' own (firing where they fire), then
    ``negatives`` (context ids, firing nowhere)."""

    examples: list[Example]
    negatives: list[int]


def gather_windows(library: ContextLibrary, sets: list[Windows]) -> list[TokenSet]:
    """The tokens of each set of windows, gathered from the library at once (a chunk of
    features' evidence in one gather, rather than two small ones per feature)."""
    n_rows = np.array([len(w.examples) + len(w.negatives) for w in sets], dtype=np.int64)
    n_examples = np.array([len(w.examples) for w in sets], dtype=np.int64)
    contexts = [c for w in sets for c in [e.context_id for e in w.examples] + w.negatives]
    rows = np.fromiter(map(library.row.__getitem__, contexts), dtype=np.int64, count=len(contexts))
    # each example's row: its set's first row, plus its rank in the set
    set_start, example_start = np.cumsum(n_rows) - n_rows, np.cumsum(n_examples) - n_examples
    example_rows = np.repeat(set_start - example_start, n_examples) + np.arange(n_examples.sum())
    counts, positions, _ = unpack_levels_rows([e.acts_blob for w in sets for e in w.examples])
    seq = library.text.shape[1]
    fires = np.zeros((len(rows), seq), dtype=bool)
    fires[np.repeat(example_rows, counts), positions] = True
    tokens = library.tokens(rows, fires)
    ends = np.cumsum(n_rows) * seq
    return [
        tokens._make(
            field if name == "flags" else field[start:end]
            for name, field in zip(TokenSet._fields, tokens, strict=True)
        )
        for start, end in zip((ends - n_rows * seq).tolist(), ends.tolist(), strict=True)
    ]


class _Drawn(NamedTuple):
    """The windows a feature's evidence is made of."""

    train: Windows
    heldout: Windows
    heldout_contexts: HeldOut
    train_examples: list[Example]


def _draw(
    library: ContextLibrary,
    feature_idx: int,
    examples: list[Example],
    *,
    seed: int,
    exclude: frozenset[int],
) -> _Drawn | None:
    train, heldout = split_examples(examples)
    if not heldout or not train:
        return None
    rng = np.random.default_rng([seed, feature_idx])
    own = {e.context_id for e in examples} | exclude
    n_train_neg = max(len({e.context_id for e in train}), MIN_NEGATIVE_CONTEXTS)
    n_heldout_neg = max(len(heldout), MIN_NEGATIVE_CONTEXTS)
    negatives = sample_negatives(library.ids, own, n_train_neg + n_heldout_neg, rng)
    # drawn after as many as there are training windows, the held-out negatives are those every
    # earlier version scored on
    held = HeldOut([e.context_id for e in heldout], negatives[n_train_neg:])
    n_fitted_neg = max(round(TRAIN_NEGATIVE_SHARE * n_train_neg), 1)
    return _Drawn(
        Windows(train, negatives[:n_fitted_neg]),
        heldout_windows(library, examples, held),
        held,
        train,
    )


def gather_evidence(
    library: ContextLibrary,
    examples: dict[int, list[Example]],
    features: list[int],
    *,
    seed: int,
    exclude: frozenset[int] = frozenset(),
) -> list[FeatureEvidence | None]:
    """Train and held-out tokens of each of ``features`` (``examples``: theirs, by feature); None
    for a feature with no held-out example. ``exclude``: contexts never drawn as negatives
    (besides the feature's own)."""
    drawn = [
        _draw(library, idx, examples.get(idx, []), seed=seed, exclude=exclude) for idx in features
    ]
    found = [d for d in drawn if d is not None]
    tokens = iter(gather_windows(library, [w for d in found for w in d[:2]]))
    pairs = zip(tokens, tokens, strict=True)  # (train, held out) of each feature found
    return [
        None if d is None else FeatureEvidence(*next(pairs), d.heldout_contexts, d.train_examples)
        for d in drawn
    ]


def build_evidence(
    library: ContextLibrary,
    feature_idx: int,
    examples: list[Example],
    *,
    seed: int,
    exclude: frozenset[int] = frozenset(),
) -> FeatureEvidence | None:
    """``gather_evidence`` of one feature."""
    return gather_evidence(
        library, {feature_idx: examples}, [feature_idx], seed=seed, exclude=exclude
    )[0]


def tuning_evidence(
    library: ContextLibrary, feature_idx: int, examples: list[Example], *, seed: int
) -> FeatureEvidence | None:
    """The training evidence alone, split again as ``build_evidence`` splits all of it, with
    negatives from neither side of the first split: what the search's settings are chosen on,
    so the tokens labels are scored on never choose them."""
    evidence = build_evidence(library, feature_idx, examples, seed=seed)
    if evidence is None:
        return None
    held = evidence.heldout_contexts
    scored = frozenset(held.positives + held.negatives + [e.context_id for e in examples])
    return build_evidence(
        library, feature_idx, evidence.train_examples, seed=seed + 1, exclude=scored
    )


def heldout_windows(library: ContextLibrary, examples: list[Example], held: HeldOut) -> Windows:
    """The held-out windows of a feature, firing where its own ``examples`` say."""
    by_context = {e.context_id: e for e in examples}
    return Windows(
        [by_context[c] for c in held.positives if c in by_context],
        [c for c in held.negatives if c in library.row],
    )


def heldout_tokens(library: ContextLibrary, examples: list[Example], held: HeldOut) -> TokenSet:
    """The held-out tokens of a feature, from the stored contexts and its own examples' activations."""
    return gather_windows(library, [heldout_windows(library, examples, held)])[0]
