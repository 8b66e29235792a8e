"""Live endpoints and pages on a store whose SAE is a real folder over the tiny Llama."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import anyio.to_thread
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app import queries
from app.live.admission import LivePlaces
from app.main import create_app
from app.settings import Settings
from sae_core.inputs.subject import load_subject
from sae_core.live import probe as live
from sae_core.live.attribution import Target, attribution
from sae_core.saes.formats import load_sae
from sae_core.store.db import FeatureRow, SaeRow, create_engine_for
from tests.live_support import LIVE_STORE, build_live_store

SAE = LIVE_STORE.sae_name
LAYER = 2  # the synthetic store's layer
TEXT = "Paris is the capital of France."


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    return build_live_store(tmp_path_factory.mktemp("live-store"))


@contextmanager
def live_client(store_url: str, model: str, **settings) -> Iterator[TestClient]:
    app = create_app(Settings(db_url=store_url, model=model, **{"live": True, **settings}))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def client(store_url, llama_dir) -> Iterator[TestClient]:
    with live_client(
        store_url, str(llama_dir), max_prompt_tokens=40, max_new_tokens=8
    ) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def direct(store_url, llama_dir):
    """The same model and SAE loaded directly, for the expected answers."""
    engine = create_engine_for(store_url, readonly=True)
    with engine.connect() as conn:
        path = conn.execute(sa.select(SaeRow.path)).scalar_one()
        labels = {
            idx: label for idx, label in conn.execute(sa.select(FeatureRow.idx, FeatureRow.label))
        }
    engine.dispose()
    return load_subject(str(llama_dir)), load_sae(path), labels


@contextmanager
def worker_held(client: TestClient) -> Iterator[None]:
    """Keep the model worker busy until the block ends; the jobs queued meanwhile have left the
    queue when it returns."""
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        release.wait(30)

    worker = client.app.state.live.backend.worker
    worker.submit(hold)
    assert started.wait(10)
    try:
        yield
    finally:
        release.set()
        deadline = time.monotonic() + 10
        while worker.queued and time.monotonic() < deadline:  # what the block queued drains
            time.sleep(0.01)


def test_activations_endpoint_equals_the_direct_computation_with_store_labels(client, direct):
    subject, sae, labels = direct
    response = client.post(
        f"/api/v1/saes/{SAE}/activations", json={"text": TEXT, "top": 10, "per_token": 3}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = live.activations(subject, sae, LAYER, TEXT, per_token=3, top=10)
    assert [t["token_id"] for t in body["tokens"]] == [t.token_id for t in expected.tokens]
    assert body["tokens"][0]["special"] is True
    assert [r["index"] for r in body["ranked"]] == [r.feature for r in expected.ranked]
    for got, want in zip(body["ranked"], expected.ranked, strict=True):
        assert got["max_value"] == pytest.approx(want.max_value)
        assert got["values"] == pytest.approx(want.values)
        assert got["label"] == labels[want.feature]
    assert [[fv["index"] for fv in row] for row in body["top_per_token"]] == [
        [fv.feature for fv in row] for row in expected.top_per_token
    ]


def test_overlong_prompt_is_413_with_the_limit(client):
    response = client.post(f"/api/v1/saes/{SAE}/activations", json={"text": "Paris " * 60})
    assert response.status_code == 413
    assert "at most 40" in response.json()["detail"]


def test_full_queue_is_503_with_retry_after_at_once_and_browsing_still_works(client):
    with worker_held(client):
        client.app.state.live.backend.worker.submit(lambda: None)  # fills the queue (4 slots by default)
        client.app.state.live.backend.worker.submit(lambda: None)
        client.app.state.live.backend.worker.submit(lambda: None)
        client.app.state.live.backend.worker.submit(lambda: None)
        response = client.post(f"/api/v1/saes/{SAE}/activations", json={"text": TEXT})
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        assert "busy" in response.json()["detail"]
        assert client.get(f"/saes/{SAE}").status_code == 200
        assert client.get(f"/saes/{SAE}/prompt").status_code == 200
        assert client.get(f"/api/v1/saes/{SAE}/features/1").status_code == 200


def test_a_refused_request_is_refused_before_any_work(client, monkeypatch):
    """Admission comes first: with every place in the queue held, no request is tokenised or
    reads the store before its 503."""
    backend = client.app.state.live.backend
    work = []
    monkeypatch.setattr(backend, "_encode", lambda *args, **kwargs: work.append("tokenise"))
    monkeypatch.setattr(
        queries, "get_feature_summary", lambda **kwargs: work.append("read the store")
    )
    requests = [
        ("activations", {"text": TEXT}),
        ("features/1/activations", {"text": TEXT}),
        ("attribution", {"text": TEXT, "token": " Paris"}),
        ("steer", {"text": TEXT, "features": [{"index": 1, "strength": 4}]}),
    ]
    with worker_held(client):
        for _ in range(4):  # the four places of the queue
            backend.worker.submit(lambda: None)
        for path, body in requests:
            response = client.post(f"/api/v1/saes/{SAE}/{path}", json=body)
            assert response.status_code == 503, path
            assert int(response.headers["retry-after"]) >= 1
    assert work == []


def test_a_refusal_with_every_place_held_touches_nothing_of_the_work(client, monkeypatch):
    """Admission on the event loop, before anything is awaited: with every place held (here by
    a second LivePlaces on the same folder, as another web worker would), each live request is
    503 with Retry-After without asking the model side, opening a session or taking a worker
    thread."""
    service = client.app.state.live
    touched = []
    call, sessions, run_sync = service.backend.call, service.sessions, anyio.to_thread.run_sync

    def recorded(what: str, fn):
        def record(*args, **kwargs):
            touched.append(what)
            return fn(*args, **kwargs)

        return record

    monkeypatch.setattr(service.backend, "call", recorded("model side", call))
    monkeypatch.setattr(service, "sessions", recorded("store session", sessions))

    async def on_a_thread(*args, **kwargs):
        touched.append("worker thread")
        return await run_sync(*args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", on_a_thread)
    requests = [
        ("/api/v1/saes/{sae}/activations", {"json": {"text": TEXT}}),
        ("/api/v1/saes/{sae}/features/1/activations", {"json": {"text": TEXT}}),
        ("/api/v1/saes/{sae}/attribution", {"json": {"text": TEXT, "token": " Paris"}}),
        ("/api/v1/saes/{sae}/steer", {"json": {"text": TEXT, "features": [{"index": 1, "strength": 4}]}}),
        ("/saes/{sae}/-/fragments/prompt/activations", {"data": {"text": TEXT}}),
        ("/saes/{sae}/-/fragments/features/1/try", {"data": {"text": TEXT}}),
    ]
    other_worker = LivePlaces(service.places.folder, service.places.size)
    with ExitStack() as held:
        for _ in range(other_worker.size):
            held.enter_context(other_worker.hold())
        for path, body in requests:
            response = client.post(path.format(sae=SAE), **body)
            assert response.status_code == 503, path
            assert int(response.headers["retry-after"]) >= 1
            assert "busy" in response.text
    assert touched == []
    response = client.post(f"/api/v1/saes/{SAE}/features/1/activations", json={"text": TEXT})
    assert response.status_code == 200  # places free again: the same request does the work
    assert {"model side", "store session", "worker thread"} <= set(touched)


def test_a_request_past_its_time_limit_is_504(store_url, llama_dir):
    with live_client(store_url, str(llama_dir), live_timeout_s=0.1) as client, worker_held(client):
        response = client.post(f"/api/v1/saes/{SAE}/activations", json={"text": TEXT})
        assert response.status_code == 504
        assert "within 0.1 s" in response.json()["detail"]


def test_attribution_endpoint_matches_the_direct_computation(client, direct):
    subject, sae, labels = direct
    response = client.post(
        f"/api/v1/saes/{SAE}/attribution", json={"text": TEXT, "token": " the", "position": 3}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    token = live.single_token_id(subject, " the")
    expected = attribution(subject, sae, LAYER, TEXT, Target(position=3, token=token))
    assert (body["position"], body["target"]["token_id"]) == (3, token)
    assert body["metric"] == pytest.approx(expected.metric, rel=1e-5)
    assert [f["index"] for f in body["features"]] == [f.feature for f in expected.features]
    assert all(f["label"] == labels[f["index"]] for f in body["features"])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"token": " the capital"}, "exactly one token"),
        ({"token": " the", "token_id": 3}, "not both"),
        ({"position": 500}, "outside the prompt"),
    ],
)
def test_bad_attribution_targets_are_422(client, payload, message):
    response = client.post(f"/api/v1/saes/{SAE}/attribution", json={"text": TEXT, **payload})
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_steer_strength_zero_matches_default_and_new_tokens_are_capped(client):
    payload = {
        "text": TEXT,
        "features": [{"index": 3, "strength": 0}],
        "max_new_tokens": 500,
        "temperature": 1.0,
        "seed": 4,
    }
    body = client.post(f"/api/v1/saes/{SAE}/steer", json=payload).json()
    assert body["max_new_tokens"] == 8
    assert body["steered"] == body["default"]
    assert 0 < len(body["default"]["token_ids"]) <= 8
    strong = client.post(
        f"/api/v1/saes/{SAE}/steer",
        json={**payload, "features": [{"index": 3, "strength": 50}], "temperature": 0},
    ).json()
    assert strong["steered"] != strong["default"]


def test_feature_on_custom_text(client, direct):
    subject, sae, _ = direct
    response = client.post(f"/api/v1/saes/{SAE}/features/5/activations", json={"text": TEXT})
    assert response.status_code == 200
    body = response.json()
    expected = live.feature_activations(subject, sae, LAYER, TEXT, 5)
    assert [t["value"] for t in body["tokens"]] == pytest.approx(expected.values)
    assert body["corpus_max"] > 0
    assert (
        client.post(f"/api/v1/saes/{SAE}/features/999/activations", json={"text": TEXT}).status_code
        == 404
    )


def test_prompt_fragment_renders_ranked_features_and_escaped_heatmaps(client):
    text = "<script>alert(1)</script> Paris"
    response = client.post(f"/saes/{SAE}/-/fragments/prompt/activations", data={"text": text})
    assert response.status_code == 200
    html = response.text
    assert "<script" not in html and ">&lt;</span>" in html  # tokens are escaped one by one
    assert f'href="/saes/{SAE}/features/' in html
    assert 'id="hm-1"' in html and 'class="hm"' in html and "--a:1.0" in html


def test_fragment_errors_render_as_a_message_not_a_page(client):
    overlong = client.post(
        f"/saes/{SAE}/-/fragments/prompt/activations", data={"text": "Paris " * 60}
    )
    assert overlong.status_code == 413
    assert 'class="live-error"' in overlong.text and "<html" not in overlong.text
    bad = client.post(
        f"/saes/{SAE}/-/fragments/prompt/steer", data={"text": TEXT, "features": "12;8"}
    )
    assert bad.status_code == 422 and "index:strength" in bad.text and "<html" not in bad.text


def test_attribution_and_steering_fragments(client):
    attributed = client.post(
        f"/saes/{SAE}/-/fragments/prompt/attribution",
        data={"text": TEXT, "position": "", "token": ""},
    )
    assert attributed.status_code == 200 and "Target: logit of" in attributed.text
    steered = client.post(
        f"/saes/{SAE}/-/fragments/prompt/steer",
        data={"text": TEXT, "features": "3:0", "temperature": "0"},
    )
    assert steered.status_code == 200 and 'class="steered"' in steered.text


def test_pages_offer_the_prompt_and_the_try_box_when_live(client):
    page = client.get(f"/saes/{SAE}/prompt", params={"text": "<b>hi</b>"})
    assert (
        page.status_code == 200
        and 'id="prompt-form"' in page.text
        and "&lt;b&gt;hi&lt;/b&gt;" in page.text
    )
    feature = client.get(f"/saes/{SAE}/features/5")
    assert f'hx-post="/saes/{SAE}/-/fragments/features/5/try"' in feature.text


def test_live_off_answers_503_and_pages_say_why(store_url):
    with TestClient(create_app(Settings(db_url=store_url, live=False))) as client:
        response = client.post(f"/api/v1/saes/{SAE}/activations", json={"text": TEXT})
        assert response.status_code == 503 and "--live" in response.json()["detail"]
        assert 'id="live-off"' in client.get(f"/saes/{SAE}/prompt").text
        assert "/try" not in client.get(f"/saes/{SAE}/features/5").text


def test_auto_live_serves_the_store_when_the_model_is_missing(store_url, tmp_path):
    missing = str(tmp_path / "no-model")
    with live_client(store_url, missing, live=None) as client:
        response = client.post(f"/api/v1/saes/{SAE}/activations", json={"text": TEXT})
        assert (
            response.status_code == 503
            and "live prompts are off for SAE" in response.json()["detail"]
        )
        assert client.get(f"/saes/{SAE}").status_code == 200


def test_required_live_fails_fast_when_no_model_loads(store_url, tmp_path):
    app = create_app(Settings(db_url=store_url, model=str(tmp_path / "no-model"), live=True))
    with pytest.raises(Exception, match="no SAE's model loads"), TestClient(app):
        pass


def test_sae_page_links_to_the_prompt_page_only_when_live(client, store_url):
    assert f'href="/saes/{SAE}/prompt"' in client.get(f"/saes/{SAE}").text
    with TestClient(create_app(Settings(db_url=store_url, live=False))) as off:
        assert f'href="/saes/{SAE}/prompt"' not in off.get(f"/saes/{SAE}").text
