"""The in-memory vocabulary that renders token text on every page."""

import gc

from app.vocab import Vocabulary


def test_texts_of_maps_ids_and_names_unknown_ones():
    vocab = Vocabulary.from_texts({0: "<|bos|>", 1: " Paris", 2: " Lyon"})
    assert vocab.texts_of([1, 2, 1]) == [" Paris", " Lyon", " Paris"]
    assert vocab.texts_of([1, 99]) == [" Paris", "<99>"]  # an id the store does not hold


def test_find_matches_with_and_without_the_leading_space():
    vocab = Vocabulary.from_texts({1: " Paris", 2: "Paris", 3: " Lyon"})
    assert vocab.find("Paris") == [1, 2]
    assert vocab.find(" Lyon") == [3]
    assert vocab.find("Berlin") == []


def test_a_loaded_vocabulary_adds_nothing_for_the_cycle_collector_to_walk():
    vocab = Vocabulary.from_texts({i: f"w{i % 500}" for i in range(5000)})
    gc.collect()  # untracks the tuples of ids, as the first pass after loading does
    assert not any(gc.is_tracked(ids) for ids in vocab.ids_by_text.values())
    assert vocab.find("w7") == list(range(7, 5000, 500))
