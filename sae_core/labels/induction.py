"""Find the rule that best predicts where a feature fires, from its training evidence alone.

Candidates, each alone and within each token context (``CONTEXTS``): a set of token texts; a set
of previous-token texts; tokens refined by previous tokens; and the context alone. Each set is
grown greedily: keys sorted by smoothed precision, the prefix with the best F1 wins (adding a key
helps F1 exactly when its precision beats F1/2, so the best set is such a prefix). Among
candidates, a part or token more must pay for itself in F1, so labels stay short.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sae_core.labels.evidence import TokenSet, Vocab
from sae_core.labels.rules import CONTEXT_NAMES, LabelRule
from sae_core.labels.scoring import f1_score

MAX_RULE_TOKENS = 8  # labels show 4; longer lists rarely hold beyond the training examples
PART_PENALTY = (
    0.03  # F1 a previous-token or context part must add to be kept: shorter labels read better
)
TOKEN_PENALTY = 0.005  # F1 each extra token must add, so one-off tokens don't pad the label


class FittedRule(NamedTuple):
    rule: LabelRule
    train_f1: (
        float  # on the evidence it was made from (optimistic; the held-out score is the honest one)
    )


class _KeySet(NamedTuple):
    keys: np.ndarray  # text ids in the set, best first
    f1: float  # train F1 of the rule with this set


def _best_key_set(keys: np.ndarray, base: np.ndarray, fires: np.ndarray, n_firing: int) -> _KeySet:
    """The set S maximising F1 of ``base & (keys in S)``. keys (n,) int, < 0 never matches."""
    valid = base & (keys >= 0)
    k = keys[valid]
    if not k.size:
        return _KeySet(np.zeros(0, np.int32), 0.0)
    positives = np.bincount(k[fires[valid]], minlength=k.max() + 1)
    totals = np.bincount(k, minlength=k.max() + 1)
    candidates = np.flatnonzero(positives)
    if not candidates.size:
        return _KeySet(np.zeros(0, np.int32), 0.0)
    smoothed_precision = positives[candidates] / (totals[candidates] + 1)
    order = candidates[np.argsort(-smoothed_precision, kind="stable")][:MAX_RULE_TOKENS]
    f1 = 2 * np.cumsum(positives[order]) / (np.cumsum(totals[order]) + n_firing)
    best = int(np.argmax(f1 - TOKEN_PENALTY * np.arange(len(order))))
    return _KeySet(order[: best + 1], float(f1[best]))


def _texts(vocab: Vocab, text_ids: np.ndarray) -> tuple[str, ...]:
    return tuple(vocab.texts[i] for i in text_ids)


def _objective(rule: LabelRule, f1: float) -> float:
    extra_tokens = max(len(rule.tokens) + len(rule.previous) - 1, 0)
    return f1 - PART_PENALTY * max(rule.n_parts - 1, 0) - TOKEN_PENALTY * extra_tokens


def fit_rule(train: TokenSet, vocab: Vocab) -> FittedRule:
    """The best rule on ``train``; "any token" when the feature never fires there."""
    n_firing = int(train.fires.sum())
    candidates: list[FittedRule] = []
    everywhere = np.ones(len(train.fires), dtype=bool)
    for context, base in [(None, everywhere)] + list(
        zip(CONTEXT_NAMES, train.contexts, strict=True)
    ):
        if context is not None:
            hits = int((base & train.fires).sum())
            candidates.append(
                FittedRule(LabelRule(context=context), f1_score(hits, int(base.sum()), n_firing))
            )
        tokens = _best_key_set(train.text_ids, base, train.fires, n_firing)
        previous = _best_key_set(train.prev_ids, base, train.fires, n_firing)
        if tokens.keys.size:
            candidates.append(
                FittedRule(LabelRule(_texts(vocab, tokens.keys), (), context), tokens.f1)
            )
            refined = _best_key_set(
                train.prev_ids, base & np.isin(train.text_ids, tokens.keys), train.fires, n_firing
            )
            if refined.keys.size:
                rule = LabelRule(_texts(vocab, tokens.keys), _texts(vocab, refined.keys), context)
                candidates.append(FittedRule(rule, refined.f1))
        if previous.keys.size:
            candidates.append(
                FittedRule(LabelRule((), _texts(vocab, previous.keys), context), previous.f1)
            )
    if not candidates:
        return FittedRule(LabelRule(), f1_score(n_firing, len(train.fires), n_firing))
    return max(candidates, key=lambda c: _objective(c.rule, c.train_f1))
