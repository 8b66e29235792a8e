"""Find the rule that best predicts where a feature fires, from its training evidence alone.

The rule is a decision list of up to ``MAX_TERMS`` terms (see ``sae_core.labels.rules``), grown
greedily: each step adds the term that most raises the F1 of the list on the training tokens, less
a price for every part, key and term (a complexity penalty, so labels stay short and hold beyond
the examples they were made from). A step's candidates, all counted at once with ``bincount``:
- a set of keys of one kind (the token, the one before, the one after, one among the ``WINDOW``
  before), alone or within one context; each set is grown greedily (keys sorted by smoothed
  precision, the prefix with the best objective wins: adding a key helps F1 exactly when its
  precision beats F1/2, so the best set is such a prefix);
- one context or class alone, or two together ("a number in a string");
then the best candidate is refined with one more part at a time (a key set, a context, or an
exception "except in a comment") while that pays for itself.

Every feature of a chunk is searched at once (``fit_rules``): their tokens lie end to end
(``TokenBatch``), each step's counts are one ``bincount`` over (feature, candidate), and a term is
held as arrays (local key ids and context columns) until the search ends. Each feature's search
reads only its own tokens, so its rule is the one it gets alone.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sae_core.labels.evidence import TokenSet, Vocab
from sae_core.labels.lexical import CONTEXT_NAMES, TOKEN_CLASSES
from sae_core.labels.rules import LabelRule, Term
from sae_core.labels.scoring import f1_score
from sae_core.labels.token_batch import TokenBatch

MAX_TERMS = 2  # a label says at most two things: a third changed no held-out F1 on the demo SAE
MAX_KEYS = 8  # labels show 4; longer lists rarely hold beyond the training examples
MAX_REFINEMENTS = 1  # parts added to a term after its first two (a second changed nothing)
MIN_KEY_FIRINGS = 2  # a key seen firing once is an anecdote, not a pattern
MAX_CANDIDATE_KEYS = 16  # of each kind, the keys seen firing most often
MAX_COLUMNS = 4  # contexts a key set is tried within: those holding the most firings
SHRINK = 1.0  # standard deviations of its count a candidate's firings are discounted by
PART_PENALTY = 0.03  # F1 each part beyond a term's first must add: shorter labels read better
KEY_PENALTY = 0.005  # F1 each extra key must add, so one-off tokens don't pad the label
TERM_PENALTY = 0.04  # F1 a second term must add
# Features searched at once: ~120k tokens, whose arrays stay in the CPU's caches (16, 32, 64 and
# 256 measured on the demo's 4096-wide SAE: 32 took the fewest CPU-seconds)
FEATURES_PER_SEARCH = 32
KINDS = ("tokens", "previous", "following", "window")  # Term fields that hold keys
_IS_CLASS = np.array([name in TOKEN_CLASSES for name in CONTEXT_NAMES])  # (C,)


class FittedRule(NamedTuple):
    rule: LabelRule
    train_f1: float  # on the evidence it was made from (optimistic; the held-out score is honest)
    objective: float  # what the search maximised: F1 with shrunk firings, less the penalties


# ---------------------------------------------------------------------------------------------
# What the search reads


class _Keys(NamedTuple):
    """One kind of key, renumbered per feature to the keys seen where it fires. Only a token's
    own feature's keys matter to it: one entry per such key and slot the token is in (see
    ``_Search``), grouped by slot, then token (a key may repeat within a token's window: the
    ranking counts it twice, the prefix sums once). Entries are kept only where a step may count
    them: kept tokens of features that fire."""

    texts: np.ndarray  # (F, K) text ids of each feature's keys, -1 past its own
    count: np.ndarray  # (F,) keys of each feature
    token: np.ndarray  # (e,) int32: the token of each entry
    # (e,) int32: its (feature, slot, key) and whether its token fires, one number that a step's
    # counts bin: ((owner * slots + slot) * (K + 1) + key) * 2 + fires
    tally: np.ndarray
    first: np.ndarray  # (e,) bool: the first entry of its token in its slot
    several: bool  # some token has several entries in a slot (a window's keys)
    # each kept token's keys, once (the "anywhere" slot's entries): what a term's mask reads
    held_token: np.ndarray  # (h,)
    held_key: np.ndarray  # (h,) owner * (K + 1) + key


class _Search(NamedTuple):
    """What every step of a batch's search reads."""

    batch: TokenBatch
    n_firing: np.ndarray  # (F,)
    # (F, MAX_COLUMNS) the contexts key sets are tried within, -1 past them; with "anywhere",
    # the MAX_COLUMNS + 1 slots a key set is tried in
    columns: np.ndarray
    keys: dict[str, _Keys]


def _ranks(groups: np.ndarray) -> np.ndarray:
    """Each element's position among the equal elements of sorted ``groups`` (m,)."""
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    return np.arange(len(groups)) - np.repeat(starts, np.diff(np.r_[starts, len(groups)]))


def _chosen_keys(
    batch: TokenBatch, values: np.ndarray, n_texts: int, also: list[np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(feature, text id) of each feature's keys, in its order: ``values`` (N, slots) text ids,
    -1 for none; the keys seen firing most often, and ``also`` (of each feature, text ids) when
    they are seen firing at all. A feature keeps its keys in text order, or by count when it had
    more than it keeps and nothing was added."""
    seen = values[batch.fires]  # (firing tokens, slots)
    pairs = (batch.owner[batch.fires, None] * n_texts + seen)[seen >= 0]
    pair, counts = np.unique(pairs, return_counts=True)  # by feature, then text
    feature, text = np.divmod(pair, n_texts)
    often = counts >= MIN_KEY_FIRINGS
    by_count = np.lexsort((text[often], -counts[often], feature[often]))
    feature, text = feature[often][by_count], text[often][by_count]
    n_often = np.bincount(feature, minlength=batch.n_features)
    rank = _ranks(feature)
    kept = rank < MAX_CANDIDATE_KEYS
    feature, text, rank = feature[kept], text[kept], rank[kept]
    sorted_by_text = n_often <= MAX_CANDIDATE_KEYS
    if also is not None:
        wanted = np.concatenate([f * n_texts + ids for f, ids in enumerate(also)])
        added = pair[np.isin(pair, wanted)]
        feature = np.r_[feature, added // n_texts]
        text = np.r_[text, added % n_texts]
        rank = np.r_[rank, np.zeros(len(added), dtype=rank.dtype)]
        sorted_by_text |= np.array([ids.size > 0 for ids in also])
        unique = np.unique(feature * n_texts + text, return_index=True)[1]
        feature, text, rank = feature[unique], text[unique], rank[unique]
    order = np.lexsort((np.where(sorted_by_text[feature], text, rank), feature))
    return feature[order], text[order]


def _local_ids(
    batch: TokenBatch, values: np.ndarray, feature: np.ndarray, text: np.ndarray, n_texts: int
) -> tuple[np.ndarray, int]:
    """Each value's local key id among its token's feature's keys (``feature``, ``text``, in
    each feature's order), ``width`` (the most keys of a feature) where it is none of them; and
    ``width``. Each feature reads its own row of a (feature, text id) table with its own tokens
    (they lie together): one small gather, no index arithmetic over every value."""
    width = int(np.bincount(feature, minlength=batch.n_features).max(initial=0))
    lookup = np.full((batch.n_features, n_texts + 1), width, dtype=np.min_scalar_type(width))
    lookup[feature, text] = _ranks(feature)  # the last column: -1, none
    local = np.empty(values.shape, dtype=lookup.dtype)
    spans = batch.spans()
    for f in range(batch.n_features):
        np.take(lookup[f], values[spans[f] : spans[f + 1]], out=local[spans[f] : spans[f + 1]])
    return local, width


def _keys(
    batch: TokenBatch,
    values: np.ndarray,
    n_texts: int,
    in_slot: np.ndarray,
    also: list[np.ndarray] | None = None,
) -> _Keys:
    """One kind of key of every feature: ``values`` (N, slots) text ids, -1 for none;
    ``in_slot`` (slots, N) the tokens of each slot."""
    feature, text = _chosen_keys(batch, values, n_texts, also)
    local, width = _local_ids(batch, values, feature, text, n_texts)
    # (N, values) -> each token's keys, in order: one flat search, no (token, column) pairs
    found = np.flatnonzero(local < width)
    token, key = found // local.shape[1], local.reshape(-1)[found].astype(np.int64)
    owner = batch.owner[token]
    # A token's keys are laid out once, then copied into each slot it is in: the copies keep
    # their order, so a token's first key is its first in every slot.
    first = np.r_[True, token[1:] != token[:-1]]
    n_slots = len(in_slot)
    tally = (owner * n_slots * (width + 1) + key) * 2 + batch.fires[token]
    # int32 from here: copied into every slot and compressed on every step, half the bytes of
    # int64 took half the time (the window kind's copies: 7.2 -> 2.7 ms a batch of the demo-like
    # SAE); a batch's tokens and tallies are far below 2**31
    token, tally = token.astype(np.int32), tally.astype(np.int32)
    # by slot, then token: each slot's copies selected by a mask (faster than gathering them)
    copied = [np.take(in_slot[slot], token) for slot in range(n_slots)]
    anywhere = copied[-1]
    texts = np.full((batch.n_features, width), -1, dtype=np.int64)
    texts[feature, _ranks(feature)] = text
    return _Keys(
        texts,
        np.bincount(feature, minlength=batch.n_features),
        np.concatenate([token[m] for m in copied]),
        np.concatenate(
            [tally[m] + np.int32(slot * 2 * (width + 1)) for slot, m in enumerate(copied)]
        ),
        np.concatenate([first[m] for m in copied]),
        not first.all(),
        token[anywhere],
        (owner * (width + 1) + key)[anywhere],
    )


def _search(batch: TokenBatch, vocab: Vocab, promoted: list[tuple[str, ...]]) -> _Search:
    n_firing = batch.count(batch.fires)
    held = batch.column_sums(batch.fires)  # (F, C) firings in each context
    columns = np.argsort(-held, axis=1, kind="stable")[:, :MAX_COLUMNS]
    n_columns = np.minimum(MAX_COLUMNS, (held > 0).sum(axis=1))
    columns = np.where(np.arange(columns.shape[1]) < n_columns[:, None], columns, -1)
    in_columns = batch.by_signature(batch.flags.T[columns] & (columns >= 0)[:, :, None])
    # (slots, N): only kept tokens of features that fire are ever counted
    in_slot = np.concatenate([in_columns, batch.keep[None]])
    in_slot &= batch.keep & (n_firing > 0)[batch.owner]
    n_texts = len(vocab.texts) + 1  # text ids run to len(texts): padding
    promoted_ids = [vocab.ids_of(p) for p in promoted]
    return _Search(
        batch,
        n_firing,
        columns,
        {
            "tokens": _keys(batch, batch.text_ids[:, None], n_texts, in_slot),
            "previous": _keys(batch, batch.prev_ids[:, None], n_texts, in_slot),
            "following": _keys(batch, batch.next_ids[:, None], n_texts, in_slot, promoted_ids),
            "window": _keys(batch, batch.window_ids, n_texts, in_slot),
        },
    )


# ---------------------------------------------------------------------------------------------
# Terms as arrays


class _Terms(NamedTuple):
    """One term per feature: what a Term holds, as local key ids and context columns."""

    keys: np.ndarray  # (F, len(KINDS), MAX_KEYS) local key ids in the label's order, -1 past them
    contexts: np.ndarray  # (F, 2 + MAX_REFINEMENTS) columns in the label's order, -1 past them
    unless: np.ndarray  # (F, 1 + MAX_REFINEMENTS) columns, -1 past them

    @classmethod
    def empty(cls, n_features: int) -> _Terms:
        # A fresh term has up to two contexts and one exception; each refinement adds one.
        return cls(
            np.full((n_features, len(KINDS), MAX_KEYS), -1),
            np.full((n_features, 2 + MAX_REFINEMENTS), -1),
            np.full((n_features, 1 + MAX_REFINEMENTS), -1),
        )

    def has_kind(self, kind: int) -> np.ndarray:
        return self.keys[:, kind, 0] >= 0

    def penalty(self) -> np.ndarray:
        """What the term's parts and keys cost. (F,) float64."""
        n_keys = (self.keys >= 0).sum(axis=2)  # (F, kinds)
        n_parts = (n_keys > 0).sum(axis=1) + (self.contexts >= 0).sum(axis=1)
        n_parts += (self.unless >= 0).sum(axis=1)
        extra_keys = np.maximum(n_keys - 1, 0).sum(axis=1)
        return PART_PENALTY * np.maximum(n_parts - 1, 0) + KEY_PENALTY * extra_keys

    def uses(self, n_columns: int) -> np.ndarray:
        """The contexts the term requires or excepts. (F, C) bool."""
        out = np.zeros((len(self.keys), n_columns + 1), dtype=bool)  # last column: -1
        np.put_along_axis(out, np.concatenate([self.contexts, self.unless], axis=1), True, axis=1)
        return out[:, :n_columns]

    def where(self, pick: np.ndarray, other: _Terms) -> _Terms:
        """This term where ``pick`` (F,), else ``other``'s."""
        return _Terms(
            *(
                np.where(pick.reshape(-1, *[1] * (a.ndim - 1)), a, b)
                for a, b in zip(self, other, strict=True)
            )
        )

    def mask(self, search: _Search) -> np.ndarray:
        """Where each feature's term holds on its own tokens. (N,) bool."""
        batch = search.batch
        flags = batch.flags.T  # (C, S)
        inside = (flags[self.contexts] | (self.contexts < 0)[:, :, None]).all(axis=1)  # (F, S)
        inside &= ~(flags[self.unless] & (self.unless >= 0)[:, :, None]).any(axis=1)
        out = batch.keep & batch.by_signature(inside)
        for kind, name in enumerate(KINDS):
            on = self.has_kind(kind)
            if not on.any():
                continue
            keys = search.keys[name]
            k = keys.texts.shape[1]
            member = np.zeros((batch.n_features, k + 1), dtype=bool)  # last column: -1
            np.put_along_axis(member, self.keys[:, kind], True, axis=1)
            holds = np.zeros(len(out), dtype=bool)
            np.put(holds, keys.held_token[member.reshape(-1)[keys.held_key]], True)
            out &= holds | ~on[batch.owner]
        return out

    def rule_terms(self, vocab: Vocab, keys: dict[str, _Keys], feature: int) -> Term:
        fields = {
            name: tuple(vocab.texts[keys[name].texts[feature, i]] for i in ids[ids >= 0])
            for name, ids in zip(KINDS, self.keys[feature], strict=True)
        }
        contexts, unless = self.contexts[feature], self.unless[feature]
        return Term(
            **fields,
            contexts=tuple(CONTEXT_NAMES[c] for c in contexts[contexts >= 0]),
            unless=tuple(CONTEXT_NAMES[c] for c in unless[unless >= 0]),
        )


def _append(columns: np.ndarray, pick: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``columns`` (F, width) with ``values`` (F,) added after each picked row's last entry."""
    out = columns.copy()
    rows = np.flatnonzero(pick & (values >= 0))
    out[rows, (columns[rows] >= 0).sum(axis=1)] = values[rows]
    return out


# ---------------------------------------------------------------------------------------------
# One step of the search


class _Step(NamedTuple):
    """What a new term adds to on this step: tokens already covered by earlier terms count as
    predicted; ``within`` are the tokens a candidate may add (uncovered, and inside the term being
    refined)."""

    true_positives: np.ndarray  # (F,) of the list so far, shrunk as ``_objective`` shrinks a gain
    n_predicted: np.ndarray  # (F,)
    within: np.ndarray  # (N,) bool
    base: _Terms  # the terms being refined (empty on a fresh step)
    base_penalty: np.ndarray  # (F,)
    active: np.ndarray  # (F,) bool: features still searching
    fresh: bool  # every base term is empty


class _Proposal(NamedTuple):
    """Each feature's best candidate of one family, as what it adds to the base term."""

    objective: np.ndarray  # (F,) -inf where there is none
    keys: np.ndarray  # (F, len(KINDS), MAX_KEYS) the key set it sets, -1 past it
    contexts: np.ndarray  # (F, 2) contexts it requires, -1 for none
    unless: np.ndarray  # (F,) a context it excepts, -1 for none


def _per_feature(values: np.ndarray, ndim: int) -> np.ndarray:
    return values.reshape(-1, *[1] * (ndim - 1))


def _shrunk(gained):
    return np.maximum(gained - SHRINK * np.sqrt(gained), 0)


def _objective(step: _Step, n_firing, gained, picked, penalty):
    """The penalised F1 of the list once a candidate adds ``gained`` firing tokens out of
    ``picked`` (F, ...); the gain is shrunk by its own noise (``SHRINK`` standard deviations of a
    count), so a handful of firings found by searching many keys does not pass for a pattern.
    Float32 counts give a float32 objective, as they always have (context pairs)."""
    dtype = np.float32 if gained.dtype == np.float32 else np.float64
    true_positives, n_predicted, n_firing = (
        _per_feature(x, gained.ndim).astype(dtype)
        for x in (step.true_positives, step.n_predicted, n_firing)
    )
    penalty = penalty.astype(dtype)
    return 2 * (true_positives + _shrunk(gained)) / (n_predicted + picked + n_firing) - penalty


def _no_proposal(n_features: int) -> _Proposal:
    empty = _Terms.empty(n_features)
    return _Proposal(
        np.full(n_features, -np.inf), empty.keys, np.full((n_features, 2), -1), empty.unless[:, 0]
    )


def _union_counts(first: np.ndarray, tally: np.ndarray, order: np.ndarray, k: int) -> np.ndarray:
    """The tokens (not firing, firing) that join each prefix of ``order`` (F, slots, width) of
    the entries ``tally`` (whose ``first`` of each token and slot): a token joins the set at the
    first prefix holding one of its keys (a window has several), so the prefix sums count the
    union exactly. (F, slots, width, 2) int64."""
    n_features, n_slots, width = order.shape
    rank = np.full((n_features, n_slots, k + 1), width, dtype=np.min_scalar_type(width))
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(width), order.shape), axis=2)
    rank = np.take(np.repeat(rank.reshape(-1), 2), tally)  # each entry's, read by tally as the counts are
    # Each entry's least rank among itself and the later entries of its (token, slot), spans
    # doubling: a few passes over small ints (a reduceat over the many small groups took ~30% of
    # a line-profiled fit). ``apart``: whether entries ``span`` apart are of different groups; a later
    # group's entry counts as the last rank, which lowers none.
    apart, span = first[1:], 1
    while not apart.all():
        rank[:-span] = np.minimum(
            rank[:-span], np.maximum(rank[span:], apart * rank.dtype.type(width))
        )
        apart = apart[:-span] | apart[span:]
        span *= 2
    starts = np.flatnonzero(first)  # each (token, slot)'s first entry, now its best rank
    # each head tally's (feature, slot, firing) bin at rank 0, looked up: a table of the few
    # tallies, not an integer division of every token's
    tally_bin = np.arange(2 * n_features * n_slots * (k + 1), dtype=np.int32)
    tally_bin = (tally_bin >> 1) // (k + 1) * (2 * (width + 1)) + (tally_bin & 1)
    joins = np.take(tally_bin, tally[starts]) + 2 * rank[starts].astype(np.int32)
    size = 2 * n_features * n_slots * (width + 1)
    return np.bincount(joins, minlength=size).reshape(n_features, n_slots, width + 1, 2)[
        :, :, :width
    ]


def _key_proposal(search: _Search, step: _Step, kind: int) -> _Proposal:
    """The best key set of one kind, alone or within one of the feature's columns."""
    batch, keys = search.batch, search.keys[KINDS[kind]]
    n_features, n_slots = batch.n_features, search.columns.shape[1] + 1
    anywhere = n_slots - 1
    active = step.active & (keys.count > 0) & ~step.base.has_kind(kind)
    k = keys.texts.shape[1]
    if not k:
        return _no_proposal(n_features)
    usable = np.take(step.within & active[batch.owner], keys.token)  # (e,)
    if usable.all():  # (a first term's first step): every entry, without copying them
        usable = slice(None)
    tally = keys.tally[usable]
    size = n_features * n_slots * (k + 1)
    counts = np.bincount(tally, minlength=2 * size).reshape(n_features, n_slots, k + 1, 2)
    precision = (counts[..., 1] / (counts.sum(axis=3) + 1.0))[:, :, :k]
    beyond = np.arange(k) >= keys.count[:, None, None]  # (F, 1, k) past the feature's keys
    precision[np.broadcast_to(beyond, precision.shape)] = -np.inf  # sorted after its keys
    order = np.argsort(-precision, axis=2, kind="stable")[:, :, :MAX_KEYS]  # (F, slots, keys)
    width = order.shape[2]
    if keys.several:
        joined = _union_counts(keys.first[usable], tally, order, k)
    else:  # a token holds one key: it joins the set with that key
        joined = np.take_along_axis(counts, order[..., None], axis=2)
    gained = joined[..., 1].cumsum(axis=2)  # (F, slots, width)
    picked = joined.sum(axis=3).cumsum(axis=2)
    parts = 1 + (np.arange(n_slots) != anywhere)[None, :, None] + (not step.fresh)
    penalty = (
        _per_feature(step.base_penalty, 3)
        + KEY_PENALTY * np.arange(width)
        + PART_PENALTY * (parts - 1)
    )
    objective = _objective(step, search.n_firing, gained, picked, penalty)
    objective[gained == 0] = -np.inf
    objective[
        np.broadcast_to(np.arange(width) >= keys.count[:, None, None], objective.shape)
    ] = -np.inf
    columns = search.columns  # (F, MAX_COLUMNS)
    closed = columns < 0
    closed |= (columns[:, :, None] == step.base.contexts[:, None, :]).any(axis=2)
    if KINDS[kind] == "tokens":  # a token's class follows from its text: nothing to add
        closed |= _IS_CLASS[columns] & (columns >= 0)
    objective[:, :anywhere][closed] = -np.inf
    objective[~active] = -np.inf
    best = objective.reshape(n_features, -1).argmax(axis=1)
    slot, n_keys = np.divmod(best, width)
    chosen = order[np.arange(n_features), slot]  # (F, width)
    chosen = np.where(np.arange(width) <= n_keys[:, None], chosen, -1)
    proposal = _no_proposal(n_features)
    proposal.keys[:, kind, :width] = chosen
    inside = np.where(
        slot < anywhere, columns[np.arange(n_features), np.minimum(slot, anywhere - 1)], -1
    )
    return proposal._replace(
        objective=objective.reshape(n_features, -1)[np.arange(n_features), best],
        contexts=np.stack([inside, np.full(n_features, -1)], axis=1),
    )


def _context_proposal(search: _Search, step: _Step) -> _Proposal:
    """One context, two together, or (refining) one more context required or excepted."""
    batch = search.batch
    n_features, rows = batch.n_features, np.arange(batch.n_features)
    firing = step.within & batch.fires
    positives = batch.column_sums(firing)  # (F, C)
    totals = batch.column_sums(step.within)
    penalty = step.base_penalty + PART_PENALTY * (0 if step.fresh else 1)
    n_firing = search.n_firing
    required = _objective(step, n_firing, positives, totals, penalty[:, None])
    excepted = _objective(
        step,
        n_firing,
        batch.count(firing)[:, None] - positives,
        batch.count(step.within)[:, None] - totals,
        penalty[:, None],
    )
    required[positives == 0] = -np.inf
    used = step.base.uses(len(CONTEXT_NAMES))
    required[used] = excepted[used] = -np.inf
    has_tokens = step.base.has_kind(KINDS.index("tokens"))
    closed = has_tokens[:, None] & _IS_CLASS  # a token's class follows from its text
    required[closed] = excepted[closed] = -np.inf
    if step.fresh:
        excepted[:] = -np.inf
    best_required, best_excepted = required.argmax(axis=1), excepted.argmax(axis=1)
    none = np.full(n_features, -1)
    options = [  # (objective, contexts required, context excepted)
        (required[rows, best_required], (best_required, none), none),
        (excepted[rows, best_excepted], (none, none), best_excepted),
    ]
    if step.fresh:  # pairs: one of the feature's columns, and or but not any other context
        top = np.maximum(search.columns, 0)  # (F, c); -1 columns are closed below
        both_positives = batch.pair_sums(firing, top).astype(np.float32)  # (F, c, C)
        both_totals = batch.pair_sums(step.within, top).astype(np.float32)
        penalty = (penalty + PART_PENALTY)[:, None, None]
        pairs = _objective(step, n_firing, both_positives, both_totals, penalty)
        pairs[both_positives == 0] = -np.inf
        excepting = _objective(
            step,
            n_firing,
            np.take_along_axis(positives, top, axis=1)[:, :, None] - both_positives,
            np.take_along_axis(totals, top, axis=1)[:, :, None] - both_totals,
            penalty,
        )
        for table in (pairs, excepting):
            np.put_along_axis(table, top[:, :, None], -np.inf, axis=2)  # a context with itself
            table[search.columns < 0] = -np.inf
        for table, pick in (
            (pairs, lambda i, j: ((i, j), none)),
            (excepting, lambda i, j: ((i, none), j)),
        ):
            best = table.reshape(n_features, -1).argmax(axis=1)
            i, j = np.divmod(best, table.shape[2])
            contexts, unless = pick(top[rows, i], j)
            options.append((table.reshape(n_features, -1)[rows, best], contexts, unless))
    objectives = np.stack([o[0] for o in options], axis=1).astype(np.float64)  # (F, options)
    winner = objectives.argmax(axis=1)
    contexts = np.stack([np.stack(o[1], axis=1) for o in options])[winner, rows]  # (F, 2)
    unless = np.stack([o[2] for o in options])[winner, rows]
    objective = objectives[rows, winner]
    objective[~step.active] = -np.inf
    return _no_proposal(n_features)._replace(objective=objective, contexts=contexts, unless=unless)


def _best(search: _Search, step: _Step) -> tuple[np.ndarray, _Terms]:
    """Each feature's best candidate on this step, and its term (the base with it added)."""
    proposals = [_context_proposal(search, step)] + [
        _key_proposal(search, step, kind) for kind in range(len(KINDS))
    ]
    rows = np.arange(search.batch.n_features)
    winner = np.stack([p.objective for p in proposals], axis=1).argmax(axis=1)
    won = _Proposal(*(np.stack(field)[winner, rows] for field in zip(*proposals, strict=True)))
    base = step.base
    contexts = _append(base.contexts, step.active, won.contexts[:, 0])
    contexts = _append(contexts, step.active, won.contexts[:, 1])
    term = _Terms(
        np.where(won.keys >= 0, won.keys, base.keys),
        contexts,
        _append(base.unless, step.active, won.unless),
    )
    return won.objective, term


# ---------------------------------------------------------------------------------------------
# The search


def fit_rules(
    train: list[TokenSet], vocab: Vocab, promoted: list[tuple[str, ...]] | None = None
) -> list[FittedRule]:
    """The best decision list of each feature on its tokens ``train``; "any token" when it never
    fires there. ``promoted``: of each feature, the tokens its decoder direction promotes most
    (its top logit effects), tried as what comes next even when seen after only one firing."""
    promoted = promoted or [()] * len(train)
    return [
        fitted
        for start in range(0, len(train), FEATURES_PER_SEARCH)
        for fitted in _fit_together(
            TokenBatch.of(train[start : start + FEATURES_PER_SEARCH]),
            vocab,
            promoted[start : start + FEATURES_PER_SEARCH],
        )
    ]


def _fit_together(
    batch: TokenBatch, vocab: Vocab, promoted: list[tuple[str, ...]]
) -> list[FittedRule]:
    """``fit_rules`` of the features of one batch, searched at once."""
    search = _search(batch, vocab, promoted)
    n_features = batch.n_features
    covered = np.zeros(len(batch.fires), dtype=bool)
    terms: list[_Terms] = []
    n_terms = np.zeros(n_features, dtype=np.int64)
    current = np.zeros(n_features)  # objective of each list so far
    credited = np.zeros(n_features)  # its firings, each term's shrunk as when it was chosen
    spent = np.zeros(n_features)  # the penalties of its terms
    active = search.n_firing > 0
    for _ in range(MAX_TERMS):
        list_penalty = TERM_PENALTY * n_terms + spent
        step = _Step(
            credited,
            batch.count(covered),
            batch.keep & ~covered,
            _Terms.empty(n_features),
            list_penalty,
            active,
            True,
        )
        objective, term = _best(search, step)
        found = active & np.isfinite(objective)
        refining = found
        for _ in range(MAX_REFINEMENTS):
            refined, longer = _best(
                search,
                step._replace(
                    within=~covered & term.mask(search),
                    base=term,
                    base_penalty=list_penalty + term.penalty(),
                    active=refining,
                    fresh=False,
                ),
            )
            refining = refining & (refined > objective)
            term = longer.where(refining, term)
            objective = np.where(refining, refined, objective)
        accepted = found & ((n_terms == 0) | (objective > current))
        added = ~covered & term.mask(search) & accepted[batch.owner]
        credited = credited + np.where(
            accepted, _shrunk(batch.count(added & batch.fires).astype(np.float64)), 0.0
        )
        covered |= added
        current = np.where(accepted, objective, current)
        spent = np.where(accepted, spent + term.penalty(), spent)
        terms.append(term.where(accepted, _Terms.empty(n_features)))
        n_terms += accepted
        active = accepted
    true_positives, n_predicted = batch.count(covered & batch.fires), batch.count(covered)
    n_kept = batch.count(batch.keep)
    out = []
    for f in range(n_features):
        n_firing = int(search.n_firing[f])
        if not n_firing:
            out.append(FittedRule(LabelRule.of(Term()), 0.0, 0.0))
        elif not n_terms[f]:
            f1 = f1_score(n_firing, int(n_kept[f]), n_firing)
            out.append(FittedRule(LabelRule.of(Term()), f1, f1))
        else:
            rule = LabelRule(
                tuple(t.rule_terms(vocab, search.keys, f) for t in terms[: n_terms[f]])
            )
            f1 = f1_score(int(true_positives[f]), int(n_predicted[f]), n_firing)
            out.append(FittedRule(rule, f1, float(current[f])))
    return out


def fit_rule(train: TokenSet, vocab: Vocab, promoted: tuple[str, ...] = ()) -> FittedRule:
    """``fit_rules`` of one feature."""
    return fit_rules([train], vocab, [promoted])[0]
