"""A label's rule as a classifier of "the feature fires on this token": precision, recall, F1."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sae_core.labels.evidence import TokenSet, Vocab
from sae_core.labels.lexical import CONTEXT_NAMES
from sae_core.labels.rules import LabelRule, Term

_COLUMN = {name: i for i, name in enumerate(CONTEXT_NAMES)}


class LabelScore(NamedTuple):
    precision: float  # of the tokens the rule picks, the share where the feature fires
    recall: float  # of the tokens where the feature fires, the share the rule picks
    f1: float
    n_firing: int  # tokens where the feature fires in the scored set
    n_predicted: int  # tokens the rule picks


def f1_score(true_positives: int, n_predicted: int, n_firing: int) -> float:
    return 2 * true_positives / (n_predicted + n_firing) if n_predicted + n_firing else 0.0


def term_mask(term: Term, tokens: TokenSet, vocab: Vocab) -> np.ndarray:
    """Where one term of a rule holds. (n,) bool."""
    mask = tokens.keep.copy()
    if term.tokens:
        mask &= vocab.lookup(term.tokens)[tokens.text_ids]
    if term.previous:
        mask &= vocab.lookup(term.previous)[tokens.prev_ids]
    if term.following:
        mask &= vocab.lookup(term.following)[tokens.next_ids]
    if term.window:
        mask &= vocab.lookup(term.window)[tokens.window_ids].any(axis=1)
    for name in term.contexts:
        mask &= tokens.contexts[:, _COLUMN[name]]
    for name in term.unless:
        mask &= ~tokens.contexts[:, _COLUMN[name]]
    return mask


def rule_mask(rule: LabelRule, tokens: TokenSet, vocab: Vocab) -> np.ndarray:
    """Where the rule says the feature fires: where any of its terms holds. (n,) bool."""
    mask = np.zeros(len(tokens.fires), dtype=bool)
    for term in rule.terms:
        mask |= term_mask(term, tokens, vocab)
    return mask


def score_rule(rule: LabelRule, tokens: TokenSet, vocab: Vocab) -> LabelScore:
    predicted = rule_mask(rule, tokens, vocab)
    true_positives = int((predicted & tokens.fires).sum())
    n_predicted, n_firing = int(predicted.sum()), int(tokens.fires.sum())
    return LabelScore(
        precision=true_positives / n_predicted if n_predicted else 0.0,
        recall=true_positives / n_firing if n_firing else 0.0,
        f1=f1_score(true_positives, n_predicted, n_firing),
        n_firing=n_firing,
        n_predicted=n_predicted,
    )
