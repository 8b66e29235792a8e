"""Words a feature fires on anywhere in the precompute corpus, read from the store's
``feature_word_lists`` (each feature's most frequent tokens and their firings): evidence beyond
its examples.

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

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sae_core.labels.evidence import TokenSet, Vocab
from sae_core.labels.rules import LabelRule, Term
from sae_core.labels.scoring import rule_mask
from sae_core.store.db import FeatureWordRow, SaeRow, driver_rows, unpack_tokens

MIN_CORPUS_FIRINGS = 2  # as a key of the rule search: a word seen firing once is an anecdote
# Adding a word raises a rule's F1 when the feature fires on more than about half that F1's share
# of the word's occurrences; a quarter is that bar for the F1 of 0.5 labels aim at. (On the demo
# 4k SAE's tuning split, 0.2 and 0.25 did best: median F1 0.348 / 0.344, >= 0.5 33.1% / 33.8%; a
# bar of a share of the rule's training F1 instead did no better.)
MIN_WORD_PRECISION = 0.25


class FeatureWords(NamedTuple):
    """A feature's row of ``feature_word_lists``: its tokens, as words (text ids), most firings
    first. Sequences of ints (numpy arrays as read from the store)."""

    text_ids: Sequence[int]
    counts: Sequence[int]  # the feature's firings on each, in every window
    occurrences: Sequence[int]  # each token's occurrences, in every window
    full: bool  # as long as precompute keeps: tokens left out fired at most ``counts[-1]`` times


def corpus_firings(
    session: Session, sae: SaeRow, vocab: Vocab, features: list[int]
) -> dict[int, FeatureWords]:
    """The stored words of each of ``features`` that has any."""
    kept = (sae.precompute_cfg or {}).get("feature_words_size")
    rows = driver_rows(
        session,
        sa.select(
            FeatureWordRow.feature_idx,
            FeatureWordRow.token_ids,
            FeatureWordRow.counts,
            FeatureWordRow.occurrences,
        ).where(FeatureWordRow.sae_id == sae.id, FeatureWordRow.feature_idx.in_(features)),
    )
    out = {}
    for feature, tokens, counts, occurrences in rows:
        text = vocab.text_id[unpack_tokens(tokens)]
        out[feature] = FeatureWords(
            text, unpack_tokens(counts), unpack_tokens(occurrences), len(text) == kept
        )
    return out


def _runs(values: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(value, start, stop) of each run of equal ``values`` (a grouped array), in order."""
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]]).tolist()
    for a, b in zip(starts, starts[1:] + [len(values)], strict=True):
        yield int(values[a]), a, b


def corpus_term(words: FeatureWords | None, heldout: TokenSet, vocab: Vocab) -> Term | None:
    """``corpus_terms`` of one feature."""
    return corpus_terms([words], [heldout], vocab)[0]


def _occurrences(values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """How often each of ``wanted`` occurs in ``values``."""
    keys, counts = np.unique(values, return_counts=True)
    if not len(keys):
        return np.zeros_like(wanted)
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    return np.where(keys[at] == wanted, counts[at], 0)


def corpus_terms(
    words: list[FeatureWords | None], heldouts: list[TokenSet], vocab: Vocab
) -> list[Term | None]:
    """Of each feature (its stored ``words`` and its held-out tokens): the words it fired on at
    least ``MIN_CORPUS_FIRINGS`` times and on at least ``MIN_WORD_PRECISION`` of their
    occurrences outside its held-out windows, by tokens whose place in its list stands without
    those windows, the largest share of occurrences fired on first (then the most firings, then
    the list's order); None when there are none. Every feature at once: keys are
    feature * n_texts + text id."""
    n_texts = len(vocab.texts) + 1
    listed = [(f, w) for f, w in enumerate(words) if w is not None and len(w.text_ids)]
    out: list[Term | None] = [None] * len(words)
    if not listed:
        return out
    features = [f for f, _ in listed]
    n_listed = [len(w.text_ids) for _, w in listed]
    key = np.repeat(features, n_listed) * n_texts + np.concatenate([w.text_ids for _, w in listed])
    count = np.concatenate([w.counts for _, w in listed]).astype(np.int64)
    occurs = np.concatenate([w.occurrences for _, w in listed]).astype(np.int64)
    floor = np.repeat([w.counts[-1] if w.full else 0 for _, w in listed], n_listed)
    # each listed feature's held-out tokens, as keys: its firings there and its tokens there
    sets = [heldouts[f] for f in features]
    held_owner = np.repeat(features, [len(h.text_ids) for h in sets])
    held_key = held_owner * n_texts + np.concatenate([h.text_ids for h in sets])
    seen = _occurrences(held_key[np.concatenate([h.fires for h in sets])], key)
    held = _occurrences(held_key[np.concatenate([h.keep for h in sets])], key)
    stands = (seen == 0) | (count - seen > floor)
    # a word's entries summed (a word may be listed under several token ids), in list order
    word, first, inverse = np.unique(key[stands], return_index=True, return_inverse=True)
    firings = np.bincount(inverse, weights=count[stands]).astype(np.int64) - seen[stands][first]
    occurrences = np.bincount(inverse, weights=occurs[stands]).astype(np.int64) - held[stands][first]
    occurrences = np.maximum(occurrences, 0)
    good = (firings >= MIN_CORPUS_FIRINGS) & (firings >= MIN_WORD_PRECISION * occurrences)
    word, first, firings, occurrences = word[good], first[good], firings[good], occurrences[good]
    if not len(word):
        return out
    share = firings / np.maximum(occurrences, firings)
    order = np.lexsort((first, -firings, -share, word // n_texts))
    feature, text = np.divmod(word[order], n_texts)
    for f, a, b in _runs(feature):
        out[f] = Term(tuple(vocab.texts[t] for t in text[a:b].tolist()))
    return out


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
