"""Words a feature fires on anywhere in the precompute corpus, read from the store's
``feature_words`` (each feature's most frequent tokens and their firings): evidence beyond its
examples.

A sparse feature's examples show a few of the words it fires on; precompute counted its firings
on every token of the corpus. A label adds, as a term of its own, the words its rule does not
explain that the feature fired on at least ``MIN_CORPUS_FIRINGS`` times outside its held-out
windows, on at least ``MIN_WORD_PRECISION`` of the word's occurrences there. The counts cover every window, held-out ones included, so nothing taken from them may
rest on those windows:
- the feature's firings in its held-out windows (known from its held-out examples), and the
  word's occurrences there, are taken out of the counts;
- a token the feature fired on in those windows counts only if it would hold its place in the
  feature's list without them: when the list is as long as precompute keeps, more firings left
  than the list's last, which every token left out fired at most as often as.
Where the feature fires in a held-out negative window, the counts hold it while the score calls
the word a miss there; that can only lower the score.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sae_core.labels.evidence import TokenSet, Vocab
from sae_core.labels.rules import LabelRule, Term
from sae_core.labels.scoring import rule_mask
from sae_core.store.db import FeatureWordRow, SaeRow

MIN_CORPUS_FIRINGS = 2  # as a key of the rule search: a word seen firing once is an anecdote
# Adding a word raises a rule's F1 when the feature fires on more than about half that F1's share
# of the word's occurrences; a quarter is that bar for the F1 of 0.5 labels aim at. (On the demo
# 4k SAE's tuning split, 0.2 and 0.25 did best: median F1 0.348 / 0.344, >= 0.5 33.1% / 33.8%; a
# bar of a share of the rule's training F1 instead did no better.)
MIN_WORD_PRECISION = 0.25


class FeatureWords(NamedTuple):
    """A feature's row of ``feature_words``: its tokens, as words (text ids), most firings first."""

    text_ids: list[int]
    counts: list[int]  # the feature's firings on each, in every window
    occurrences: list[int]  # each token's occurrences, in every window
    full: bool  # as long as precompute keeps: tokens left out fired at most ``counts[-1]`` times


def corpus_firings(
    session: Session, sae: SaeRow, vocab: Vocab, features: list[int]
) -> dict[int, FeatureWords]:
    """The stored words of each of ``features`` that has any."""
    kept = (sae.precompute_cfg or {}).get("feature_words_size")
    rows = session.execute(
        sa.select(
            FeatureWordRow.feature_idx,
            FeatureWordRow.token_id,
            FeatureWordRow.count,
            FeatureWordRow.occurrences,
        )
        .where(FeatureWordRow.sae_id == sae.id, FeatureWordRow.feature_idx.in_(features))
        .order_by(FeatureWordRow.feature_idx, FeatureWordRow.rank)
    )
    lists: dict[int, tuple[list[int], list[int], list[int]]] = defaultdict(lambda: ([], [], []))
    for feature, token, count, occurrences in rows:
        for column, value in zip(
            lists[feature], (int(vocab.text_id[token]), count, occurrences), strict=True
        ):
            column.append(value)
    return {f: FeatureWords(t, c, o, len(c) == kept) for f, (t, c, o) in lists.items()}


def corpus_term(words: FeatureWords | None, heldout: TokenSet, vocab: Vocab) -> Term | None:
    """The words a feature fired on at least ``MIN_CORPUS_FIRINGS`` times and on at least
    ``MIN_WORD_PRECISION`` of their occurrences outside its held-out windows, by tokens whose place
    in its list stands without those windows, the largest share of occurrences fired on first
    (then the most firings); None when there are none."""
    if words is None:
        return None
    seen = Counter(heldout.text_ids[heldout.fires].tolist())
    floor = words.counts[-1] if words.full else 0
    firings: Counter = Counter()
    occurrences: Counter = Counter()
    for text_id, count, occurs in zip(words.text_ids, words.counts, words.occurrences, strict=True):
        if not seen[text_id] or count - seen[text_id] > floor:
            firings[text_id] += count
            occurrences[text_id] += occurs
    firings -= seen
    # (only the listed words' occurrences are read: ``-=`` would walk every held-out word)
    held = Counter(heldout.text_ids[heldout.keep].tolist())
    occurrences = +Counter({w: n - held[w] for w, n in occurrences.items()})
    kept = [
        w
        for w, n in firings.items()
        if n >= MIN_CORPUS_FIRINGS and n >= MIN_WORD_PRECISION * occurrences[w]
    ]
    # most precise first: the words a label shows are those that say most about the feature
    kept.sort(key=lambda w: (-firings[w] / max(occurrences[w], firings[w]), -firings[w]))
    return Term(tuple(vocab.texts[w] for w in kept)) if kept else None


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
    kept = tuple(w for w in term.tokens if vocab.index[w] not in explained)
    return LabelRule(rule.terms + (Term(kept),)) if kept else rule
