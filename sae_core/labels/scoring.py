"""A label's rule as a classifier of "the feature fires on this token": precision, recall, F1."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sae_core.labels.evidence import TokenSet, Vocab
from sae_core.labels.rules import CONTEXT_NAMES, LabelRule


class LabelScore(NamedTuple):
    precision: float  # of the tokens the rule picks, the share where the feature fires
    recall: float  # of the tokens where the feature fires, the share the rule picks
    f1: float
    n_firing: int  # tokens where the feature fires in the scored set
    n_predicted: int  # tokens the rule picks


def f1_score(true_positives: int, n_predicted: int, n_firing: int) -> float:
    return 2 * true_positives / (n_predicted + n_firing) if n_predicted + n_firing else 0.0


def rule_mask(rule: LabelRule, tokens: TokenSet, vocab: Vocab) -> np.ndarray:
    """Where the rule says the feature fires. (n,) bool."""
    mask = np.ones(len(tokens.fires), dtype=bool)
    if rule.tokens:
        mask &= np.isin(tokens.text_ids, vocab.ids_of(rule.tokens))
    if rule.previous:
        mask &= np.isin(tokens.prev_ids, vocab.ids_of(rule.previous))
    if rule.context is not None:
        mask &= tokens.contexts[CONTEXT_NAMES.index(rule.context)]
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
