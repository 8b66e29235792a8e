"""The live model in its own process: the socket protocol, the process `saescope serve` starts,
and several web workers sharing one model."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Listener
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from fastapi.testclient import TestClient

from app.live import remote as live_remote
from app.live.remote import ModelProcess, RemoteModel, key_path, serve_host
from app.live.worker import LiveRefused, LiveUnavailableError
from app.main import create_app
from app.settings import Settings
from sae_core.inputs.subject import load_subject
from sae_core.live import probe as live
from sae_core.live.requests import ActivationsOp, FeatureOnTextOp, LiveOp
from sae_core.saes.formats import load_sae
from tests.app.server_process import server_processes, serving
from tests.live_support import LIVE_STORE, build_live_store

SAE = LIVE_STORE.sae_name
LAYER = 2  # the synthetic store's layer
TEXT = "Paris is the capital of France."


# ---------------------------------------------------------------------------------------------
# The protocol, against a stand-in host on a thread of this process


class Answer(NamedTuple):
    operation: str  # the type of request the host received
    op: LiveOp


def ask(text: str) -> FeatureOnTextOp:
    return FeatureOnTextOp(sae="sae-a", index=3, text=text)


class StandInHost:
    """Answers like ``ModelHost``: echoes requests, and misbehaves when the text says so."""

    saes = {"sae-a": None}
    unavailable = {"sae-b": "its model is missing"}

    def call(self, op: LiveOp):
        if op.text == "busy":
            raise LiveRefused(503, "the model is busy", retry_after_s=3)
        if op.text == "crash":
            raise RuntimeError("boom")
        if op.text == "slow":
            time.sleep(2)
        return Answer(type(op).__name__, op)


@pytest.fixture
def listener(tmp_path) -> Iterator[Listener]:
    """A stand-in host listening on a socket, served on a daemon thread."""
    path = str(tmp_path / "live.sock")
    key_path(path).write_bytes(os.urandom(32))
    listener = Listener(path, family="AF_UNIX", authkey=key_path(path).read_bytes())
    thread = threading.Thread(target=serve_host, args=(StandInHost(), listener), daemon=True)
    thread.start()
    yield listener
    listener.close()


@pytest.fixture
def socket(listener) -> str:
    return listener.address


def test_a_remote_model_describes_the_host_and_round_trips_results(socket):
    remote = RemoteModel(socket, timeout_s=5)
    assert remote.live_saes == {"sae-a"}
    assert remote.unavailable == {"sae-b": "its model is missing"}
    op = ActivationsOp(sae="sae-a", text="hi", per_token=5, top=3)
    assert remote.call(op) == Answer("ActivationsOp", op)  # the typed request crossed as it is


def test_refusals_cross_with_their_status_and_retry_estimate(socket):
    with pytest.raises(LiveRefused) as refused:
        RemoteModel(socket, timeout_s=5).call(ask("busy"))
    assert (refused.value.status, refused.value.retry_after_s) == (503, 3)
    assert "busy" in refused.value.message


def test_a_crashing_request_is_a_500_and_the_host_answers_the_next(socket):
    remote = RemoteModel(socket, timeout_s=5)
    with pytest.raises(LiveRefused) as refused:
        remote.call(ask("crash"))
    assert refused.value.status == 500 and "RuntimeError" in refused.value.message
    assert remote.call(ask("hi")) == Answer("FeatureOnTextOp", ask("hi"))


def test_a_host_that_never_answers_is_a_504(socket, monkeypatch):
    monkeypatch.setattr(live_remote, "ANSWER_GRACE_S", 0.0)
    with pytest.raises(LiveRefused) as refused:
        RemoteModel(socket, timeout_s=0.2).call(ask("slow"))
    assert refused.value.status == 504


def test_a_wrong_key_or_a_gone_process_is_a_503_in_one_line(socket, listener, tmp_path):
    remote = RemoteModel(socket, timeout_s=5)
    key_path(socket).write_bytes(b"not the key")
    with pytest.raises(LiveRefused) as wrong_key:
        RemoteModel(socket, timeout_s=5)
    assert wrong_key.value.status == 503
    listener.close()  # as when the process is gone
    with pytest.raises(LiveRefused) as gone:
        remote.call(ask("hi"))
    assert gone.value.status == 503 and "\n" not in gone.value.message
    with pytest.raises(LiveUnavailableError, match="no live model process"):
        RemoteModel(str(tmp_path / "elsewhere.sock"), timeout_s=5)


# ---------------------------------------------------------------------------------------------
# The real model process over the tiny Llama


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    return build_live_store(tmp_path_factory.mktemp("live-process-store"))


@pytest.fixture(scope="module")
def model(store_url, llama_dir) -> Iterator[ModelProcess]:
    settings = Settings(db_url=store_url, model=str(llama_dir), live=True, max_prompt_tokens=40)
    with ModelProcess.start(settings) as process:
        yield process


@pytest.fixture(scope="module")
def client(model, store_url) -> Iterator[TestClient]:
    settings = Settings(db_url=store_url, live=True, max_prompt_tokens=40, live_socket=model.socket)
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def test_the_app_answers_from_the_model_process_as_from_a_model_of_its_own(
    client, store_url, llama_dir
):
    response = client.post(f"/api/v1/saes/{SAE}/activations", json={"text": TEXT, "top": 10})
    assert response.status_code == 200, response.text
    subject = load_subject(str(llama_dir))
    sae = load_sae(Path(store_url.removeprefix("sqlite:///")).parent / "sae")
    expected = live.activations(subject, sae, LAYER, TEXT, top=10)
    ranked = response.json()["ranked"]
    assert [r["index"] for r in ranked] == [r.feature for r in expected.ranked]
    assert [r["max_value"] for r in ranked] == pytest.approx([r.max_value for r in expected.ranked])
    assert all("label" in r for r in ranked)
    assert "prompt-form" in client.get(f"/saes/{SAE}/prompt").text


def test_the_model_process_refuses_as_the_app_would(client):
    long = client.post(f"/api/v1/saes/{SAE}/activations", json={"text": "Paris " * 60})
    assert long.status_code == 413 and "at most 40" in long.json()["detail"]
    bad_token = client.post(
        f"/api/v1/saes/{SAE}/attribution", json={"text": TEXT, "token": " Paris is"}
    )
    assert bad_token.status_code == 422 and "tokens for this model" in bad_token.json()["detail"]
    steered = client.post(
        f"/api/v1/saes/{SAE}/steer",
        json={"text": TEXT, "features": [{"index": 3, "strength": 0}], "max_new_tokens": 4},
    )
    assert steered.status_code == 200
    assert steered.json()["default"] == steered.json()["steered"]


def test_a_model_that_cannot_load_fails_the_start_in_one_line(store_url, tmp_path):
    settings = Settings(db_url=store_url, model=str(tmp_path / "no-model"), live=True)
    with pytest.raises(LiveUnavailableError, match="no SAE's model loads") as failed:
        ModelProcess.start(settings)
    assert "\n" not in str(failed.value)


def test_a_model_process_that_dies_is_started_again_and_pages_serve_meanwhile(store_url, llama_dir):
    settings = Settings(db_url=store_url, model=str(llama_dir), live=True)
    with ModelProcess.start(settings) as model:
        app = create_app(settings.model_copy(update={"live_socket": model.socket}))
        with TestClient(app, raise_server_exceptions=False) as client:
            first = model.process
            first.kill()
            first.join()
            assert client.get(f"/saes/{SAE}/features/1").status_code == 200
            deadline = time.monotonic() + 120
            while True:
                response = client.post(f"/api/v1/saes/{SAE}/activations", json={"text": TEXT})
                if response.status_code == 200 or time.monotonic() > deadline:
                    break
                assert response.status_code == 503, response.text  # until it is back
                time.sleep(0.2)
            assert response.status_code == 200
            assert model.process.pid != first.pid


# ---------------------------------------------------------------------------------------------
# `saescope serve --workers 2`: two web workers, one model


def _holds_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.slow
def test_serve_with_two_workers_loads_the_model_once(store_url, llama_dir):
    flags = ("--live", "--model", str(llama_dir), "--workers", "2")
    with serving(store_url, *flags, timeout=120) as base:
        answers = [
            httpx.post(f"{base}/api/v1/saes/{SAE}/activations", json={"text": TEXT}, timeout=60)
            for _ in range(6)
        ]
        assert [a.status_code for a in answers] == [200] * 6
        assert len({str(a.json()["ranked"]) for a in answers}) == 1
        tree = server_processes(int(base.rsplit(":", 1)[1]))
        assert len(tree) >= 4  # the server, its model process and two web workers (and helpers)
        assert len([pid for pid in tree if _holds_torch(pid)]) == 1


@pytest.mark.slow
def test_sigterm_stops_serve_through_its_cleanup(store_url, llama_dir, tmp_path):
    """``docker stop`` sends SIGTERM: serve must stop its model process and remove the live
    socket's folder, as Ctrl-C does (uvicorn raises the signal again after its own shutdown)."""
    flags = ("--live", "--model", str(llama_dir), "--no-embed")
    with serving(store_url, *flags, timeout=120, env={"TMPDIR": str(tmp_path)}) as base:
        tree = server_processes(int(base.rsplit(":", 1)[1]))
        assert list(tmp_path.glob("saescope-live-*")), "the live socket's folder is in TMPDIR"
    assert list(tmp_path.glob("saescope-live-*")) == []
    deadline = time.monotonic() + 10  # the last of them may still be exiting
    while (
        left := [pid for pid in tree if Path(f"/proc/{pid}").exists()]
    ) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []
