"""The rule search of ``sae_core.labels.induction``, compiled: one feature at a time, over its own
tokens (see that module for what the search does and why).

Each feature's search reads only its tokens, a few thousand, so it is a handful of passes over
small arrays; numba compiles it once (cached on disk beside this file, or in numba's user cache
where that is read-only). The numpy version it replaced searched a batch of features as
(feature, slot, key) tables and spent most of its time building and gathering them.

A token's contexts are its signature's row of ``flags``: per-feature context counts are a count per
distinct signature, then a sum of those rows. A key kind's entries are the local ids of the
feature's keys among each token's values of that kind, token after token (a window part may hold
several keys of a token). A step reads only the tokens it may add to: all but the covered ones
on a fresh step, few when refining a term.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

_NEG = -np.inf


class Settings(NamedTuple):
    """The search's settings (``induction``'s module constants, read at each call so that a tuning
    run may change them)."""

    max_terms: int
    max_keys: int
    max_refinements: int
    min_key_firings: int
    max_candidate_keys: int
    max_columns: int
    shrink: float
    part_penalty: float
    key_penalty: float
    term_penalty: float


class Batch(NamedTuple):
    """Several features' tokens laid end to end (``induction`` builds it from a ``TokenBatch``)."""

    spans: np.ndarray  # (F + 1,) int64: where each feature's tokens start
    kinds: tuple  # of each key kind (KINDS order), (N, values) int32 text ids, -1 for none
    signature: np.ndarray  # (N,) int64: each token's row of ``flags``
    flags: np.ndarray  # (S, C) bool
    fires: np.ndarray  # (N,) bool
    keep: np.ndarray  # (N,) bool
    promoted: np.ndarray  # (P,) int32: each feature's promoted text ids, end to end
    promoted_spans: np.ndarray  # (F + 1,) int64
    # (the token-class contexts (C,) bool, the kind holding each token's own text, the kind whose
    # keys include the promoted ones)
    lexicon: tuple
    n_texts: int  # text ids run below this


class Found(NamedTuple):
    """What the search found for each feature of a batch."""

    keys: np.ndarray  # (F, max_terms, kinds, max_keys) int64 text ids in the label's order, -1 past
    contexts: np.ndarray  # (F, max_terms, 2 + max_refinements) int64 columns, -1 past them
    unless: np.ndarray  # (F, max_terms, 1 + max_refinements) int64 columns, -1 past them
    n_terms: np.ndarray  # (F,) int64
    objective: np.ndarray  # (F,) float64: the list's search objective
    # (F, 4) int64: firing tokens, kept tokens, and the list's true positives and predictions
    counts: np.ndarray


def search(batch: Batch, settings: Settings) -> Found:
    """The best decision list of each feature of ``batch`` (compiled on the first call)."""
    return Found(*_search_batch(*batch, settings))


# ---------------------------------------------------------------------------------------------
# Counting

# A feature's table of contexts is a tuple (``flags`` (S, C), each row's contexts listed as
# ``_listed`` gives them, and the feature's own rows (m,)): its signatures are numbered 0..m-1.


@numba.njit(cache=True)
def _shrunk(gained, shrink):
    """Firings less ``shrink`` standard deviations of their count, as float64."""
    g = np.float64(gained)
    return max(g - shrink * np.sqrt(g), 0.0)


@numba.njit(cache=True)
def _objective(true_positives, n_predicted, n_firing, gained, picked, penalty, shrink):
    """The penalised F1 of the list once a candidate adds ``gained`` firing tokens out of
    ``picked``, its gain shrunk by its own noise (float64)."""
    denominator = np.float64(n_predicted) + np.float64(picked) + np.float64(n_firing)
    return 2.0 * (true_positives + _shrunk(gained, shrink)) / denominator - penalty


@numba.njit(cache=True)
def _objective32(true_positives, n_predicted, n_firing, gained, picked, penalty, shrink):
    """``_objective`` in float32, as context pairs have always been scored."""
    g = np.float32(gained)
    shrunk = max(g - np.float32(shrink) * np.sqrt(g), np.float32(0.0))
    denominator = np.float32(n_predicted) + np.float32(picked) + np.float32(n_firing)
    return np.float32(2.0) * (np.float32(true_positives) + shrunk) / denominator - np.float32(
        penalty
    )


@numba.njit(cache=True)
def _signature_counts(mask, local_signature, n_local):
    counts = np.zeros(n_local, np.int64)
    for i in range(len(mask)):
        if mask[i]:
            counts[local_signature[i]] += 1
    return counts


@numba.njit(cache=True)
def _column_sums(counts, table):
    """Tokens in each context, from ``counts`` per signature of the feature's ``table``. (C,)"""
    flags, starts, columns, rows = table
    out = np.zeros(flags.shape[1], np.int64)
    for j in range(len(counts)):
        if counts[j]:
            for c in columns[starts[rows[j]] : starts[rows[j] + 1]]:
                out[c] += counts[j]
    return out


@numba.njit(cache=True)
def _pair_sums(counts, table, top):
    """Tokens in both context ``top[r]`` and each context. (len(top), C)"""
    flags, starts, columns, rows = table
    out = np.zeros((len(top), flags.shape[1]), np.int64)
    for j in range(len(counts)):
        if counts[j]:
            g = rows[j]
            for r in range(len(top)):
                if flags[g, top[r]]:
                    for c in columns[starts[g] : starts[g + 1]]:
                        out[r, c] += counts[j]
    return out


@numba.njit(cache=True)
def _listed(flags):
    """The contexts of each row of ``flags`` (S, C), listed (``columns[starts[g]:starts[g + 1]]``):
    a row holds a few of the C."""
    starts = np.zeros(len(flags) + 1, np.int64)
    columns = np.empty(flags.size, np.int64)
    n = 0
    for j in range(len(flags)):
        for c in range(flags.shape[1]):
            if flags[j, c]:
                columns[n] = c
                n += 1
        starts[j + 1] = n
    return starts, columns[:n]


@numba.njit(cache=True)
def _first_max(values):
    """The index of the first largest of ``values`` (0 when all are -inf), as ``argmax``."""
    best = 0
    for j in range(1, len(values)):
        if values[j] > values[best]:
            best = j
    return best


@numba.njit(cache=True)
def _descending(values, n):
    """The indices of the ``n`` largest ``values``, largest first, ties in index order (a stable
    sort of ``-values``)."""
    taken = np.zeros(len(values), np.bool_)
    order = np.empty(n, np.int64)
    for j in range(n):
        best = -1
        for i in range(len(values)):
            if not taken[i] and (best < 0 or values[i] > values[best]):
                best = i
        order[j] = best
        taken[best] = True
    return order


# ---------------------------------------------------------------------------------------------
# A feature's keys


@numba.njit(cache=True)
def _chosen_keys(values, fires, promoted, text_count, s):
    """Text ids of the feature's keys of one kind, in its order: those seen firing at least
    ``min_key_firings`` times, the ``max_candidate_keys`` seen most often (ties: lower text id),
    and ``promoted`` ones seen firing at all. In text order, or by count when it had more than
    it keeps and nothing was promoted. ``text_count``: zeros, left as found."""
    n, width = values.shape
    touched = np.empty(fires.sum() * width, np.int64)
    n_touched = 0
    for i in range(n):
        if fires[i]:
            for v in range(width):
                t = values[i, v]
                if t >= 0:
                    if text_count[t] == 0:
                        touched[n_touched] = t
                        n_touched += 1
                    text_count[t] += 1
    n_texts = len(text_count)
    often = np.empty(n_touched, np.int64)
    n_often = 0
    for j in range(n_touched):
        t = touched[j]
        if text_count[t] >= s.min_key_firings:
            often[n_often] = -text_count[t] * n_texts + t  # by count, then text id
            n_often += 1
    kept = np.sort(often[:n_often])[: s.max_candidate_keys] % n_texts
    added = np.empty(len(promoted), np.int64)
    n_added = 0
    for t in promoted:
        if text_count[t] > 0:
            added[n_added] = t
            n_added += 1
    for j in range(n_touched):
        text_count[touched[j]] = 0
    if n_often <= s.max_candidate_keys or len(promoted) > 0:
        return np.unique(np.concatenate((kept, added[:n_added])))
    return kept


@numba.njit(cache=True)
def _entries(values, slots, keys, text_local):
    """The local ids of ``keys`` among each token's ``values`` (n, width), for tokens in some slot:
    token ``i``'s are ``key[starts[i]:starts[i + 1]]``; and whether a token has several.
    ``text_local``: -1 everywhere, left as found."""
    n, width = values.shape
    if len(keys) > np.iinfo(text_local.dtype).max:
        raise ValueError("too many keys of one kind for the search's key ids")
    for j in range(len(keys)):
        text_local[keys[j]] = j
    n_entries = 0
    for i in range(n):
        if slots[i]:
            for v in range(width):
                if values[i, v] >= 0 and text_local[values[i, v]] >= 0:
                    n_entries += 1
    starts = np.zeros(n + 1, np.int64)
    key = np.empty(n_entries, np.int64)
    e, several = 0, False
    for i in range(n):
        if slots[i]:
            for v in range(width):
                t = values[i, v]
                if t >= 0 and text_local[t] >= 0:
                    key[e] = text_local[t]
                    e += 1
        starts[i + 1] = e
        several = several or e - starts[i] > 1
    for j in range(len(keys)):
        text_local[keys[j]] = -1
    return starts, key, several


# ---------------------------------------------------------------------------------------------
# One step


# A term is a tuple (keys (kinds, max_keys) local key ids in the label's order, contexts
# (2 + max_refinements,) and unless (1 + max_refinements,) columns), each -1 past its entries.
# A step is a tuple (true positives of the list so far (shrunk), its predictions, firing tokens,
# the base term's penalty); a fresh step's base term is empty.
# A kind is a tuple (text ids of the feature's keys by local id, and ``_entries``'s three).


@numba.njit(cache=True)
def _empty_term(n_kinds, s):
    return (
        np.full((n_kinds, s.max_keys), -1, np.int64),
        np.full(2 + s.max_refinements, -1, np.int64),
        np.full(1 + s.max_refinements, -1, np.int64),
    )


@numba.njit(cache=True)
def _is_empty(term):
    keys, contexts, unless = term
    return keys.max() < 0 and contexts.max() < 0 and unless.max() < 0


@numba.njit(cache=True)
def _append(columns, value):
    if value >= 0:
        for j in range(len(columns)):
            if columns[j] < 0:
                columns[j] = value
                return


@numba.njit(cache=True)
def _penalty(term, s):
    keys, contexts, unless = term
    n_parts, extra_keys = 0, 0
    for kind in range(keys.shape[0]):
        n_keys = 0
        for j in range(keys.shape[1]):
            if keys[kind, j] >= 0:
                n_keys += 1
        if n_keys:
            n_parts += 1
            extra_keys += n_keys - 1
    for c in contexts:
        if c >= 0:
            n_parts += 1
    for c in unless:
        if c >= 0:
            n_parts += 1
    return s.part_penalty * max(n_parts - 1, 0) + s.key_penalty * extra_keys


@numba.njit(cache=True)
def _mask(term, kinds, keep, local_signature, table):
    """Where the term holds on the feature's tokens. (n,) bool"""
    keys, contexts, unless = term
    flags, _, _, rows = table
    inside = np.ones(len(rows), np.bool_)  # by local signature
    for j in range(len(rows)):
        row = flags[rows[j]]
        for c in contexts:
            if c >= 0 and not row[c]:
                inside[j] = False
        for c in unless:
            if c >= 0 and row[c]:
                inside[j] = False
    out = np.empty(len(keep), np.bool_)
    for i in range(len(keep)):
        out[i] = keep[i] and inside[local_signature[i]]
    for kind in range(len(kinds)):
        if keys[kind, 0] < 0:
            continue
        texts, starts, key, _ = kinds[kind]
        member = np.zeros(len(texts), np.bool_)
        for j in range(keys.shape[1]):
            if keys[kind, j] >= 0:
                member[keys[kind, j]] = True
        for i in range(len(keep)):
            if out[i]:
                holds = False
                for e in range(starts[i], starts[i + 1]):
                    holds = holds or member[key[e]]
                out[i] = holds
    return out


@numba.njit(cache=True)
def _key_proposal(kind, tokens, slots, columns, fires, base, step, closed_columns, s):
    """The best key set of one kind, alone or within one of the feature's columns but
    ``closed_columns``, made of ``tokens`` (the step's): (objective, slot, local keys in order).
    Keys are sorted by smoothed precision; a token joins the set at the first prefix holding one
    of its keys, so the prefix sums count the union."""
    true_positives, n_predicted, n_firing, base_penalty = step
    fresh = _is_empty(base)
    texts, starts, key, several = kind
    n_slots, k = len(columns) + 1, len(texts)
    counts = np.zeros((n_slots, k, 2), np.int64)
    for i in tokens:
        fired = 1 if fires[i] else 0
        for e in range(starts[i], starts[i + 1]):
            for slot in range(n_slots):
                if slots[i] >> slot & 1:
                    counts[slot, key[e], fired] += 1
    width = min(k, s.max_keys)
    order = np.empty((n_slots, width), np.int64)
    rank = np.full((n_slots, k), width, np.int64)
    precision = np.empty(k)
    for slot in range(n_slots):
        for j in range(k):
            precision[j] = counts[slot, j, 1] / (counts[slot, j, 0] + counts[slot, j, 1] + 1.0)
        order[slot] = _descending(precision, width)
        for j in range(width):
            rank[slot, order[slot, j]] = j
    joined = np.zeros((n_slots, width, 2), np.int64)
    if several:
        for i in tokens:
            fired = 1 if fires[i] else 0
            for slot in range(n_slots):
                if slots[i] >> slot & 1:
                    best = width
                    for e in range(starts[i], starts[i + 1]):
                        best = min(best, rank[slot, key[e]])
                    if best < width:
                        joined[slot, best, fired] += 1
    else:  # a token holds one key: it joins the set with that key
        for slot in range(n_slots):
            for j in range(width):
                joined[slot, j] = counts[slot, order[slot, j]]
    objective, best_slot, best_n = _NEG, 0, 0  # (all -inf: the first, as ``argmax``)
    for slot in range(n_slots):
        anywhere = slot == n_slots - 1
        closed = False
        if not anywhere:
            c = columns[slot]
            closed = c < 0 or closed_columns[c]
            for b in base[1]:
                closed = closed or b == c
        parts = 1 + (0 if anywhere else 1) + (0 if fresh else 1)
        gained, picked = 0, 0
        for j in range(width):
            gained += joined[slot, j, 1]
            picked += joined[slot, j, 0] + joined[slot, j, 1]
            value = _NEG
            if not closed and gained:
                penalty = (base_penalty + s.key_penalty * j) + s.part_penalty * (parts - 1)
                value = _objective(
                    true_positives, n_predicted, n_firing, gained, picked, penalty, s.shrink
                )
            if value > objective:
                objective, best_slot, best_n = value, slot, j
    return objective, best_slot, order[best_slot, : best_n + 1]


@numba.njit(cache=True)
def _context_proposal(counts, firing_counts, table, columns, base, step, closed_columns, s):
    """One context, two together, or (refining) one more context required or excepted, but
    ``closed_columns``: (objective, contexts required (2,), context excepted). ``counts``: the
    step's tokens per signature, ``firing_counts`` its firing ones."""
    true_positives, n_predicted, n_firing, base_penalty = step
    fresh = _is_empty(base)
    n_within, n_within_firing = counts.sum(), firing_counts.sum()
    positives = _column_sums(firing_counts, table)
    totals = _column_sums(counts, table)
    penalty = base_penalty + s.part_penalty * (0 if fresh else 1)
    n_columns = table[0].shape[1]
    required, excepted = np.empty(n_columns), np.empty(n_columns)
    for c in range(n_columns):
        required[c] = _objective(
            true_positives, n_predicted, n_firing, positives[c], totals[c], penalty, s.shrink
        )
        excepted[c] = _objective(
            true_positives,
            n_predicted,
            n_firing,
            n_within_firing - positives[c],
            n_within - totals[c],
            penalty,
            s.shrink,
        )
        if positives[c] == 0:
            required[c] = _NEG
        if closed_columns[c]:
            required[c] = excepted[c] = _NEG
        if fresh:
            excepted[c] = _NEG
    for used in (base[1], base[2]):
        for c in used:
            if c >= 0:
                required[c] = excepted[c] = _NEG
    r, x = _first_max(required), _first_max(excepted)
    objective, contexts, unless = required[r], np.array([r, -1]), -1
    if excepted[x] > objective:
        objective, contexts, unless = excepted[x], np.array([-1, -1]), x
    if fresh:  # pairs: one of the feature's columns, and or but not any other context
        top = np.maximum(columns, 0)
        both_positives = _pair_sums(firing_counts, table, top)
        both_totals = _pair_sums(counts, table, top)
        pair_penalty = penalty + s.part_penalty
        pairs = np.full((len(top), n_columns), _NEG)
        excepting = np.full((len(top), n_columns), _NEG)
        for i in range(len(top)):
            if columns[i] < 0:
                continue
            for c in range(n_columns):
                if c == top[i]:
                    continue
                if both_positives[i, c]:
                    pairs[i, c] = _objective32(
                        true_positives,
                        n_predicted,
                        n_firing,
                        both_positives[i, c],
                        both_totals[i, c],
                        pair_penalty,
                        s.shrink,
                    )
                excepting[i, c] = _objective(
                    true_positives,
                    n_predicted,
                    n_firing,
                    positives[top[i]] - both_positives[i, c],
                    totals[top[i]] - both_totals[i, c],
                    pair_penalty,
                    s.shrink,
                )
        best = _first_max(pairs.ravel())
        i, c = best // n_columns, best % n_columns
        if pairs[i, c] > objective:
            objective, contexts, unless = pairs[i, c], np.array([top[i], c]), -1
        best = _first_max(excepting.ravel())
        i, c = best // n_columns, best % n_columns
        if excepting[i, c] > objective:
            objective, contexts, unless = excepting[i, c], np.array([top[i], -1]), c
    return objective, contexts, unless


@numba.njit(cache=True)
def _best(feature, within, base, step, lexicon, s):
    """The best candidate on this step and its term (the base with it added). ``feature``: what
    every step of the feature's search reads (see ``_fit_feature``); ``lexicon``: the token-class
    columns (C,) bool, and which kind holds the token's own text (a token's class follows from its
    text: nothing to add to it)."""
    kinds, slots, columns, fires, local_signature, table = feature
    is_class, token_kind = lexicon
    no_columns = np.zeros(len(is_class), np.bool_)
    firing = within & fires
    tokens = np.flatnonzero(within)
    objective, contexts, unless = _context_proposal(
        _signature_counts(within, local_signature, len(table[3])),
        _signature_counts(firing, local_signature, len(table[3])),
        table,
        columns,
        base,
        step,
        is_class if base[0][token_kind, 0] >= 0 else no_columns,
        s,
    )
    won_kind, won_slot, won_keys = -1, 0, np.empty(0, np.int64)
    for kind in range(len(kinds)):
        if len(kinds[kind][0]) == 0 or base[0][kind, 0] >= 0:
            continue
        value, slot, chosen = _key_proposal(
            kinds[kind],
            tokens,
            slots,
            columns,
            fires,
            base,
            step,
            is_class if kind == token_kind else no_columns,
            s,
        )
        if value > objective:
            objective, won_kind, won_slot, won_keys = value, kind, slot, chosen
    keys, term_contexts, term_unless = base[0].copy(), base[1].copy(), base[2].copy()
    if won_kind >= 0:
        keys[won_kind, : len(won_keys)] = won_keys
        _append(term_contexts, columns[won_slot] if won_slot < len(columns) else -1)
    else:
        _append(term_contexts, contexts[0])
        _append(term_contexts, contexts[1])
        _append(term_unless, unless)
    return objective, (keys, term_contexts, term_unless)


# ---------------------------------------------------------------------------------------------
# A feature's search


@numba.njit(cache=True)
def _fit_feature(
    kind_values, signature, flags, listed, fires, keep, promoted, lexicon, scratch, s, out
):
    """The decision list of one feature's tokens, written into row ``out`` of the outputs."""
    out_keys, out_contexts, out_unless, out_n_terms, out_objective, out_counts = out
    text_count, text_local, signature_local = scratch
    promoted_kind = lexicon[2]
    n = len(fires)
    # the feature's distinct signatures, numbered in order of first sight
    local_signature = np.empty(n, np.int64)
    rows = np.empty(n, np.int64)
    n_rows = 0
    for i in range(n):
        g = signature[i]
        if signature_local[g] < 0:
            signature_local[g] = n_rows
            rows[n_rows] = g
            n_rows += 1
        local_signature[i] = signature_local[g]
    rows = rows[:n_rows]
    for g in rows:
        signature_local[g] = -1
    table = (flags, listed[0], listed[1], rows)
    n_firing = fires.sum()
    out_counts[0], out_counts[1] = n_firing, keep.sum()
    if not n_firing:
        return
    # the contexts key sets are tried within: those holding the most firings
    held = _column_sums(_signature_counts(fires, local_signature, len(rows)), table)
    n_held = 0
    for c in range(len(held)):
        if held[c] > 0:
            n_held += 1
    columns = np.full(s.max_columns, -1, np.int64)
    columns[: min(s.max_columns, n_held)] = _descending(
        held.astype(np.float64), min(s.max_columns, n_held)
    )
    # each kept token's slots as bits: the columns it is in, and "anywhere" (the last)
    slots = np.zeros(n, np.int64)
    for i in range(n):
        if keep[i]:
            bits = 1 << s.max_columns
            row = flags[signature[i]]
            for r in range(s.max_columns):
                if columns[r] >= 0 and row[columns[r]]:
                    bits |= 1 << r
            slots[i] = bits
    kinds = []
    for kind in range(len(kind_values)):
        values = kind_values[kind]
        texts = _chosen_keys(
            values, fires, promoted if kind == promoted_kind else promoted[:0], text_count, s
        )
        kinds.append((texts, *_entries(values, slots, texts, text_local)))
    feature = (kinds, slots, columns, fires, local_signature, table)
    covered = np.zeros(n, np.bool_)
    credited, spent, current, n_terms = 0.0, 0.0, 0.0, 0
    for t in range(s.max_terms):
        list_penalty = s.term_penalty * n_terms + spent
        n_predicted = covered.sum()
        step = (credited, n_predicted, n_firing, list_penalty)
        within = keep & ~covered
        base = _empty_term(len(kinds), s)  # a fresh step's
        objective, term = _best(feature, within, base, step, lexicon[:2], s)
        if not np.isfinite(objective):
            break
        for _ in range(s.max_refinements):
            refine_step = (credited, n_predicted, n_firing, list_penalty + _penalty(term, s))
            within = ~covered & _mask(term, kinds, keep, local_signature, table)
            refined, longer = _best(feature, within, term, refine_step, lexicon[:2], s)
            if not refined > objective:
                break
            objective, term = refined, longer
        if n_terms and not objective > current:
            break
        added = ~covered & _mask(term, kinds, keep, local_signature, table)
        credited = credited + _shrunk((added & fires).sum(), s.shrink)
        covered |= added
        current = objective
        spent = spent + _penalty(term, s)
        keys, contexts, unless = term
        for kind in range(len(kinds)):
            texts = kinds[kind][0]
            for j in range(keys.shape[1]):
                if keys[kind, j] >= 0:
                    out_keys[t, kind, j] = texts[keys[kind, j]]
        out_contexts[t] = contexts
        out_unless[t] = unless
        n_terms += 1
    out_n_terms[0], out_objective[0] = n_terms, current
    out_counts[2], out_counts[3] = (covered & fires).sum(), covered.sum()


@numba.njit(cache=True)
def _search_batch(
    spans,
    kinds,
    signature,
    flags,
    fires,
    keep,
    promoted,
    promoted_spans,
    lexicon,
    n_texts,
    s,
):
    n_features, n_kinds = len(spans) - 1, len(kinds)
    keys = np.full((n_features, s.max_terms, n_kinds, s.max_keys), -1, np.int64)
    contexts = np.full((n_features, s.max_terms, 2 + s.max_refinements), -1, np.int64)
    unless = np.full((n_features, s.max_terms, 1 + s.max_refinements), -1, np.int64)
    n_terms = np.zeros(n_features, np.int64)
    objective = np.zeros(n_features)
    counts = np.zeros((n_features, 4), np.int64)
    scratch = (
        np.zeros(n_texts, np.int32),
        # text id -> local key id: int16 keeps it in the CPU's L2 cache, which every lookup
        # of a token's values reads at random
        np.full(n_texts, -1, np.int16),
        np.full(len(flags), -1, np.int64),
    )
    listed = _listed(flags)
    for f in range(n_features):
        lo, hi = spans[f], spans[f + 1]
        kind_values = [kinds[kind][lo:hi] for kind in range(n_kinds)]
        _fit_feature(
            kind_values,
            signature[lo:hi],
            flags,
            listed,
            fires[lo:hi],
            keep[lo:hi],
            promoted[promoted_spans[f] : promoted_spans[f + 1]],
            lexicon,
            scratch,
            s,
            (
                keys[f],
                contexts[f],
                unless[f],
                n_terms[f : f + 1],
                objective[f : f + 1],
                counts[f],
            ),
        )
    return keys, contexts, unless, n_terms, objective, counts
