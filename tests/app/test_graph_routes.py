"""Graph jobs and pages over a release of three SAEs on the tiny Llama: 202 and polling, reuse,
the queue's 503, the time limit, export with the view, import and round trip, escaping."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.graph_support import RELEASE, build_graph_store
from tests.live_support import LIVE_STORE

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(tmp_path_factory, llama_dir) -> Iterator[TestClient]:
    url = build_graph_store(tmp_path_factory.mktemp("graph-routes"))
    settings = Settings(
        db_url=url, model=str(llama_dir), live=True, graph_max_prompt_tokens=24, graph_queue_size=1
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def wait(client: TestClient, job: dict, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while job["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
        response = client.get(job["url"])
        assert response.status_code == 200
        job = response.json()
    return job


def graph_jobs(client: TestClient):
    return client.app.state.live.backend.graphs


@pytest.fixture(scope="module")
def slug(client) -> str:
    response = client.post(f"/api/v1/releases/{RELEASE}/graphs", json={"prompt": PROMPT})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == job["url"]
    assert job["state"] in ("queued", "running", "done")
    done = wait(client, job)
    assert done["state"] == "done", done
    return done["graph_url"].rsplit("/", 1)[1]


def test_a_job_ends_in_a_saved_graph_and_the_same_request_reuses_it(client, slug):
    again = client.post(f"/api/v1/releases/{RELEASE}/graphs", json={"prompt": PROMPT})
    assert again.status_code == 202
    assert again.json()["state"] == "done" and again.json()["graph_url"] == f"/graphs/{slug}"
    page = client.get(f"/graphs/{slug}")
    assert page.status_code == 200 and "<svg" in page.text
    assert (
        page.headers["link"] == f'</api/v1/graphs/{slug}>; rel="alternate"; type="application/json"'
    )
    document = client.get(f"/api/v1/graphs/{slug}").json()
    assert document["metadata"]["scan"] == RELEASE
    assert page.text.count('class="node ') == len(document["nodes"])
    assert page.text.count("<line ") == len(document["links"])
    listing = client.get(f"/releases/{RELEASE}/graphs")
    assert listing.status_code == 200 and f"/graphs/{slug}" in listing.text


def test_progress_fragment_polls_until_done_then_redirects(client):
    form = client.post(
        f"/releases/{RELEASE}/-/fragments/graphs", data={"prompt": "Paris is the capital of"}
    )
    assert form.status_code == 200
    if 'hx-trigger="every 1s"' in form.text:  # still running: the fragment polls itself
        job_url = form.text.split('hx-get="', 1)[1].split('"', 1)[0]
        deadline = time.monotonic() + 120
        while "HX-Redirect" not in client.get(job_url).headers and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get(job_url).headers["HX-Redirect"].startswith("/graphs/")
    else:
        assert form.headers["HX-Redirect"].startswith("/graphs/")


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"prompt": "word " * 40}, 413, "graph_max_prompt_tokens"),
        ({"prompt": PROMPT, "target": "two tokens here"}, 422, "tokens for this model"),
        ({"prompt": ""}, 422, "prompt"),
    ],
)
def test_bad_requests_are_refused_before_a_job(client, body, status, message):
    response = client.post(f"/api/v1/releases/{RELEASE}/graphs", json=body)
    assert response.status_code == status and message in response.json()["detail"]


def test_unknown_release_job_and_graph_are_404(client):
    assert client.post("/api/v1/releases/nope/graphs", json={"prompt": PROMPT}).status_code == 404
    assert client.get(f"/api/v1/graph-jobs/{RELEASE}/0123").status_code == 404
    assert client.get("/graphs/nope").status_code == 404
    assert client.get("/api/v1/graphs/nope").status_code == 404


def test_a_full_queue_answers_503_with_retry_after(client, monkeypatch):
    jobs = graph_jobs(client)
    started, release = threading.Event(), threading.Event()

    def blocked(job_id, request, layers):
        started.set()
        release.wait(30)

    monkeypatch.setattr(jobs, "_execute", blocked)
    try:
        first = client.post(f"/api/v1/releases/{RELEASE}/graphs", json={"prompt": "one two"})
        assert first.status_code == 202 and started.wait(10)
        second = client.post(f"/api/v1/releases/{RELEASE}/graphs", json={"prompt": "three four"})
        assert second.status_code == 202 and second.json()["state"] == "queued"
        third = client.post(f"/api/v1/releases/{RELEASE}/graphs", json={"prompt": "five six"})
        assert third.status_code == 503
        assert int(third.headers["retry-after"]) >= 1
        assert "busy" in third.json()["detail"]
    finally:
        release.set()


def test_a_job_past_the_time_limit_fails_with_that_reason(client, monkeypatch):
    jobs = graph_jobs(client)
    monkeypatch.setattr(
        jobs, "settings", jobs.settings.model_copy(update={"graph_timeout_s": 1e-6})
    )
    response = client.post(f"/api/v1/releases/{RELEASE}/graphs", json={"prompt": "a slow prompt"})
    assert response.status_code == 202
    job = wait(client, response.json())
    assert job["state"] == "failed" and "graph_timeout_s" in job["error"]


def test_export_carries_the_view_and_import_round_trips_byte_for_byte(client, slug):
    plain = client.get(f"/api/v1/graphs/{slug}").json()
    features = [
        n["node_id"] for n in plain["nodes"] if n["feature_type"] == "cross layer transcoder"
    ][:2]
    query = {"pin": features[0], "group": f"my: group:{','.join(features)}"}
    exported = client.get(f"/api/v1/graphs/{slug}", params=query)
    assert exported.headers["content-disposition"] == f'attachment; filename="{slug}.json"'
    document = exported.json()
    assert document["qParams"]["pinnedIds"] == [features[0]]
    assert document["qParams"]["supernodes"] == [["my: group", *features]]
    imported = client.post(f"/api/v1/releases/{RELEASE}/graphs/import", json=document)
    assert imported.status_code == 201, imported.text
    new_slug = imported.json()["slug"]
    assert client.get(f"/api/v1/graphs/{new_slug}").content == exported.content
    page = client.get(f"/graphs/{new_slug}")  # the imported view shows its pins and groups
    assert "pinned-id" in page.text and "my: group" in page.text


def test_labels_are_escaped_on_the_page_and_in_the_panel(client, slug):
    document = client.get(f"/api/v1/graphs/{slug}").json()
    # layer 2's SAE is the one with features (and examples) in the store
    feature = next(
        n
        for n in document["nodes"]
        if n["feature_type"] == "cross layer transcoder" and n["layer"] == "2"
    )
    feature["clerp"] = "<script>alert('graph')</script>"
    document["metadata"]["prompt"] = "<script>alert('prompt')</script>"
    imported = client.post(f"/api/v1/releases/{RELEASE}/graphs/import", json=document).json()
    page = client.get(imported["url"]).text
    panel = client.get(f"{imported['url']}/-/fragments/nodes/{feature['node_id']}").text
    for html in (page, panel):
        assert "<script>alert(" not in html
    assert "&lt;script&gt;alert(" in page and "&lt;script&gt;alert(" in panel
    assert "feature page" in panel and 'class="ex"' in panel


def test_a_feature_nodes_panel_links_to_its_feature_family_and_steering(client, slug):
    document = client.get(f"/api/v1/graphs/{slug}").json()
    node = next(
        n
        for n in document["nodes"]
        if n["feature_type"] == "cross layer transcoder" and n["layer"] == "2"
    )
    panel = client.get(f"/graphs/{slug}/-/fragments/nodes/{node['node_id']}").text
    links = dict(
        (text.strip(), href.replace("&amp;", "&"))
        for href, text in re.findall(r'<a href="([^"]+)"[^>]*>([^<]+)</a>', panel)
    )
    sae_path = f"/saes/{LIVE_STORE.sae_name}/features/{node['feature']}"
    assert links["feature page"] == sae_path
    assert links["family"] == f"{sae_path}/family"
    assert links["steer with this feature"].startswith(f"/saes/{LIVE_STORE.sae_name}/prompt?text=")
    for href in links.values():  # every link opens a page
        assert client.get(href).status_code == 200, href


def test_import_refuses_what_is_not_a_graph(client):
    response = client.post(f"/api/v1/releases/{RELEASE}/graphs/import", json={"nodes": []})
    assert response.status_code == 422 and "not a graph JSON file" in response.json()["detail"]


@pytest.mark.slow
def test_a_graph_job_runs_in_the_live_model_process_of_serve(tmp_path, llama_dir):
    """As `saescope serve` runs it: the job in the model process, which saves the graph; the
    web worker (its store read-only) polls the job over the socket and reads the graph."""
    from app.live.remote import ModelProcess

    url = build_graph_store(tmp_path)
    settings = Settings(db_url=url, model=str(llama_dir), live=True)
    with ModelProcess.start(settings) as model:
        web = Settings(db_url=url, live=True, live_socket=model.socket)
        with TestClient(create_app(web), raise_server_exceptions=False) as remote:
            response = remote.post(f"/api/v1/releases/{RELEASE}/graphs", json={"prompt": PROMPT})
            assert response.status_code == 202, response.text
            job = wait(remote, response.json())
            assert job["state"] == "done", job
            page = remote.get(job["graph_url"])
            assert page.status_code == 200 and "<svg" in page.text


def test_live_requests_during_a_graph_job_answer_as_without_it(client):
    """The graph job's hooks and frozen forwards never leak into a live request on the other
    worker: the job yields the model between batches, and requests see the plain model."""
    sae = LIVE_STORE.sae_name  # the release's layer-2 SAE
    body = {"text": "Paris is the capital of France.", "top": 10}
    baseline = client.post(f"/api/v1/saes/{sae}/activations", json=body)
    assert baseline.status_code == 200, baseline.text
    job = client.post(
        f"/api/v1/releases/{RELEASE}/graphs",
        json={"prompt": "Lyon and Marseille are French cities; Berlin and Munich are"},
    ).json()
    during = 0
    while job["state"] in ("queued", "running"):
        response = client.post(f"/api/v1/saes/{sae}/activations", json=body)
        assert response.json() == baseline.json()
        during += job["state"] == "running"
        job = client.get(job["url"]).json()
    assert job["state"] == "done" and during >= 1
