"""Words a feature fires on anywhere in the precompute corpus, read from the store's token index:
evidence beyond its examples.

A sparse feature's examples show a few of the words it fires on; the token index
(``token_features``: for every vocabulary token, the features that fire most on it and how often)
saw the whole corpus. A label adds, as a term of its own, the words its rule does not explain that
the feature fired on at least ``MIN_CORPUS_FIRINGS`` times outside its held-out windows. Its
firings in those windows (known exactly from its held-out examples) are taken out of the counts
first, so a score never rewards a label for what the held-out tokens showed. Two biases remain:
the index keeps each token's 20 strongest features, ranked over every window, held-out ones
included (a slight help); where the feature fires in a held-out negative window, the index counts
it while the score calls the word a miss there (which can only lower the score).
"""

from __future__ import annotations

from collections import Counter

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sae_core.labels.evidence import TokenSet, Vocab
from sae_core.labels.rules import LabelRule, Term
from sae_core.labels.scoring import rule_mask
from sae_core.store.db import TokenFeatureRow

MIN_CORPUS_FIRINGS = 2  # as a key of the rule search: a word seen firing once is an anecdote


def corpus_firings(
    session: Session, sae_id: int, vocab: Vocab, features: list[int]
) -> dict[int, Counter]:
    """Of each of ``features``, its firings on each word (text id) in the token index."""
    rows = session.execute(
        sa.select(TokenFeatureRow.feature_idx, TokenFeatureRow.token_id, TokenFeatureRow.count)
        .where(TokenFeatureRow.sae_id == sae_id)
        .where(TokenFeatureRow.feature_idx.in_(features))
    )
    out: dict[int, Counter] = {}
    for feature, token, count in rows:
        out.setdefault(feature, Counter())[int(vocab.text_id[token])] += count
    return out


def corpus_term(firings: Counter, heldout: TokenSet, vocab: Vocab) -> Term | None:
    """The words a feature fired on at least ``MIN_CORPUS_FIRINGS`` times outside its held-out
    windows, most firings first; None when there are none."""
    firings = firings - Counter(heldout.text_ids[heldout.fires].tolist())
    words = [w for w, n in firings.most_common() if n >= MIN_CORPUS_FIRINGS]
    return Term(tuple(vocab.texts[w] for w in words)) if words else None


def with_corpus_words(
    rule: LabelRule, term: Term | None, train: TokenSet, vocab: Vocab
) -> LabelRule:
    """``rule`` with, as one more term, the words of ``term`` it does not explain already: those
    it picks nowhere the feature fires among its training tokens ``train`` (a docstring feature's
    rule explains the words of docstrings). A rule of any token at all is the search's way of
    finding nothing, so the words replace it."""
    if term is None:
        return rule
    if rule.terms == (Term(),):
        return LabelRule.of(term)
    explained = set(train.text_ids[rule_mask(rule, train, vocab) & train.fires].tolist())
    words = tuple(w for w in term.tokens if vocab.index[w] not in explained)
    return LabelRule(rule.terms + (Term(words),)) if words else rule
