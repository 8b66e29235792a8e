"""Find the rule that best predicts where a feature fires, from its training evidence alone.

The rule is a decision list of up to ``MAX_TERMS`` terms (see ``sae_core.labels.rules``), grown
greedily: each step adds the term that most raises the F1 of the list on the training tokens, less
a price for every part, key and term (a complexity penalty, so labels stay short and hold beyond
the examples they were made from). A step's candidates:
- a set of keys of one kind (the token, the one before, the one after, one among the ``WINDOW``
  before), alone or within one context; each set is grown greedily (keys sorted by smoothed
  precision, the prefix with the best objective wins: adding a key helps F1 exactly when its
  precision beats F1/2, so the best set is such a prefix);
- one context or class alone, or two together ("a number in a string");
then the best candidate is refined with one more part at a time (a key set, a context, or an
exception "except in a comment") while that pays for itself.

The search itself is compiled (``rule_search``) and reads one feature's tokens at a time; a chunk
of features goes to it in one call, their tokens laid end to end (``TokenBatch``). Each feature's
search reads only its own tokens, so its rule is the one it gets alone.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sae_core.labels import rule_search
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
# Features given to the compiled search in one call (32, 64 and 256 took the same CPU-seconds on
# the demo's 4096-wide SAE)
FEATURES_PER_SEARCH = 32
KINDS = ("tokens", "previous", "following", "window")  # Term fields that hold keys
_IS_CLASS = np.array([name in TOKEN_CLASSES for name in CONTEXT_NAMES])  # (C,)


class FittedRule(NamedTuple):
    rule: LabelRule
    train_f1: float  # on the evidence it was made from (optimistic; the held-out score is honest)
    objective: float  # what the search maximised: F1 with shrunk firings, less the penalties


def _settings() -> rule_search.Settings:
    """This module's settings, as the compiled search reads them (typed, so that a tuning run
    that sets one to another number does not compile the search again)."""
    return rule_search.Settings(
        int(MAX_TERMS),
        int(MAX_KEYS),
        int(MAX_REFINEMENTS),
        int(MIN_KEY_FIRINGS),
        int(MAX_CANDIDATE_KEYS),
        int(MAX_COLUMNS),
        float(SHRINK),
        float(PART_PENALTY),
        float(KEY_PENALTY),
        float(TERM_PENALTY),
    )


def _search(batch: TokenBatch, promoted: list[np.ndarray], n_texts: int) -> rule_search.Found:
    """The compiled search over ``batch``; ``promoted``: each feature's promoted text ids."""
    values = (batch.text_ids[:, None], batch.prev_ids[:, None], batch.next_ids[:, None])
    return rule_search.search(
        rule_search.Batch(
            batch.spans(),
            tuple(np.ascontiguousarray(v, dtype=np.int32) for v in (*values, batch.window_ids)),
            batch.signature,
            batch.flags,
            batch.fires,
            batch.keep,
            np.concatenate([np.zeros(0, dtype=np.int32), *promoted]).astype(np.int32),
            np.cumsum([0] + [len(ids) for ids in promoted], dtype=np.int64),
            (_IS_CLASS, KINDS.index("tokens"), KINDS.index("following")),
            n_texts,
        ),
        _settings(),
    )


def compile_search() -> None:
    """Compile the search (or load it from numba's cache) in this process, so that workers
    forked from it share it instead of each compiling its own."""
    _search(TokenBatch.empty(len(CONTEXT_NAMES)), [], 1)


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
    """``fit_rules`` of the features of one batch."""
    found = _search(batch, [vocab.ids_of(p) for p in promoted], len(vocab.texts) + 1)
    out = []
    for f in range(batch.n_features):
        n_firing, n_kept, true_positives, n_predicted = found.counts[f].tolist()
        if not n_firing:
            out.append(FittedRule(LabelRule.of(Term()), 0.0, 0.0))
        elif not found.n_terms[f]:
            f1 = f1_score(n_firing, n_kept, n_firing)
            out.append(FittedRule(LabelRule.of(Term()), f1, f1))
        else:
            terms = [_term(found, f, t, vocab) for t in range(found.n_terms[f])]
            f1 = f1_score(true_positives, n_predicted, n_firing)
            out.append(FittedRule(LabelRule(tuple(terms)), f1, float(found.objective[f])))
    return out


def _term(found: rule_search.Found, feature: int, t: int, vocab: Vocab) -> Term:
    keys = {
        name: tuple(vocab.texts[i] for i in ids if i >= 0)
        for name, ids in zip(KINDS, found.keys[feature, t].tolist(), strict=True)
    }
    contexts, unless = found.contexts[feature, t], found.unless[feature, t]
    return Term(
        **keys,
        contexts=tuple(CONTEXT_NAMES[c] for c in contexts[contexts >= 0]),
        unless=tuple(CONTEXT_NAMES[c] for c in unless[unless >= 0]),
    )


def fit_rule(train: TokenSet, vocab: Vocab, promoted: tuple[str, ...] = ()) -> FittedRule:
    """``fit_rules`` of one feature."""
    return fit_rules([train], vocab, [promoted])[0]
