"""Words a feature fires on anywhere in the precompute corpus, read from the store's token index:
evidence beyond its examples.

A sparse feature's examples show a few of the words it fires on; the token index
(``token_features``: for every vocabulary token, the features of highest mean activation on it
and how often each fires there) saw the whole corpus. A label adds, as a term of its own, the
words its rule does not explain that the feature fired on at least ``MIN_CORPUS_FIRINGS`` times
outside its held-out windows.

The index was built over every window, held-out ones included, so nothing it says may rest on
them:
- the feature's firings in its held-out windows (known from its held-out examples) are taken out
  of the counts;
- an entry is used only if the feature would hold its place in the token's index without its
  held-out activation: its mean activation less that activation over its firings there (a token
  occurs at least as often as the feature fires on it) must still reach the lowest mean the index
  kept for the token. Other features losing their held-out activation only lowers that bar.
Where the feature fires in a held-out negative window, the index counts it while the score calls
the word a miss there; that can only lower the score.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sae_core.labels.evidence import ContextLibrary, Example, TokenSet, Vocab
from sae_core.labels.rules import LabelRule, Term
from sae_core.labels.scoring import rule_mask
from sae_core.store.db import TokenFeatureRow, unpack_levels

MIN_CORPUS_FIRINGS = 2  # as a key of the rule search: a word seen firing once is an anecdote


class IndexEntry(NamedTuple):
    """One feature's row of the token index, for the word (text id) of its token."""

    text_id: int
    count: int  # the feature's firings on the token, in every window
    mean_act: float  # its mean activation on the token, zeros included
    floor: float  # the lowest mean activation the token's index kept: the bar to stay in it


def corpus_firings(
    session: Session, sae_id: int, vocab: Vocab, features: list[int]
) -> dict[int, list[IndexEntry]]:
    """The token index's entries of each of ``features``."""
    index = TokenFeatureRow.__table__
    theirs = sa.select(index.c.token_id).where(
        index.c.sae_id == sae_id, index.c.feature_idx.in_(features)
    )
    floors = (
        sa.select(index.c.token_id, sa.func.min(index.c.mean_act).label("floor"))
        .where(index.c.sae_id == sae_id, index.c.token_id.in_(theirs))
        .group_by(index.c.token_id)
        .subquery()
    )
    rows = session.execute(
        sa.select(
            index.c.feature_idx, index.c.token_id, index.c.count, index.c.mean_act, floors.c.floor
        )
        .join(floors, floors.c.token_id == index.c.token_id)
        .where(index.c.sae_id == sae_id, index.c.feature_idx.in_(features))
    )
    out: dict[int, list[IndexEntry]] = defaultdict(list)
    for feature, token, count, mean_act, floor in rows:
        out[feature].append(IndexEntry(int(vocab.text_id[token]), count, mean_act, floor))
    return out


def heldout_activation(library: ContextLibrary, examples: Iterable[Example]) -> Counter:
    """Of each word (text id), a feature's summed activation on it in its held-out ``examples``,
    rounded up from the stored levels (each within half a level of the value)."""
    total: Counter = Counter()
    for example in examples:
        positions, levels = unpack_levels(example.acts_blob)
        words = library.text[library.row[example.context_id], positions.astype(np.int64)]
        acts = (levels.astype(np.float64) + 0.5) / 255.0 * example.max_act
        for word, act in zip(words.tolist(), acts.tolist(), strict=True):
            total[word] += act
    return total


def corpus_term(
    entries: list[IndexEntry], heldout: TokenSet, heldout_act: Counter, vocab: Vocab
) -> Term | None:
    """The words a feature fired on at least ``MIN_CORPUS_FIRINGS`` times outside its held-out
    windows, by entries that stand without those windows, most firings first; None when there
    are none."""
    firings = Counter()
    for entry in entries:
        if entry.mean_act - heldout_act[entry.text_id] / entry.count >= entry.floor:
            firings[entry.text_id] += entry.count
    firings -= Counter(heldout.text_ids[heldout.fires].tolist())
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
