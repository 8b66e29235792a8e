"""Feature search on SQLite (FTS5) and Postgres (tsvector): label text, token, filters, sorting."""

from __future__ import annotations

import pytest

from sae_core.store.label_search import fts5_query, query_words, tsquery


@pytest.fixture(scope="module")
def everything(client, store) -> list[dict]:
    """Every feature summary, read without filters, to check each search against."""
    body = client.get(f"/api/v1/saes/{store.sae}/features", params={"limit": 500}).json()
    assert body["count"] == len(body["data"]) == store.spec.n_features
    return body["data"]


def search(client, store, **params) -> dict:
    response = client.get(f"/api/v1/saes/{store.sae}/features", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def indices(body: dict) -> list[int]:
    return [f["index"] for f in body["data"]]


def test_label_words_match_whole_words_and_the_last_as_a_prefix(client, store, everything):
    expected = sorted(
        f["index"] for f in everything if f["label"] and "capital" in f["label"].lower()
    )
    assert expected  # the store has such labels
    for q in ("capital", "CAPITAL", "capi", "cities capit"):
        body = search(client, store, q=q, sort="index")
        assert indices(body) == expected and body["count"] == len(expected), q
    assert search(client, store, q="apital")["count"] == 0  # words, not substrings


def test_label_search_ranks_by_relevance_by_default(client, store):
    body = search(client, store, q="paris")
    assert body["count"] > 1 and set(indices(body)) >= {store.planted.labelled_paris}


@pytest.mark.parametrize(
    "q",
    ['"', "*", "(", ")", '"unterminated', "AND", "NEAR(", "a:b", "'", "-", "^x", "\\", "%", "_"],
)
def test_query_syntax_characters_never_break_search(client, store, q):
    search(client, store, q=q)


def test_query_without_words_matches_label_substrings(client, store, everything):
    expected = sorted(f["index"] for f in everything if f["label"] and "(" in f["label"])
    assert (
        indices(search(client, store, q="(", sort="index"))
        == expected
        == [store.planted.script_feature]
    )
    assert search(client, store, q="%")["count"] == 0  # LIKE wildcards are escaped


def test_token_search_ranks_features_from_the_token_index(client, store):
    for token in (" Paris", "Paris", "Paris "):
        body = search(client, store, token=token)
        assert indices(body) == list(store.planted.paris_features), repr(token)
        assert [f["token_act"] for f in body["data"]] == [3.0, 2.0, 1.0]


def test_unknown_token_finds_nothing(client, store):
    assert search(client, store, token="Marseille") == {"data": [], "count": 0}


def test_token_and_label_combine(client, store):
    body = search(client, store, token="Paris", q="capital")
    assert indices(body) == [store.planted.labelled_paris]


def test_alive_and_dead_filters(client, store):
    assert (
        indices(search(client, store, alive="false", sort="index")) == store.planted.dead_features
    )
    alive = search(client, store, alive="true", limit=500)
    assert alive["count"] == store.spec.n_features - len(store.planted.dead_features)
    assert all(f["count"] > 0 for f in alive["data"])


def test_range_filters(client, store, everything):
    lo, hi = 0.02, 0.07
    expected = sorted(f["index"] for f in everything if lo <= f["density"] <= hi)
    assert indices(search(client, store, min_density=lo, max_density=hi, limit=500)) == expected
    expected = sorted(f["index"] for f in everything if 5 <= f["max_act"] <= 10)
    assert indices(search(client, store, min_max_act=5, max_max_act=10, limit=500)) == expected


@pytest.mark.parametrize("key", ["density", "max_act"])
@pytest.mark.parametrize("order", ["asc", "desc"])
def test_sorting(client, store, key, order):
    values = [f[key] for f in search(client, store, sort=key, order=order, limit=500)["data"]]
    assert values == sorted(values, reverse=order == "desc")


def test_label_score_sort_puts_unlabelled_features_last(client, store):
    data = search(client, store, sort="label_score", limit=500)["data"]
    scores = [f["label_f1"] for f in data]
    labelled = [s for s in scores if s is not None]
    assert scores == labelled + [None] * (len(scores) - len(labelled))
    assert labelled == sorted(labelled, reverse=True)


def test_offset_and_limit_page_through_with_a_total(client, store):
    pages = [
        search(client, store, offset=offset, limit=10)
        for offset in range(0, store.spec.n_features, 10)
    ]
    assert {p["count"] for p in pages} == {store.spec.n_features}
    assert [i for p in pages for i in indices(p)] == list(range(store.spec.n_features))


@pytest.mark.parametrize(
    "query", [{"q": "python"}, {"token": " Paris"}, {"q": "function", "sort": "index"}]
)
def test_a_search_reports_its_total_on_every_page_and_past_the_last(client, store, query):
    first = search(client, store, **query, limit=2)
    total = first["count"]
    assert total > 2
    pages = [search(client, store, **query, offset=o, limit=2) for o in range(0, total + 4, 2)]
    assert {p["count"] for p in pages} == {total}
    assert sum(len(p["data"]) for p in pages) == total and pages[-1]["data"] == []


def test_blank_form_fields_mean_no_filter(client, store):
    body = search(
        client, store, q="  ", min_density="", max_density="", alive="", sort="", order=""
    )
    assert body["count"] == store.spec.n_features
    assert indices(body)[:3] == [0, 1, 2]  # no query, so index order rather than relevance


@pytest.mark.parametrize(
    "params",
    [
        {"sort": "bogus"},
        {"order": "sideways"},
        {"limit": 0},
        {"limit": 501},
        {"offset": -1},
        {"alive": "maybe"},
        {"min_density": "lots"},
        {"min_density": 0.5, "max_density": 0.1},
        {"min_max_act": 3, "max_max_act": 1},
        {"q": "x" * 201},
    ],
)
def test_bad_parameters_are_422_with_a_message(client, store, params):
    response = client.get(f"/api/v1/saes/{store.sae}/features", params=params)
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], str)


def test_search_in_an_unknown_sae_is_404(client):
    assert client.get("/api/v1/saes/nope/features", params={"q": "x"}).status_code == 404


def test_query_building_quotes_every_word():
    assert query_words('say "hi" (now) AND*') == ["say", "hi", "now", "AND"]
    assert fts5_query(["say", "AND"]) == '"say" "AND"*'
    assert tsquery(["say", "hi"]) == "say & hi:*"
    assert fts5_query(["say", "AND"], every_word=False) == '"say" OR "AND"'
    assert tsquery(["say", "hi"], every_word=False) == "say | hi"


def test_a_page_of_results_is_kept_until_a_label_changes(tmp_path, monkeypatch):
    """Searches are cached per store; a label written by any process (here: straight into the
    store, as `saescope label` would) shows in the next answer, in the page and in the JSON."""
    from fastapi.testclient import TestClient
    from sqlalchemy.orm import Session

    from app import search as feature_search
    from app.main import create_app
    from app.settings import Settings
    from sae_core.labels.history import set_human_label
    from sae_core.store.db import create_engine_for
    from sae_core.store.lookup import find_sae
    from tests.app.synthetic_store import build_synthetic_store

    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = create_engine_for(url)
    sae = build_synthetic_store(engine).spec.sae_name
    searched = []
    real_search = feature_search._search

    def counting_search(session, row, asked):
        searched.append(asked.q)
        return real_search(session, row, asked)

    monkeypatch.setattr(feature_search, "_search", counting_search)
    with TestClient(create_app(Settings(db_url=url, live=False))) as client:
        first = client.get(f"/api/v1/saes/{sae}/features", params={"q": "walrus"}).json()
        assert first == {"data": [], "count": 0}
        assert client.get(f"/api/v1/saes/{sae}/features", params={"q": "walrus"}).json() == first
        assert len(searched) == 1  # asked twice, searched once
        with Session(engine) as session:
            set_human_label(session, sae=find_sae(session, sae), idx=5, label="walrus tusks", author="test")
            session.commit()
        again = client.get(f"/api/v1/saes/{sae}/features", params={"q": "walrus"}).json()
        assert [(f["index"], f["label"]) for f in again["data"]] == [(5, "walrus tusks")]
        fragment = client.get(f"/saes/{sae}/-/fragments/features", params={"q": "walrus"}).text
        assert "walrus tusks" in fragment and len(searched) == 2
    engine.dispose()
