"""Automatic labels: planted features get the right rule and a high held-out F1, random ones a low F1."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter, OrderedDict
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sae_core.cli import main
from sae_core.errors import NotFoundError
from sae_core.labels import evidence, induction, rule_search
from sae_core.labels import run as labels
from sae_core.labels.corpus_words import FeatureWords, corpus_term, corpus_terms, with_corpus_words
from sae_core.labels.evidence import (
    ContextLibrary,
    Example,
    TokenSet,
    Vocab,
    build_evidence,
    gather_evidence,
    lex_windows,
    load_examples,
    signatures,
    split_examples,
    tuning_evidence,
)
from sae_core.labels.explainer import ExplainerConfig, ExplainerError, parse_explanation
from sae_core.labels.history import (
    LabelError,
    get_sae,
    label_history,
    score_stored_label,
    set_human_label,
)
from sae_core.labels.induction import fit_rule, fit_rules
from sae_core.labels.lexical import CONTEXT_NAMES, context_masks
from sae_core.labels.report import EVIDENCE_EDGES, evidence_bands
from sae_core.labels.rules import WINDOW, LabelRule, Term, parse_label
from sae_core.labels.run import LabelOptions, auto_label_text, label_sae
from sae_core.labels.scoring import score_rule
from sae_core.labels.search import search_labels
from sae_core.labels.token_batch import TokenBatch
from sae_core.store.db import (
    FeatureRow,
    LabelRow,
    SaeRow,
    create_engine_for,
    pack_acts,
    unpack_levels,
)
from tests.label_fixtures import (
    AFTER_DEF,
    BEFORE_CLOSE,
    BOLD,
    D_SAE,
    DEAD,
    IN_COMMENT,
    IN_DOCSTRING,
    PARIS,
    RANDOM,
    write_planted_store,
)

NO_EMBED = LabelOptions(embed=False, progress=False)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A planted store labelled once; tests that write use their own store."""
    store = write_planted_store(f"sqlite:///{tmp_path_factory.mktemp('labels')}/store.db")
    engine = create_engine_for(store.url)
    summary = label_sae(engine, store.sae_name, NO_EMBED)
    yield store, engine, summary
    engine.dispose()


@pytest.fixture
def fresh(tmp_path):
    store = write_planted_store(f"sqlite:///{tmp_path}/store.db")
    engine = create_engine_for(store.url)
    yield store, engine
    engine.dispose()


def _feature(engine, name: str, idx: int) -> FeatureRow:
    with Session(engine) as session:
        row = session.get(FeatureRow, (get_sae(session, name).id, idx))
        session.expunge(row)
        return row


def _auto_rule(engine, name: str, idx: int) -> LabelRule:
    with Session(engine) as session:
        history = label_history(session, sae=get_sae(session, name), idx=idx)
        return LabelRule.from_json(next(h for h in history if h.source == "auto").rule["rule"])


# ---------------------------------------------------------------------------------------------
# The rule language


def test_context_masks_follow_python_lexing():
    texts = [
        "def",
        " f",
        "():",
        "\n",
        "   ",
        " #",
        " hi",
        "\n",
        " s",
        " =",
        " '",
        "abc",
        "'",
        "\n",
        ' """',
        "Doc",
        '"""',
    ]
    masks = dict(zip(CONTEXT_NAMES, context_masks(texts), strict=True))
    assert masks["comment"].tolist() == [t in (" #", " hi") for t in texts]
    assert [t for t, m in zip(texts, masks["string"], strict=True) if m] == [" '", "abc", "'"]
    assert [t for t, m in zip(texts, masks["docstring"], strict=True) if m] == [
        ' """',
        "Doc",
        '"""',
    ]
    assert [t for t, m in zip(texts, masks["line_start"], strict=True) if m] == [" #", " s", ' """']
    assert masks["code"].all() and not masks["prose"].any()
    prose = context_masks([" The", " city", " of", " Paris", " is", " old", "."])
    assert prose[CONTEXT_NAMES.index("prose")].all()


def visible_tokens_in(texts: list[str]):
    """``where(context)``: the visible tokens of ``texts`` that ``context_masks`` puts in that
    context, stripped."""
    masks = dict(zip(CONTEXT_NAMES, context_masks(texts), strict=True))
    return lambda name: [
        t.strip() for t, m in zip(texts, masks[name], strict=True) if m and t.strip()
    ]


def test_context_masks_say_what_a_line_does_and_what_is_around_a_token():
    # tokens split at "|", as the model's tokenizer might cut this code
    texts = (
        '    | return| x|\n|def| f|(|a|):|\n|    | """|Add| one|.|\n|\n|    | >>>| f|(|1|)|\n|'
        '    | """|\n|    | total| +=| a|[|0|]|\n|    | if| total| ==| 1|:|\n|        | return|'
        " sub|total|\n"
    ).split("|")
    where = visible_tokens_in(texts)

    assert where("def_line") == ["def", "f", "(", "a", "):"]
    assert where("condition") == ["if", "total", "==", "1", ":"]
    assert where("assign_target") == ["total"]  # `==` compares, `+=` assigns
    assert where("line_end") == ["x", "):", ".", ")", '"""', "]", ":", "total"]
    assert where("inside_word") == ["total"]
    assert where("after_open") == ["a", "1", "0"]
    assert where("repeated") == ["f", "(", '"""', "a", "total", "1", "return", "total"]
    assert where("repeated_pair") == ["(", '"""', "return"]


def test_context_masks_name_a_statement_by_its_first_keyword():
    texts = (
        "x| =| 1|\n|for| i| in| y|:|\n|    | with| f|:|\n|        | yield| i|\n|try|:|\n|"
        "    | assert| i|\n|except| E|:|\n|    | raise| E|(|i|)|\n|    | return| '|for|'"
    ).split("|")
    where = visible_tokens_in(texts)

    assert where("loop_line") == ["for", "i", "in", "y", ":", "with", "f", ":"]
    assert where("return_line") == ["yield", "i", "return"]  # a string is not code
    assert where("raise_line") == ["assert", "i", "raise", "E", "(", "i", ")"]
    assert where("except_line") == ["try", ":", "except", "E", ":"]


def test_a_window_cut_inside_a_docstring_starts_in_it():
    texts = ' the| value| of| x|.|\n|    | """|\n|    | return| x'.split("|")
    docstring = context_masks(texts)[CONTEXT_NAMES.index("docstring")]
    assert docstring.tolist() == [True] * 8 + [False] * 4
    # an opening docstring after code is not taken for a closing one
    texts = [" y", " =", " f", "(", "x", ")", "\n", "    ", ' """', "Return", " x", ".", '"""']
    docstring = context_masks(texts)[CONTEXT_NAMES.index("docstring")]
    assert docstring.tolist() == [False] * 8 + [True] * 5


def test_rule_describes_itself_as_a_phrase_and_round_trips():
    rule = LabelRule.of(Term((" Paris", " Lyon"), contexts=("prose",)))
    assert rule.describe() == "`Paris`/`Lyon` in English prose"
    assert LabelRule.of(Term(previous=("def",))).describe() == "any token right after `def`"
    assert LabelRule.of(Term(contexts=("comment",))).describe() == "any token in a comment"
    assert LabelRule.of(Term(("\n",))).describe() == '"\\n"'
    assert (
        LabelRule.of(Term((" if", " elif", " while"), contexts=("line_start",))).describe()
        == "`if`/`elif`/`while` at the start of a line"
    )
    assert (
        LabelRule.of(Term(window=(" Returns",), contexts=("docstring",))).describe()
        == "any token in a docstring a few tokens after `Returns`"
    )
    assert LabelRule.of(Term(contexts=("number", "string"))).describe() == "a number in a string"
    two = LabelRule.of(Term(following=(")",)), Term(("x",), unless=("comment",)))
    assert two.describe() == "any token before `)`; or `x` except in a comment"
    for each in (rule, two):
        assert LabelRule.from_json(json.loads(json.dumps(each.to_json()))) == each
    # rules stored by the first version (one term, one context) still read
    assert LabelRule.from_json({"tokens": ["a"], "previous": [], "context": "comment"}) == (
        LabelRule.of(Term(("a",), contexts=("comment",)))
    )
    with pytest.raises(ValueError, match="unknown context"):
        Term(contexts=("poetry",))


@pytest.mark.parametrize(
    "rule",
    [
        LabelRule.of(Term(("Paris", " Paris"), contexts=("prose",))),
        LabelRule.of(Term(previous=("def", " def"))),
        LabelRule.of(Term(contexts=("comment",))),
        LabelRule.of(Term(("\n", '"x\\'), ("a", " a"), contexts=("string",))),
        LabelRule.of(
            Term(contexts=("number", "call_args")),
            Term(
                following=(")", " )"), window=("Returns", " Returns"), unless=("comment", "heading")
            ),
        ),
        LabelRule.of(
            Term(contexts=("assign_target",), unless=("def_line", "quoted")),
            Term(("x", " x"), contexts=("line_end", "repeated", "after_open")),
        ),
    ],
)
def test_labels_in_the_rule_language_parse_back_to_their_rule(rule):
    assert parse_label(rule.describe(max_shown=100)) == rule


@pytest.mark.parametrize(
    "text",
    ["the French capital", "`Paris` in the sky", '"x" and more', "any token", "`a`; or nothing"],
)
def test_free_text_is_not_a_rule(text):
    assert parse_label(text) is None


def test_a_word_with_or_without_its_leading_space_is_one_key():
    """```x``` in a label stands for `x` and ` x`: the search counts them as one key, and a rule
    naming either picks both; whitespace tokens and other spellings stay apart."""
    vocab = Vocab.of_texts(["x", " x", "  x", " X", " ", "  ", "\n", " \n"])
    ids = vocab.text_id.tolist()
    assert ids[0] == ids[1] == ids[2] and len(set(ids[2:])) == 6
    assert vocab.lookup([" x"]).tolist() == vocab.lookup(["x"]).tolist()
    words = [" a", " b", " c", " x", " y"]
    rng = np.random.default_rng(4)
    windows = [[str(w) for w in rng.choice(words, 20)] + ["(", "x", ")"] for _ in range(30)]
    rule = _fit_planted(windows, lambda w, i: w[i].strip() == "x")
    assert rule.describe() == "`x`"
    assert len(rule.terms) == 1 and len(rule.terms[0].tokens) == 1


def test_split_holds_out_alternate_interval_samples_never_seen_in_training():
    blob, max_act, _ = pack_acts(np.ones(4, np.float32))
    examples = [Example("top", 0, r, c, max_act, blob) for r, c in enumerate([1, 2, 3])] + [
        Example("interval", b, r, c, max_act, blob)
        for b, r, c in [(0, 0, 10), (0, 1, 11), (1, 0, 3), (1, 1, 12)]
    ]
    train, heldout = split_examples(examples)
    assert [e.context_id for e in heldout] == [11, 12]
    assert {e.context_id for e in train} == {1, 2, 3, 10}
    # With a single interval sample the top examples alternate instead.
    train, heldout = split_examples(examples[:3] + examples[3:4])
    assert [e.context_id for e in heldout] == [2]


def _library_and_examples(labelled) -> tuple[ContextLibrary, dict[int, list[Example]]]:
    store, engine, _ = labelled
    with Session(engine) as session:
        sae = get_sae(session, store.sae_name)
        library = ContextLibrary.load(session, sae, Vocab.load(session, sae))
        return library, load_examples(session, sae.id, 0, D_SAE)


def test_tuning_split_never_reads_the_scored_contexts(labelled):
    """Settings are chosen on the training evidence split again: none of its windows, positive or
    negative, is one a label is scored on."""
    library, examples = _library_and_examples(labelled)
    for idx in (PARIS, IN_COMMENT, RANDOM):
        scored = build_evidence(library, idx, examples[idx], seed=0)
        tuning = tuning_evidence(library, idx, examples[idx], seed=0)
        held, tuned = scored.heldout_contexts, tuning.heldout_contexts
        tuning_windows = {e.context_id for e in tuning.train_examples}
        tuning_windows |= set(tuned.positives + tuned.negatives)
        assert tuning_windows.isdisjoint(held.positives + held.negatives)
        assert tuned.positives and set(tuned.positives) <= {e.context_id for e in examples[idx]}


def test_features_searched_together_get_the_rule_each_gets_alone(labelled):
    """A chunk's features are searched at once; each must get exactly the rule, training F1 and
    objective its search alone gives, whatever its neighbours in the chunk."""
    library, examples = _library_and_examples(labelled)
    vocab = library.vocab
    evidence = [build_evidence(library, i, examples.get(i, []), seed=0) for i in range(D_SAE)]
    train = [e.train for e in evidence if e is not None]
    # what comes next, tried even when seen once: some features have such tokens, some not
    promoted = [(")", " x", " Paris")[: i % 4] for i in range(len(train))]
    alone = [fit_rule(t, vocab, p) for t, p in zip(train, promoted, strict=True)]
    assert fit_rules(train, vocab, promoted) == alone
    assert fit_rules(train[::-1], vocab, promoted[::-1]) == alone[::-1]
    assert len({fitted.rule for fitted in alone}) == len(alone)  # the planted rules all differ


def test_a_window_key_set_counts_each_token_once_at_its_best_ranked_key():
    """A token with several keys in a slot (a window's, a key may repeat) joins a key set at the
    first prefix holding one of them: the compiled key search against a plain one, on random
    tokens, slots and keys."""
    rng = np.random.default_rng(0)
    settings = induction._settings()
    n_tokens, k = 300, 11
    columns = np.array([3, 5, -1, -1])  # two of the feature's columns, two none
    n_slots = len(columns) + 1
    slots = np.where(rng.random((n_tokens, len(columns))) < 0.4, 1 << np.arange(len(columns)), 0)
    slots = slots.sum(axis=1) | 1 << len(columns)  # every token is in "anywhere"
    held = [rng.integers(0, k, rng.integers(0, WINDOW + 1)) for _ in range(n_tokens)]
    starts = np.cumsum([0] + [len(h) for h in held])
    key = np.concatenate(held)
    within, fires = rng.random(n_tokens) < 0.8, rng.random(n_tokens) < 0.3
    n_firing = int(fires.sum())
    step = (0.0, 0, n_firing, 0.0)  # a first term's first step (its base is empty)

    def objective(slot: int, keys: list[int]) -> float:
        joins = [i for i in range(n_tokens) if within[i] and slots[i] >> slot & 1]
        joins = [i for i in joins if set(held[i]) & set(keys)]
        gained, picked = int(fires[joins].sum()), len(joins)
        if not gained or (slot < len(columns) and columns[slot] < 0):
            return -np.inf
        shrunk = max(gained - settings.shrink * np.sqrt(gained), 0.0)
        parts = 1 + (slot < len(columns))
        penalty = settings.key_penalty * (len(keys) - 1) + settings.part_penalty * (parts - 1)
        return 2 * shrunk / (picked + n_firing) - penalty

    best = (-np.inf, 0, [])
    for slot in range(n_slots):
        counts = np.zeros((k, 2))
        for i in range(n_tokens):
            if within[i] and slots[i] >> slot & 1:
                for j in held[i]:
                    counts[j, int(fires[i])] += 1
        precision = counts[:, 1] / (counts.sum(axis=1) + 1)
        order = sorted(range(k), key=lambda j: -precision[j])[: settings.max_keys]
        for n in range(1, len(order) + 1):
            value = objective(slot, order[:n])
            if value > best[0]:
                best = (value, slot, order[:n])
    found = rule_search._key_proposal(
        (np.arange(k), starts, key, True),
        np.flatnonzero(within),
        slots,
        columns,
        fires,
        rule_search._empty_term(len(induction.KINDS), settings),
        step,
        np.zeros(len(CONTEXT_NAMES), dtype=bool),
        settings,
    )
    assert best[0] > 0 and len(best[2]) > 1  # a key set of several keys wins
    assert found[0] == pytest.approx(best[0], abs=1e-12)
    assert (found[1], found[2].tolist()) == best[1:]


def test_a_chunks_evidence_is_its_windows_tokens_firing_where_the_examples_say(labelled):
    """A chunk's evidence, gathered at once, is each feature's windows read straight from the
    library, firing exactly at its stored examples' positions, and what each feature alone gets."""
    library, examples = _library_and_examples(labelled)
    gathered = gather_evidence(library, examples, list(range(D_SAE)), seed=0)
    assert gathered[DEAD] is None and sum(e is not None for e in gathered) > 4
    for idx, found in enumerate(gathered):
        if found is None:
            continue
        alone = build_evidence(library, idx, examples.get(idx, []), seed=0)
        for name in ("train", "heldout"):
            for field, ours, its in zip(
                TokenSet._fields, getattr(found, name), getattr(alone, name), strict=True
            ):
                assert np.array_equal(ours, its), (idx, name, field)
        own = found.train_examples
        negatives = len(found.train.fires) // library.text.shape[1] - len(own)
        assert negatives >= 1
        fires = np.zeros((len(own), library.text.shape[1]), dtype=bool)
        for row, example in enumerate(own):
            fires[row, unpack_levels(example.acts_blob)[0]] = True
        rows = [library.row[e.context_id] for e in own]
        assert np.array_equal(found.train.fires[: fires.size], (fires & library.keep[rows]).ravel())
        assert not found.train.fires[fires.size :].any()
        assert np.array_equal(found.train.text_ids[: fires.size], library.text[rows].ravel())
        texts = library.texts(own[0].context_id)
        assert np.array_equal(found.train.contexts[: len(texts)], context_masks(texts).T)


def test_a_batch_renumbers_the_librarys_signatures_as_its_own_would_be(labelled):
    """Signatures are found once per library; a batch's, renumbered, are those ``signatures``
    finds on the batch's own context flags (the search's counts come out in the same order)."""
    library, examples = _library_and_examples(labelled)
    sets = [e.train for e in gather_evidence(library, examples, list(range(D_SAE)), seed=0) if e]
    batch = TokenBatch.of(sets[1::2])
    flags, signature = signatures(np.concatenate([s.contexts for s in sets[1::2]]))
    assert len(flags) < len(library.flags)
    assert np.array_equal(batch.flags, flags) and np.array_equal(batch.signature, signature)


def test_forked_workers_lex_the_windows_as_one_process_does(labelled, monkeypatch):
    """A library's windows may be lexed by forked workers, a few at a time: each token's contexts
    are those the lexer gives its window, in the library's order, however many lex them."""
    library, _ = _library_and_examples(labelled)
    windows = [library.token_ids[r, : library.lengths[r]] for r in range(len(library.ids))]
    seq = library.token_ids.shape[1]
    monkeypatch.setattr(evidence, "WINDOWS_PER_LEX", 7)  # several tasks for each of two workers
    monkeypatch.setattr(evidence, "_LEXED", OrderedDict())  # none lexed yet
    lexed = lex_windows(library.vocab, windows, seq, workers=2)
    monkeypatch.setattr(evidence, "_LEXED", OrderedDict())
    assert np.array_equal(lexed, lex_windows(library.vocab, windows, seq, workers=1))
    assert np.array_equal(lexed, library.flags[library.signature])
    for row in (0, len(windows) - 1):
        texts = library.texts(int(library.ids[row]))
        assert np.array_equal(lexed[row, : len(texts)], context_masks(texts).T)


def test_windows_lexed_once_are_not_lexed_again(labelled, monkeypatch):
    """The SAEs of a release store the same windows: a process lexes each once (the most recent
    ``LEXED_WINDOWS`` of them), and what it kept is what lexing gives."""
    library, _ = _library_and_examples(labelled)
    windows = [library.token_ids[r, : library.lengths[r]] for r in range(len(library.ids))]
    seq = library.token_ids.shape[1]
    lexed = []
    real = evidence.context_masks

    def counted(texts):
        lexed.append(tuple(texts))
        return real(texts)

    monkeypatch.setattr(evidence, "context_masks", counted)
    monkeypatch.setattr(evidence, "_LEXED", OrderedDict())
    first = lex_windows(library.vocab, windows, seq, workers=1)
    assert len(lexed) == len(set(lexed)) == len({t.tobytes() for t in windows})
    assert np.array_equal(lex_windows(library.vocab, windows[::-1], seq, workers=1), first[::-1])
    assert len(lexed) == len(set(lexed))  # none lexed twice
    monkeypatch.setattr(evidence, "LEXED_WINDOWS", 3)
    lex_windows(library.vocab, windows[:5], seq, workers=1)  # keeps the last 3 only
    assert len(evidence._LEXED) == 3
    lexed.clear()
    assert np.array_equal(lex_windows(library.vocab, windows[:5], seq, workers=1), first[:5])
    assert len(lexed) == 2


def test_fewer_fitting_negatives_leave_the_held_out_ones_as_they_were(labelled, monkeypatch):
    """Rules are fitted against a share of the negative windows; the held-out windows, which
    earlier versions' labels were scored on, do not depend on that share."""
    library, examples = _library_and_examples(labelled)
    fitted = build_evidence(library, RANDOM, examples[RANDOM], seed=0)
    monkeypatch.setattr(evidence, "TRAIN_NEGATIVE_SHARE", 1.0)
    every = build_evidence(library, RANDOM, examples[RANDOM], seed=0)
    assert fitted.heldout_contexts == every.heldout_contexts
    assert len(fitted.train.fires) < len(every.train.fires)


# ---------------------------------------------------------------------------------------------
# Labelling a store


def test_token_feature_gets_its_token_with_high_f1(labelled):
    store, engine, summary = labelled
    assert summary.n_labelled == 7  # every alive feature; the dead one has no examples
    feature = _feature(engine, store.sae_name, PARIS)
    assert feature.label == "`Paris`"
    assert feature.label_source == "auto"
    assert feature.label_f1 > 0.8 and feature.label_recall > 0.9


def test_context_and_previous_token_features_get_those_rules(labelled):
    store, engine, _ = labelled
    (after_def,) = _auto_rule(engine, store.sae_name, AFTER_DEF).terms
    # right after `def`; the search may also list the names seen there (the held-out score says
    # whether that costs anything)
    assert after_def.previous == ("def",) and not after_def.contexts and not after_def.window
    assert _auto_rule(engine, store.sae_name, IN_COMMENT) == LabelRule.of(
        Term(contexts=("comment",))
    )
    assert _feature(engine, store.sae_name, AFTER_DEF).label_f1 > 0.6
    assert _feature(engine, store.sae_name, IN_COMMENT).label_f1 > 0.7


def test_docstring_and_before_bracket_features_get_those_rules(labelled):
    store, engine, _ = labelled
    assert _auto_rule(engine, store.sae_name, IN_DOCSTRING) == LabelRule.of(
        Term(contexts=("docstring",))
    )
    assert _feature(engine, store.sae_name, IN_DOCSTRING).label == "any token in a docstring"
    assert _auto_rule(engine, store.sae_name, BEFORE_CLOSE) == LabelRule.of(Term(following=(")",)))
    assert _feature(engine, store.sae_name, BEFORE_CLOSE).label == "any token before `)`"
    assert _feature(engine, store.sae_name, IN_DOCSTRING).label_f1 > 0.7
    assert _feature(engine, store.sae_name, BEFORE_CLOSE).label_f1 > 0.8


def test_random_feature_scores_low(labelled):
    store, engine, _ = labelled
    feature = _feature(engine, store.sae_name, RANDOM)
    assert feature.label_f1 < 0.3
    assert "promotes" in feature.label  # a weak rule says what the feature promotes instead


def test_dead_feature_is_not_labelled(labelled):
    store, engine, _ = labelled
    assert _feature(engine, store.sae_name, DEAD).label is None


def test_stored_rule_reproduces_the_score(labelled):
    store, engine, _ = labelled
    with Session(engine) as session:
        sae = get_sae(session, store.sae_name)
        label = next(h for h in label_history(session, sae=sae, idx=PARIS) if h.source == "auto")
        score = score_stored_label(session, sae, label)
    assert (score.precision, score.recall, score.f1) == pytest.approx(
        (label.precision, label.recall, label.f1)
    )
    assert not set(label.rule["heldout"]["positives"]) & set(label.rule["heldout"]["negatives"])


def test_rerun_resumes_and_force_relabels(fresh):
    store, engine = fresh
    assert label_sae(engine, store.sae_name, NO_EMBED).n_labelled == 7
    assert label_sae(engine, store.sae_name, NO_EMBED).n_labelled == 0
    assert (
        label_sae(
            engine, store.sae_name, LabelOptions(embed=False, progress=False, force=True)
        ).n_labelled
        == 7
    )


def test_interrupted_run_keeps_finished_chunks_and_resumes(fresh, monkeypatch):
    store, engine = fresh
    monkeypatch.setattr(labels, "FEATURES_PER_CHUNK", 2)
    real_fit = labels.fit_rules
    calls = []

    def fit_then_interrupt(*args):
        calls.append(1)
        if len(calls) == 2:  # the second chunk
            raise KeyboardInterrupt
        return real_fit(*args)

    monkeypatch.setattr(labels, "fit_rules", fit_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        label_sae(engine, store.sae_name, LabelOptions(embed=False, progress=False, workers=1))
    monkeypatch.setattr(labels, "fit_rules", real_fit)
    assert [_feature(engine, store.sae_name, i).label is not None for i in range(4)] == [
        True,
        True,
        False,
        False,
    ]
    assert (
        label_sae(engine, store.sae_name, NO_EMBED).n_labelled == 5
    )  # the rest, not the first chunk again


def test_forked_workers_write_the_same_labels_as_one_process(fresh, tmp_path, monkeypatch):
    store, engine = fresh
    monkeypatch.setattr(labels, "FEATURES_PER_CHUNK", 2)  # three chunks, so both workers get some
    other = write_planted_store(f"sqlite:///{tmp_path}/other.db")
    other_engine = create_engine_for(other.url)
    label_sae(engine, store.sae_name, LabelOptions(embed=False, progress=False, workers=1))
    label_sae(other_engine, other.sae_name, LabelOptions(embed=False, progress=False, workers=2))

    def labels_of(e, name):
        with Session(e) as session:
            sae = get_sae(session, name)
            return [
                (h.feature_idx, h.label, h.f1, h.rule)
                for i in range(D_SAE)
                for h in label_history(session, sae=sae, idx=i)
            ]

    assert labels_of(engine, store.sae_name) == labels_of(other_engine, other.sae_name)
    assert len(labels_of(engine, store.sae_name)) == 7
    other_engine.dispose()


def test_unfinished_precompute_is_refused(fresh):
    store, engine = fresh
    with Session(engine) as session:
        get_sae(session, store.sae_name).status = "running"
        session.commit()
    with pytest.raises(LabelError, match="has not finished"):
        label_sae(engine, store.sae_name, NO_EMBED)


def test_human_label_stays_current_and_history_keeps_all(fresh):
    store, engine = fresh
    with Session(engine) as session:
        set_human_label(
            session, sae=get_sae(session, store.sae_name), idx=BOLD, label="bold tag", author="ada"
        )
        session.commit()
    label_sae(engine, store.sae_name, NO_EMBED)
    feature = _feature(engine, store.sae_name, BOLD)
    assert (feature.label, feature.label_source, feature.label_f1) == (
        "bold tag",
        "human:ada",
        None,
    )
    with Session(engine) as session:
        history = label_history(session, sae=get_sae(session, store.sae_name), idx=BOLD)
    assert [(h.source, h.label) for h in history] == [("auto", "`<b>`"), ("human:ada", "bold tag")]


def test_human_label_in_the_rule_language_is_scored_on_the_same_held_out_tokens(fresh):
    store, engine = fresh
    label_sae(engine, store.sae_name, NO_EMBED)
    with Session(engine) as session:
        sae = get_sae(session, store.sae_name)
        auto = session.get(FeatureRow, (sae.id, PARIS)).label_f1
        broader = set_human_label(session, sae=sae, idx=PARIS, label="`Paris`/`city`", author="ada")
        free = set_human_label(session, sae=sae, idx=BOLD, label="bold tags", author="ada")
        session.commit()
        assert (
            broader.rule["heldout"] == label_history(session, sae=sae, idx=PARIS)[1].rule["heldout"]
        )
        assert score_stored_label(session, sae, broader).f1 == pytest.approx(broader.f1)
        assert broader.recall == 1.0 and broader.f1 < auto  # " city" adds false positives
        assert free.f1 is None and free.rule is None


def test_human_label_is_validated(fresh):
    store, engine = fresh
    with Session(engine) as session:
        sae = get_sae(session, store.sae_name)
        with pytest.raises(LabelError, match="author"):
            set_human_label(session, sae=sae, idx=PARIS, label="x", author=" ")
        with pytest.raises(NotFoundError, match="no feature 99"):
            set_human_label(session, sae=sae, idx=99, label="x", author="ada")


# ---------------------------------------------------------------------------------------------
# Explainer


class _FakeChat(BaseHTTPRequestHandler):
    reply = ""
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        answer = json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": type(self).reply}}]}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = HTTPServer(("127.0.0.1", 0), _FakeChat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeChat.requests = []
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_explainer_label_is_scored_and_kept_beside_the_automatic_one(fresh, chat_server):
    store, engine = fresh
    _FakeChat.reply = (
        'Sure: {"explanation": "the word Paris", "tokens": ["Paris"], "context": null}'
    )
    config = ExplainerConfig(chat_server, "fake-7b", api_key="sk-test")
    summary = label_sae(
        engine, store.sae_name, LabelOptions(embed=False, progress=False, explainer=config)
    )
    assert summary.n_explained == 7
    request = _FakeChat.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert "[[" in request["body"]["messages"][1]["content"]  # firing tokens are marked
    with Session(engine) as session:
        history = label_history(session, sae=get_sae(session, store.sae_name), idx=PARIS)
    explained = next(h for h in history if h.source == "llm:fake-7b")
    assert explained.label == "the word Paris"
    assert explained.rule["rule"]["terms"][0]["tokens"] == [" Paris"]  # the space the model dropped
    assert explained.f1 > 0.8
    assert (
        _feature(engine, store.sae_name, RANDOM).label_source == "auto"
    )  # " Paris" scores ~0 there


def test_unreachable_explainer_is_one_clear_error(fresh):
    store, engine = fresh
    config = ExplainerConfig("http://127.0.0.1:9/v1", "m", timeout_s=2)
    with pytest.raises(ExplainerError, match="cannot be reached"):
        label_sae(
            engine, store.sae_name, LabelOptions(embed=False, progress=False, explainer=config)
        )


def test_explainer_is_off_without_url_and_needs_a_model(monkeypatch):
    monkeypatch.delenv("SAESCOPE_EXPLAINER_URL", raising=False)
    assert ExplainerConfig.from_env() is None
    with pytest.raises(ExplainerError, match="no model"):
        ExplainerConfig.from_env(url="http://x/v1")
    monkeypatch.setenv("MY_KEY", "secret")
    assert (
        ExplainerConfig.from_env(url="http://x/v1/", model="m", key_env="MY_KEY").api_key
        == "secret"
    )


def test_unusable_replies_are_skipped():
    assert parse_explanation("no json here") is None
    assert parse_explanation('{"tokens": ["a"]}') is None
    parsed = parse_explanation(
        '{"explanation": "commas", "tokens": [",", 3], "context": "nowhere"}'
    )
    assert parsed.tokens == [","] and parsed.context is None


# ---------------------------------------------------------------------------------------------
# Command line and Postgres


def test_cli_labels_and_reports(fresh, capsys):
    store, engine = fresh
    assert main(["label", "--db", store.url, "--sae", store.sae_name, "--report"]) == 0
    assert "none has a scored label yet" in capsys.readouterr().out
    assert main(["label", "--db", store.url, "--sae", store.sae_name, "--no-embed"]) == 0
    assert "labelled 7 features" in capsys.readouterr().out
    assert main(["label", "--db", store.url, "--sae", store.sae_name, "--report"]) == 0
    report = capsys.readouterr().out
    with Session(engine) as session:
        f1 = sorted(session.scalars(sa.select(FeatureRow.label_f1).where(FeatureRow.count > 0)))
    assert f"7 of 7 alive features have a scored label; held-out F1 median {f1[3]:.2f}" in report
    assert f"F1 = 0: {sum(f == 0 for f in f1) / 7:.0%}" in report
    assert len(re.findall(r"^  \d\.\d-\d\.\d ", report, flags=re.M)) == 10  # the histogram
    bands = re.findall(r"^ +(\d+)(?:-\d+|\+) firing tokens: +(\d+|none)", report, flags=re.M)
    assert [int(lo) for lo, _ in bands] == list(EVIDENCE_EDGES)
    assert sum(int(n) for _, n in bands if n != "none") == 7
    assert main(["label", "--db", store.url, "--sae", "nope", "--no-embed"]) == 2
    assert "no SAE named 'nope'" in capsys.readouterr().err


def test_cli_labels_several_saes_in_one_call_and_checks_every_name_first(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/store.db"
    for name in ("first", "second"):  # a release's SAEs: the same windows
        write_planted_store(url, sae_name=name)
    both = ["label", "--db", url, "--sae", "first", "--sae", "second", "--no-embed"]
    assert main([*both, "--sae", "nope"]) == 2
    assert "no SAE named 'nope'" in capsys.readouterr().err
    engine = create_engine_for(url)
    with Session(engine) as session:
        assert not session.scalar(sa.select(sa.func.count()).select_from(LabelRow))
    assert main(both) == 0
    out = capsys.readouterr().out
    assert "first: labelled 7 features" in out and "second: labelled 7 features" in out
    assert out.count("7 of 7 alive features have a scored label") == 2
    with Session(engine) as session:
        by_sae = dict(
            session.execute(
                sa.select(SaeRow.name, sa.func.count(LabelRow.id))
                .join(LabelRow, LabelRow.sae_id == SaeRow.id)
                .group_by(SaeRow.name)
            ).all()
        )
    engine.dispose()
    assert by_sae == {"first": 7, "second": 7}


def test_evidence_bands_count_each_current_label_by_its_heldout_firing_tokens(fresh):
    store, engine = fresh
    label_sae(engine, store.sae_name, NO_EMBED)
    with Session(engine) as session:
        sae = get_sae(session, store.sae_name)
        features = session.scalars(
            sa.select(FeatureRow).where(FeatureRow.sae_id == sae.id, FeatureRow.count > 0)
        ).all()
        # a researcher's label replaces one feature's: its own score is the one counted
        human = set_human_label(session, sae=sae, idx=PARIS, label="`Paris`/`the`", author="ada")
        session.commit()
        assert human.f1 is not None
        firing = {}  # feature -> held-out firing tokens, rescored from the store
        for feature in features:
            rows = label_history(session, sae=sae, idx=feature.idx)
            current = human if feature.idx == PARIS else rows[0]  # newest first
            if current.f1 is not None:
                firing[feature.idx] = (
                    current.f1,
                    score_stored_label(session, sae, current).n_firing,
                )
        bands = evidence_bands(session, sae)
    assert [b.lo for b in bands] == list(EVIDENCE_EDGES) and bands[-1].hi is None
    for band in bands:
        inside = [
            f1 for f1, n in firing.values() if n >= band.lo and (band.hi is None or n < band.hi)
        ]
        assert band.n == len(inside)
        if inside:
            assert band.median_f1 == pytest.approx(float(np.median(inside)))
            assert band.share_zero == pytest.approx(np.mean([f == 0 for f in inside]))


@pytest.mark.postgres
def test_labels_and_text_search_on_postgres(pg_schema):
    store = write_planted_store(pg_schema)
    engine = create_engine_for(pg_schema)
    label_sae(engine, store.sae_name, NO_EMBED)
    assert _feature(engine, store.sae_name, PARIS).label == "`Paris`"
    with Session(engine) as session:
        sae = get_sae(session, store.sae_name)
        result = search_labels(session, sae_id=sae.id, query="paris", mode="text")
        assert session.scalar(sa.select(sa.func.count()).select_from(LabelRow)) == 7
    assert PARIS in [h.idx for h in result.hits]
    assert all("Paris" in h.label for h in result.hits)  # and only labels that say Paris
    engine.dispose()


# ---------------------------------------------------------------------------------------------
# The rule search on hand-made windows: one planted feature per rule family


def _fit_planted(windows: list[list[str]], fires) -> LabelRule:
    """The rule fitted to windows of token texts where ``fires(texts, i)`` says the feature fires
    on token i."""
    texts = sorted({t for w in windows for t in w})
    vocab = Vocab.of_texts(texts)
    library = ContextLibrary(
        vocab, {c: np.array([vocab.index[t] for t in w]) for c, w in enumerate(windows)}
    )
    firing = np.zeros((len(windows), max(map(len, windows))), dtype=bool)
    for c, w in enumerate(windows):
        firing[c, : len(w)] = [fires(w, i) for i in range(len(w))]
    return fit_rule(library.tokens(np.arange(len(windows)), firing), vocab).rule


def _code_windows(rng: np.random.Generator, n: int = 40) -> list[list[str]]:
    names = [" a", " b", " total", " count", " value"]
    out = []
    for _ in range(n):
        window: list[str] = []
        while len(window) < 40:
            number = str(rng.integers(0, 10_000))
            call = [" f", "(", str(rng.choice(names)), ",", " " + number, ")"]
            window += [
                "\n",
                str(rng.choice(names)),
                " =",
                " " + str(rng.integers(0, 10_000)),
                " +",
            ] + call
        out.append(window)
    return out


def test_search_finds_a_token_class():
    windows = _code_windows(np.random.default_rng(0))
    rule = _fit_planted(windows, lambda w, i: w[i].strip().isdigit())
    assert rule == LabelRule.of(Term(contexts=("number",)))


def test_search_finds_a_context_with_an_exception():
    windows = _code_windows(np.random.default_rng(1))
    masks = {id(w): dict(zip(CONTEXT_NAMES, context_masks(w), strict=True)) for w in windows}
    rule = _fit_planted(
        windows,
        lambda w, i: masks[id(w)]["call_args"][i] and not w[i].strip().isdigit(),
    )
    assert rule == LabelRule.of(Term(contexts=("call_args",), unless=("number",)))


def test_search_finds_a_window_before_the_token():
    rng = np.random.default_rng(2)
    words = [" the", " list", " of", " items", " in", " order", " and", " a", " value"]
    windows = []
    for _ in range(40):
        window = [str(w) for w in rng.choice(words, 30)]
        window[rng.integers(0, 20)] = " Returns"
        windows.append(window)

    def after_returns(w: list[str], i: int) -> bool:
        return w[i] != " Returns" and " Returns" in w[max(0, i - 3) : i]

    rule = _fit_planted(windows, after_returns)
    assert rule.terms[0].window == (" Returns",)


def _statement_windows(rng: np.random.Generator, n: int = 40) -> list[list[str]]:
    """Windows of short Python statements, each line indented at random and ended by one of
    several line-break tokens, so no single neighbouring token marks a line's start or end."""
    names = [" a", " b", " total", " count", " value", " item", " key", " size"]
    breaks = ["\n", "\n\n", "\n    ", "\n        "]
    out = []
    for _ in range(n):
        window: list[str] = []
        while len(window) < 48:
            name, other = (str(w) for w in rng.choice(names, 2, replace=False))
            line = [
                [name, " =", other, " +", " 1"],
                [name, " +=", " f", "(", other, ")"],
                [" f", "(", name, ",", other, ")"],
                [" return", name, " *", other],
            ][rng.integers(0, 4)]
            window += line + [str(rng.choice(breaks))]
        out.append(window)
    return out


def _planted_by_context(windows: list[list[str]], name: str) -> LabelRule:
    """The rule fitted to a feature that fires exactly where context ``name`` holds."""
    masks = {id(w): context_masks(w)[CONTEXT_NAMES.index(name)] for w in windows}
    return _fit_planted(windows, lambda w, i: bool(masks[id(w)][i]))


@pytest.mark.parametrize("name", ["assign_target", "return_line", "line_end", "repeated"])
def test_search_finds_a_line_or_neighbour_context(name):
    """A feature that fires on assignment targets, on return statements, on the last token of
    each line, or on tokens already seen in the window: one context says each, where token lists
    cannot."""
    windows = _statement_windows(np.random.default_rng(3))
    assert _planted_by_context(windows, name) == LabelRule.of(Term(contexts=(name,)))


def test_dense_and_unclear_features_say_so_before_their_rule():
    rule = LabelRule.of(Term(contexts=("code",)))
    assert (
        auto_label_text(rule, 0.6, 0.12, [" x"])
        == "dense: fires on 12% of tokens; any token in Python code"
    )
    assert auto_label_text(rule, 0.1, 0.004, [" x", "y", " z", " w"]) == (
        "unclear: fires on 0.4% of tokens; any token in Python code; promotes `x`/`y`/`z`"
    )
    assert auto_label_text(rule, 0.6, 0.004, [" x"]) == "any token in Python code"
    assert auto_label_text(rule, 0.1, 0.00031, []).startswith("unclear: fires on 0.031% of tokens;")


def stored(
    firings: Counter, full: bool = False, occurrences: Counter | None = None
) -> FeatureWords:
    """A feature's stored words: ``firings`` by word, most first, each word occurring as often as
    ``occurrences`` says (default: as often as it fires)."""
    words, counts = zip(*firings.most_common(), strict=True)
    occurs = [(occurrences or firings)[w] for w in words]
    return FeatureWords(list(words), list(counts), occurs, full)


def test_corpus_words_leave_out_what_the_held_out_windows_showed():
    """The stored counts cover every window; the feature's firings in its held-out windows are
    taken out, so a word counts only on what the label was allowed to see."""
    texts = [" a", " b", " c", " d"]
    vocab = Vocab.of_texts(texts)
    library = ContextLibrary(vocab, {0: np.array([0, 1, 1, 2, 3])})
    heldout = library.tokens(np.array([0]), np.array([[False, True, True, False, False]]))
    index = Counter({vocab.index[" a"]: 2, vocab.index[" b"]: 3, vocab.index[" c"]: 1})
    index[vocab.index[" d"]] = 4
    # ` b` fired 3 times, 2 of them held out: one firing left, an anecdote
    assert corpus_term(stored(index), heldout, vocab) == Term((" d", " a"))
    assert corpus_term(stored(Counter({vocab.index[" b"]: 2})), heldout, vocab) is None
    assert corpus_term(None, heldout, vocab) is None


def test_corpus_words_use_no_word_the_held_out_windows_put_in_a_full_list():
    """When the list is as long as precompute keeps, a word counts only if it would stay in it
    without its held-out firings: more left than the last word's (every word left out had at
    most as many)."""
    vocab = Vocab.of_texts([" a", " b", " c"])
    library = ContextLibrary(vocab, {0: np.array([1, 1, 0])})
    heldout = library.tokens(np.array([0]), np.array([[True, True, False]]))  # ` b` twice
    a, b, c = (vocab.index[w] for w in (" a", " b", " c"))
    firings = Counter({a: 9, b: 5, c: 4})
    # ` b`: 5 - 2 = 3 left, fewer than the last word's 4; ` c` owes the held-out windows nothing
    assert corpus_term(stored(firings, full=True), heldout, vocab) == Term((" a", " c"))
    assert corpus_term(stored(firings), heldout, vocab) == Term((" a", " c", " b"))


def test_corpus_words_keep_a_word_the_feature_fires_on_often_enough():
    """A word joins when the feature fires on at least a quarter of its occurrences outside the
    held-out windows, which the word's occurrences there are taken out of; the words fired on
    most often for their occurrences come first."""
    vocab = Vocab.of_texts([" a", " b", " the"])
    library = ContextLibrary(vocab, {0: np.array([2, 2, 2, 0])})
    heldout = library.tokens(np.array([0]), np.array([[False, False, False, False]]))
    a, b, the = (vocab.index[w] for w in (" a", " b", " the"))
    firings = Counter({the: 40, a: 3, b: 2})
    occurrences = Counter({the: 163, a: 12, b: 9})  # ` the`: 40 of 160 outside; ` a`: 3 of 11
    assert corpus_term(stored(firings, occurrences=occurrences), heldout, vocab) == Term(
        (" a", " the")
    )


def test_corpus_words_of_a_chunk_are_each_features_own():
    """``corpus_terms`` reads a chunk of features at once; each gets what it gets alone, though
    they list the same words and their held-out windows differ."""
    vocab = Vocab.of_texts([" a", " b", " c"])
    library = ContextLibrary(vocab, {0: np.array([0, 0, 1, 2]), 1: np.array([1, 1, 2, 2])})
    a, b, c = (vocab.index[w] for w in (" a", " b", " c"))
    firings = Counter({a: 4, b: 3, c: 2})
    heldouts = [
        library.tokens(np.array([0]), np.array([[True, True, False, False]])),  # ` a` twice
        library.tokens(np.array([1]), np.array([[True, True, False, False]])),  # ` b` twice
        library.tokens(np.array([1]), np.array([[False, False, False, False]])),
    ]
    words = [stored(firings), None, stored(firings, full=True)]
    alone = [corpus_term(w, h, vocab) for w, h in zip(words, heldouts, strict=True)]
    # ` a`: 4 - 2 held-out firings, on 2 of its 2 other occurrences: as precise as ` b`, fewer
    assert alone == [Term((" b", " a", " c")), None, Term((" a", " b", " c"))]
    assert corpus_terms(words, heldouts, vocab) == alone
    assert corpus_terms([], [], vocab) == []


def test_corpus_words_add_what_the_rule_does_not_explain_or_replace_any_token():
    """Words the rule already picks where the feature fires in training add nothing; the others
    join as a term of their own."""
    vocab = Vocab.of_texts([" a", " b", " c", " d"])
    library = ContextLibrary(vocab, {0: np.array([0, 1, 2, 0])})
    train = library.tokens(np.array([0]), np.array([[True, True, False, True]]))
    words = Term((" d", " a", " b"))
    found = LabelRule.of(Term((" a",)))
    assert with_corpus_words(found, words, train, vocab) == LabelRule(
        found.terms + (Term((" d", " b")),)
    )
    assert with_corpus_words(LabelRule.of(Term()), words, train, vocab) == LabelRule.of(words)
    assert with_corpus_words(found, None, train, vocab) == found
    both = LabelRule.of(Term((" a", " b")))
    assert with_corpus_words(both, Term((" b", " a")), train, vocab) == both


def test_corpus_words_reach_a_word_of_the_family_seen_only_held_out():
    """A feature fires on `save`, `saving` and `saved`; its training windows show only the first
    two, its held-out ones only `saved`, which the token index saw it fire on elsewhere too. The
    fitted rule lists what it saw and explains nothing held out; with the corpus words it does."""
    rng = np.random.default_rng(4)
    filler = [" the", " list", " of", " items", " in", " order", " and", " a", " value", " to"]
    family = [" save", " saving", " saved"]
    windows = []
    for words in (family[:2],) * 40 + (family[2:],) * 40:  # training windows, then held out
        window = [str(w) for w in rng.choice(filler, 32)]
        for at in rng.choice(32, 3, replace=False):
            window[at] = str(rng.choice(words))
        windows.append(window)
    vocab = Vocab.of_texts(filler + family)
    library = ContextLibrary(
        vocab, {c: np.array([vocab.index[t] for t in w]) for c, w in enumerate(windows)}
    )
    fires = np.isin(library.token_ids, [vocab.index[w] for w in family])
    train, heldout = (library.tokens(rows, fires[rows]) for rows in np.split(np.arange(80), 2))
    fitted = fit_rule(train, vocab).rule
    index = Counter(heldout.text_ids[heldout.fires].tolist())  # every held-out firing...
    index[vocab.index[" saved"]] += 5  # ...and five more elsewhere in the corpus
    index.update(train.text_ids[train.fires].tolist())
    rule = with_corpus_words(fitted, corpus_term(stored(index), heldout, vocab), train, vocab)
    assert score_rule(fitted, heldout, vocab).f1 == 0
    assert rule.terms[-1] == Term((" saved",)) and score_rule(rule, heldout, vocab).f1 > 0.95
