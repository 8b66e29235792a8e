"""What fires in every SAE of a release, from the live prompt page and ``/api/v1``: one forward
pass over the tiny Llama, each SAE at its own layer, grouped by SAE with labels and links."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from sae_core.inputs.subject import load_subject
from sae_core.live import probe as live
from sae_core.saes.formats import load_sae
from sae_core.store.db import FeatureRow, SaeRow, create_engine_for
from tests.graph_support import GRAPH_LAYERS, RELEASE, build_graph_store
from tests.live_support import LIVE_STORE, label_every_feature

TEXT = "Paris is the capital of France."
SCRIPT = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    """The graph tests' release (SAEs on layers 0, 1 and 2); the features of layer 2's SAE (the
    one with feature rows) are labelled with a planted tag that must stay text."""
    url = build_graph_store(tmp_path_factory.mktemp("release-live"))
    label_every_feature(url, SCRIPT)
    return url


@pytest.fixture(scope="module")
def client(store_url, llama_dir) -> Iterator[TestClient]:
    settings = Settings(db_url=store_url, model=str(llama_dir), live=True, max_prompt_tokens=40)
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def release_saes(store_url) -> list[tuple[str, int, str]]:
    """(name, layer, path) of the release's SAEs, by layer."""
    engine = create_engine_for(store_url, readonly=True)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(SaeRow.name, SaeRow.layer, SaeRow.path).order_by(SaeRow.layer)
        )
        saes = [tuple(row) for row in rows]
    engine.dispose()
    return saes


@pytest.fixture(scope="module")
def store_labels(store_url) -> dict[tuple[str, int], str | None]:
    engine = create_engine_for(store_url, readonly=True)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(SaeRow.name, FeatureRow.idx, FeatureRow.label).join(
                SaeRow, SaeRow.id == FeatureRow.sae_id
            )
        )
        labels = {(name, idx): label for name, idx, label in rows}
    engine.dispose()
    return labels


def test_every_sae_of_the_release_equals_its_own_prompt_activations(
    client, release_saes, store_labels, llama_dir
):
    response = client.post(
        f"/api/v1/releases/{RELEASE}/activations", json={"text": TEXT, "top": 8, "per_token": 3}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["release"] == RELEASE
    assert [(part["sae"], part["layer"]) for part in body["saes"]] == [
        (name, layer) for name, layer, _ in release_saes
    ]
    subject = load_subject(str(llama_dir))
    for part, (name, layer, path) in zip(body["saes"], release_saes, strict=True):
        expected = live.activations(subject, load_sae(path), layer, TEXT, per_token=3, top=8)
        assert [t["token_id"] for t in body["tokens"]] == [t.token_id for t in expected.tokens]
        assert [r["index"] for r in part["ranked"]] == [r.feature for r in expected.ranked], name
        assert [r["max_value"] for r in part["ranked"]] == pytest.approx(
            [r.max_value for r in expected.ranked], rel=1e-4, abs=1e-5
        )
        assert [[fv["index"] for fv in row] for row in part["top_per_token"]] == [
            [fv.feature for fv in row] for row in expected.top_per_token
        ]
        assert part["d_sae"] == LIVE_STORE.n_features
        assert [r["label"] for r in part["ranked"]] == [  # each SAE's own labels
            store_labels.get((name, r["index"])) for r in part["ranked"]
        ]
    assert any(r["label"] for part in body["saes"] for r in part["ranked"])


def test_one_forward_pass_serves_every_layer(client, monkeypatch):
    subject = next(iter(client.app.state.live.backend.saes.values())).subject
    forwards = []
    forward_to_layers = subject.forward_to_layers

    def counted(ids, layers, *args, **kwargs):
        forwards.append(sorted(layers))
        return forward_to_layers(ids, layers, *args, **kwargs)

    monkeypatch.setattr(subject, "forward_to_layers", counted)
    response = client.post(f"/api/v1/releases/{RELEASE}/activations", json={"text": TEXT})
    assert response.status_code == 200
    assert forwards == [sorted(GRAPH_LAYERS)]


def test_the_prompt_page_offers_the_release_and_its_fragment_groups_by_sae(client, release_saes):
    page = client.get(f"/saes/{LIVE_STORE.sae_name}/prompt")
    assert 'id="release-form"' in page.text
    assert f"/releases/{RELEASE}/-/fragments/prompt/activations" in page.text
    fragment = client.post(
        f"/releases/{RELEASE}/-/fragments/prompt/activations", data={"text": TEXT, "top": "50"}
    )
    assert fragment.status_code == 200
    html = fragment.text
    for name, _, _ in release_saes:
        assert f'data-sae="{name}"' in html
        assert f'href="/saes/{name}/features/' in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and SCRIPT not in html


def test_bad_requests_are_answered_in_one_line(client):
    unknown = client.post("/api/v1/releases/no-such-release/activations", json={"text": TEXT})
    assert unknown.status_code == 404 and "no-such-release" in unknown.json()["detail"]
    long = client.post(f"/api/v1/releases/{RELEASE}/activations", json={"text": "Paris " * 60})
    assert long.status_code == 413 and "at most 40" in long.json()["detail"]
    fragment = client.post(f"/releases/{RELEASE}/-/fragments/prompt/activations", data={"text": ""})
    assert fragment.status_code == 422 and "live-error" in fragment.text


def test_a_full_queue_refuses_the_release_at_once(client):
    places = client.app.state.live.places
    with ExitStack() as held:
        for _ in range(places.size):
            held.enter_context(places.hold())
        response = client.post(f"/api/v1/releases/{RELEASE}/activations", json={"text": TEXT})
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1


def test_openapi_documents_the_release_operation(client):
    operation = client.get("/openapi.json").json()["paths"][
        "/api/v1/releases/{release}/activations"
    ]["post"]
    assert set(operation["responses"]) >= {"200", "404", "413", "422", "503", "504"}
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert schema.endswith("/ReleaseActivationsPublic")
