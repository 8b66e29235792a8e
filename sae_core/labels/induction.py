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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from sae_core.labels.evidence import TokenSet, Vocab
from sae_core.labels.lexical import CONTEXT_NAMES, TOKEN_CLASSES
from sae_core.labels.rules import LabelRule, Term
from sae_core.labels.scoring import f1_score, term_mask

MAX_TERMS = 2  # a label says at most two things: a third changed no held-out F1 on the demo SAE
MAX_KEYS = 8  # labels show 4; longer lists rarely hold beyond the training examples
MAX_REFINEMENTS = 1  # parts added to a term after its first two (a second changed nothing)
MIN_KEY_FIRINGS = 2  # a key seen firing once is an anecdote, not a pattern
MAX_CANDIDATE_KEYS = 16  # of each kind, the keys seen firing most often
MAX_COLUMNS = 4  # contexts a key set is tried within: those holding the most firings
PAIRED_CONTEXTS = 6  # contexts tried two by two: those holding the most firings
SHRINK = 1.0  # standard deviations of its count a candidate's firings are discounted by
PART_PENALTY = 0.03  # F1 each part beyond a term's first must add: shorter labels read better
KEY_PENALTY = 0.005  # F1 each extra key must add, so one-off tokens don't pad the label
TERM_PENALTY = 0.04  # F1 a second term must add
KINDS = ("tokens", "previous", "following", "window")  # Term fields that hold keys
_IS_CLASS = np.array([name in TOKEN_CLASSES for name in CONTEXT_NAMES])  # (C,)


class FittedRule(NamedTuple):
    rule: LabelRule
    train_f1: float  # on the evidence it was made from (optimistic; the held-out score is honest)
    objective: float  # what the search maximised: F1 with shrunk firings, less the penalties


class _Keys(NamedTuple):
    """One kind of key, renumbered to the keys seen where the feature fires."""

    texts: np.ndarray  # (k,) text ids of those keys
    local: np.ndarray  # (n, slots) int: index into texts, k for any other key (a key may
    # repeat within a token's window: the ranking counts it twice, the prefix sums once)
    present: np.ndarray  # (n,) bool: the token has one of the keys


class _Search(NamedTuple):
    vocab: Vocab
    tokens: TokenSet
    fires: np.ndarray  # (n,) bool
    column_totals: np.ndarray  # (C,) kept tokens in each context
    columns: np.ndarray  # (c,) the context columns key sets are tried within
    within_columns: np.ndarray  # (n, c + 1) bool: those contexts, then "anywhere" (kept tokens)
    keys: dict[str, _Keys]
    n_firing: int


def _keys(
    values: np.ndarray, fires: np.ndarray, n_texts: int, also: np.ndarray | None = None
) -> _Keys:
    """``values`` (n, slots) text ids, -1 for none; the keys seen firing most often, and ``also``
    (text ids) when they are seen firing at all."""
    firing = values[fires].ravel()
    counts = np.bincount(firing[firing >= 0], minlength=n_texts)
    texts = np.flatnonzero(counts >= MIN_KEY_FIRINGS)
    if len(texts) > MAX_CANDIDATE_KEYS:
        texts = texts[np.argsort(-counts[texts], kind="stable")[:MAX_CANDIDATE_KEYS]]
    if also is not None and also.size:
        texts = np.union1d(texts, also[counts[also] > 0])
    lookup = np.full(n_texts + 1, len(texts), dtype=np.int64)  # the last entry: key -1
    lookup[texts] = np.arange(len(texts))
    local = lookup[values]
    return _Keys(texts, local, (local < len(texts)).any(axis=1))


def _shrunk(gained):
    return np.maximum(gained - SHRINK * np.sqrt(gained), 0)


def _objective(step: _Step, gained, picked, n_firing: int, penalty):
    """The penalised F1 of the list once a candidate adds ``gained`` firing tokens out of
    ``picked``; the gain is shrunk by its own noise (``SHRINK`` standard deviations of a count),
    so a handful of firings found by searching many keys does not pass for a pattern."""
    return (
        2 * (step.true_positives + _shrunk(gained)) / (step.n_predicted + picked + n_firing)
        - penalty
    )


class _Step(NamedTuple):
    """What a new term adds to on this step: tokens already covered by earlier terms count as
    predicted; ``within`` are the tokens a candidate may add (uncovered, and inside the term being
    refined)."""

    true_positives: float  # of the list so far, shrunk as ``_objective`` shrinks a gain
    n_predicted: int
    within: np.ndarray  # (n,) bool
    base: Term  # the term being refined (empty Term on a fresh step)
    base_penalty: float


class _Candidate(NamedTuple):
    objective: float
    make: Callable[[], Term]  # the term, built only for the candidate that wins


def _key_candidate(search: _Search, step: _Step, kind: str) -> _Candidate | None:
    """The best key set of one kind, alone or within one context."""
    keys = search.keys[kind]
    k = len(keys.texts)
    if not k or getattr(step.base, kind):
        return None
    rows = np.flatnonzero(step.within & keys.present)
    if not rows.size:
        return None
    token, column = np.nonzero(search.within_columns[rows])  # (m,) pairs
    local = keys.local[rows][token]  # (m, slots)
    fired = search.fires[rows][token]  # (m,)
    n_columns = search.within_columns.shape[1]
    anywhere = n_columns - 1
    bins = (column[:, None] * (k + 1) + local).ravel()
    size = n_columns * (k + 1)
    positives = np.bincount(bins[np.repeat(fired, local.shape[1])], minlength=size)
    totals = np.bincount(bins, minlength=size)
    precision = (positives / (totals + 1.0)).reshape(n_columns, k + 1)[:, :k]
    order = np.argsort(-precision, axis=1, kind="stable")[:, :MAX_KEYS]  # (C', keys)
    # A token joins the set at the first prefix holding one of its keys (a window has several):
    # count each token once, at that prefix, so the prefix sums count the union exactly.
    width = order.shape[1]
    rank = np.full((n_columns, k + 1), width, dtype=np.int64)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(width), order.shape), axis=1)
    joins = column * (width + 1) + rank[column[:, None], local].min(axis=1)
    size = n_columns * (width + 1)
    gained = (
        np.bincount(joins[fired], minlength=size).reshape(n_columns, -1)[:, :width].cumsum(axis=1)
    )
    picked = np.bincount(joins, minlength=size).reshape(n_columns, -1)[:, :width].cumsum(axis=1)
    parts = 1 + (np.arange(n_columns) != anywhere)[:, None] + (step.base != Term())
    penalty = step.base_penalty + KEY_PENALTY * np.arange(width) + PART_PENALTY * (parts - 1)
    objective = _objective(step, gained, picked, search.n_firing, penalty)
    objective[gained == 0] = -np.inf
    for name in step.base.contexts:  # a context the term already has
        at = np.flatnonzero(search.columns == CONTEXT_NAMES.index(name))
        objective[at] = -np.inf
    if kind == "tokens":  # a token's class follows from its text: nothing to add
        objective[:anywhere][_IS_CLASS[search.columns]] = -np.inf
    column, n_keys = np.unravel_index(int(objective.argmax()), objective.shape)
    if not np.isfinite(objective[column, n_keys]):
        return None

    def make() -> Term:
        chosen = keys.texts[order[column, : n_keys + 1]]
        fields = {kind: tuple(search.vocab.texts[i] for i in chosen)}
        if column != anywhere:
            fields["contexts"] = step.base.contexts + (CONTEXT_NAMES[search.columns[column]],)
        return dataclasses.replace(step.base, **fields)

    return _Candidate(float(objective[column, n_keys]), make)


def _column_sums(search: _Search, mask: np.ndarray) -> np.ndarray:
    """Tokens in ``mask`` (a subset of the kept ones) per context (C,), from whichever side of the
    mask is smaller."""
    if 2 * mask.sum() < len(mask):
        return search.tokens.contexts[mask].sum(axis=0)
    return search.column_totals - search.tokens.contexts[search.tokens.keep & ~mask].sum(axis=0)


def _pair_sums(contexts: np.ndarray, mask: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Tokens in ``mask`` in each pair of one of the contexts ``rows`` (r,) and any context.
    (r, C)."""
    inside = contexts[mask]
    return inside[:, rows].T.astype(np.float32) @ inside.astype(np.float32)


def _context_candidate(search: _Search, step: _Step) -> _Candidate | None:
    """One context, two together, or (refining) one more context required or excepted."""
    fresh = step.base == Term()
    firing = step.within & search.fires
    positives = search.tokens.contexts[firing].sum(axis=0)  # (C,)
    totals = _column_sums(search, step.within)
    penalty = step.base_penalty + PART_PENALTY * (0 if fresh else 1)
    required = _objective(step, positives, totals, search.n_firing, penalty)
    excepted = _objective(
        step, firing.sum() - positives, step.within.sum() - totals, search.n_firing, penalty
    )
    required[positives == 0] = -np.inf
    used = [CONTEXT_NAMES.index(c) for c in step.base.contexts + step.base.unless]
    required[used] = excepted[used] = -np.inf
    if step.base.tokens:  # a token's class follows from its text: nothing to add
        required[_IS_CLASS] = excepted[_IS_CLASS] = -np.inf
    if fresh:
        excepted[:] = -np.inf
    best_required, best_excepted = int(required.argmax()), int(excepted.argmax())
    options = [
        (
            required[best_required],
            {"contexts": step.base.contexts + (CONTEXT_NAMES[best_required],)},
        ),
        (excepted[best_excepted], {"unless": step.base.unless + (CONTEXT_NAMES[best_excepted],)}),
    ]
    if fresh:  # pairs: one of the contexts that hold the most firings, and or but not any other
        top = search.columns[:PAIRED_CONTEXTS]
        everywhere = search.tokens.contexts  # (n, C)
        both_positives = _pair_sums(everywhere, firing, top)  # (c, C)
        both_totals = _pair_sums(everywhere, step.within, top)
        pairs = _objective(
            step, both_positives, both_totals, search.n_firing, penalty + PART_PENALTY
        )
        pairs[both_positives == 0] = -np.inf
        pairs[np.arange(len(top)), top] = -np.inf
        excepting = _objective(
            step,
            positives[top, None] - both_positives,
            totals[top, None] - both_totals,
            search.n_firing,
            penalty + PART_PENALTY,
        )
        excepting[np.arange(len(top)), top] = -np.inf
        if len(top):
            i, j = np.unravel_index(int(pairs.argmax()), pairs.shape)
            names = (CONTEXT_NAMES[top[i]], CONTEXT_NAMES[j])
            options.append((pairs[i, j], {"contexts": names}))
            i, j = np.unravel_index(int(excepting.argmax()), excepting.shape)
            fields = {"contexts": (CONTEXT_NAMES[top[i]],), "unless": (CONTEXT_NAMES[j],)}
            options.append((excepting[i, j], fields))
    objective, fields = max(options, key=lambda o: o[0])
    if not np.isfinite(objective):
        return None
    return _Candidate(float(objective), lambda: dataclasses.replace(step.base, **fields))


def _best(search: _Search, step: _Step) -> _Candidate | None:
    candidates = [_context_candidate(search, step)] + [
        _key_candidate(search, step, kind) for kind in KINDS
    ]
    return max((c for c in candidates if c is not None), key=lambda c: c.objective, default=None)


def _penalty(term: Term) -> float:
    n_keys = sum(max(len(getattr(term, kind)) - 1, 0) for kind in KINDS)
    return PART_PENALTY * max(term.n_parts - 1, 0) + KEY_PENALTY * n_keys


def fit_rule(train: TokenSet, vocab: Vocab, promoted: tuple[str, ...] = ()) -> FittedRule:
    """The best decision list on ``train``; "any token" when the feature never fires there.
    ``promoted``: the tokens the feature's decoder direction promotes most (its top logit
    effects), tried as what comes next even when seen after only one firing."""
    fires = train.fires
    n_firing = int(fires.sum())
    if not n_firing:
        return FittedRule(LabelRule.of(Term()), 0.0, 0.0)
    held = train.contexts[fires].sum(axis=0)  # (C,) firings in each context
    columns = np.argsort(-held, kind="stable")[: min(MAX_COLUMNS, int((held > 0).sum()))]
    n_texts = len(vocab.texts) + 1  # text ids run to len(texts): padding
    search = _Search(
        vocab,
        train,
        fires,
        train.contexts[train.keep].sum(axis=0),
        columns,
        np.concatenate([train.contexts[:, columns], train.keep[:, None]], axis=1),
        {
            "tokens": _keys(train.text_ids[:, None], fires, n_texts),
            "previous": _keys(train.prev_ids[:, None], fires, n_texts),
            "following": _keys(train.next_ids[:, None], fires, n_texts, vocab.ids_of(promoted)),
            "window": _keys(train.window_ids, fires, n_texts),
        },
        n_firing,
    )
    covered = np.zeros(len(fires), dtype=bool)
    terms: list[Term] = []
    current = 0.0  # objective of the list so far
    credited = 0.0  # its firings, each term's shrunk as when it was chosen
    for _ in range(MAX_TERMS):
        list_penalty = TERM_PENALTY * len(terms) + sum(map(_penalty, terms))
        step = _Step(credited, int(covered.sum()), train.keep & ~covered, Term(), list_penalty)
        best = _best(search, step)
        if best is None:
            break
        term, objective = best.make(), best.objective
        for _ in range(MAX_REFINEMENTS):
            within = ~covered & term_mask(term, train, vocab)
            refined = _best(
                search,
                step._replace(within=within, base=term, base_penalty=list_penalty + _penalty(term)),
            )
            if refined is None or refined.objective <= objective:
                break
            term, objective = refined.make(), refined.objective
        if terms and objective <= current:
            break
        terms.append(term)
        added = ~covered & term_mask(term, train, vocab)
        credited += float(_shrunk(np.array((added & fires).sum(), dtype=np.float64)))
        covered |= added
        current = objective
    if not terms:
        f1 = f1_score(n_firing, int(train.keep.sum()), n_firing)
        return FittedRule(LabelRule.of(Term()), f1, f1)
    true_positives = int((covered & fires).sum())
    f1 = f1_score(true_positives, int(covered.sum()), n_firing)
    return FittedRule(LabelRule(tuple(terms)), f1, current)
