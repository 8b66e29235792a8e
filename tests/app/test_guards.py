"""Requests a store cannot answer are refused before they reach it: numbers beyond what the store
holds, NUL in a URL, bodies over the limit, writes without the token (before their body is read)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

TOKEN = "guard-token"


@pytest.fixture(scope="module")
def writable(store):
    settings = Settings(db_url=store.url, live=False, write_token=TOKEN, max_body_bytes=1000)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


HUGE = [2**31, 2**63, 10**30]


@pytest.mark.parametrize("number", HUGE)
@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/saes/{sae}/features/{n}",
        "/api/v1/saes/{sae}/features/{n}/examples",
        "/api/v1/saes/{sae}/features/0/examples?offset={n}",
        "/api/v1/saes/{sae}/features/0/examples?bin={n}",
        "/api/v1/saes/{sae}/features/0?top_limit={n}",
        "/api/v1/saes/{sae}/features?offset={n}",
        "/api/v1/saes/{sae}/features/{n}/labels",
        "/saes/{sae}/features/{n}",
        "/saes/{sae}/jump?index={n}",
        "/saes/{sae}/-/fragments/features/0/examples?offset={n}",
    ],
)
def test_numbers_beyond_the_store_are_422(client, store, url, number):
    response = client.get(url.format(sae=store.sae, n=number))
    assert response.status_code == 422, response.text


def test_the_largest_number_the_store_holds_is_a_plain_not_found(client, store):
    response = client.get(f"/api/v1/saes/{store.sae}/features/{2**31 - 1}")
    assert response.status_code == 404 and "has no feature" in response.json()["detail"]
    offset = client.get(f"/api/v1/saes/{store.sae}/features?offset={2**31 - 1}")
    assert offset.status_code == 200 and offset.json()["data"] == []


@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("/api/v1/saes/x%00", 404),
        ("/saes/x%00/features/1", 404),
        ("/api/v1/saes/{sae}/features?q=%00", 422),
        ("/api/v1/saes/{sae}/features?token=a%00b", 422),
        ("/api/v1/saes/{sae}/search?q=%00", 422),
        ("/saes/{sae}?q=%00", 422),
    ],
)
def test_nul_in_a_url_is_refused(client, store, url, status):
    response = client.get(url.format(sae=store.sae))
    assert response.status_code == status
    if url.startswith("/api/"):
        assert "NUL" in response.json()["detail"]


def test_a_percent_sign_before_00_is_text_not_nul(client, store):
    response = client.get(f"/api/v1/saes/{store.sae}/features", params={"q": "%00"})
    assert response.status_code == 200


def test_a_body_over_the_limit_is_413(writable, store):
    url = f"/api/v1/saes/{store.sae}/activations"
    response = writable.post(url, content=b'{"text": "' + b"a" * 2000 + b'"}')
    assert response.status_code == 413 and "max_body_bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: the guard counts the bytes as they come
        yield b'{"text": "'
        for _ in range(50):
            yield b"a" * 100
        yield b'"}'

    streamed = writable.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


@pytest.mark.parametrize("authorization", [None, "Bearer wrong"])
def test_a_write_without_the_token_is_refused_before_its_body(writable, store, authorization):
    headers = {"content-type": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    url = f"/api/v1/saes/{store.sae}/features/0/label"
    # Not JSON, and over the limit: were it read or parsed, the answer would be 413 or 422.
    response = writable.put(url, content=b"{" * 5000, headers=headers)
    assert response.status_code == 401 and "write token" in response.json()["detail"]


def test_a_write_with_the_token_is_read_and_validated(writable, store):
    url = f"/api/v1/saes/{store.sae}/features/0/label"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert writable.put(url, content=b"{" * 5000, headers=auth).status_code == 413
    nul = writable.put(url, json={"label": "a\x00b", "author": "ada"}, headers=auth)
    assert nul.status_code == 422
    long_author = writable.put(url, json={"label": "x", "author": "a" * 59}, headers=auth)
    assert long_author.status_code == 422


def test_the_openapi_document_names_every_answer(client):
    document = client.get("/openapi.json").json()
    assert document["components"]["schemas"]["ErrorPublic"]["required"] == ["detail"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            statuses = set(operation["responses"])
            assert {"404", "413", "422"} <= statuses, (method, path)
            if "requestBody" in operation:
                assert "400" in statuses
            if method == "put":
                assert {"401", "403"} <= statuses and operation["security"]
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorPublic"
                    }
    sae = document["components"]["schemas"]["SaePublic"]["properties"]["created_at"]
    assert sae["format"] == "date-time"


def test_timestamps_carry_their_zone(client, store):
    created = client.get("/api/v1/saes").json()["data"][0]["created_at"]
    assert created.endswith(("Z", "+00:00"))
