"""The commands docker-compose.yml runs, run here outside Docker against the real PostgreSQL.

Read from docker-compose.yml itself, so the file and this test cannot drift apart: the
``migrate`` prestart step, the one-shot ``pipeline`` (train + precompute + label), then the
``app`` serving what the pipeline wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from sae_core.labels import embeddings
from sae_core.labels.background import VectorWatcher
from tests.app.server_process import free_port

ROOT = Path(__file__).resolve().parent.parent


def services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def shell_command(command) -> list[str]:
    """A compose command as argv; compose's ``$$`` is a literal ``$`` for the shell."""
    argv = command if isinstance(command, list) else command.split()
    return [part.replace("$$", "$") for part in argv]


def test_compose_file_is_complete():
    compose = services()
    assert compose["db"]["healthcheck"]["test"]
    for name in ("migrate", "app", "pipeline"):
        assert compose[name]["depends_on"]["db"]["condition"] == "service_healthy"
    assert compose["app"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # Required secrets fail fast.
    assert "${POSTGRES_PASSWORD:?" in (ROOT / "docker-compose.yml").read_text()


@pytest.mark.postgres
@pytest.mark.slow
def test_compose_commands_against_postgres(pg_schema, llama_dir, text_corpus, tmp_path):
    compose = services()
    cache = tmp_path / "cache"
    env = {
        **os.environ,
        "SAESCOPE_DB_URL": pg_schema,
        "SAESCOPE_CACHE": str(cache),
        # The pipeline's knobs, pointed at a tiny model and corpus.
        "MODEL": str(llama_dir),
        "LAYER": "1",
        "CORPUS": str(text_corpus),
        "TOKENS": "8192",
        "RUN_NAME": "tiny-l1",
        "TRAIN_FLAGS": "--width 128 --k 8 --eval-contexts 16",
        "PRECOMPUTE_FLAGS": "--tokens 4096",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }

    def run(argv):
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return result

    run(shell_command(compose["migrate"]["command"]))
    first = run(shell_command(compose["pipeline"]["command"]))
    assert (cache / "runs" / "tiny-l1" / "metrics.json").is_file()
    assert "blocks.1.hook_resid_post: activations read from" in first.stderr  # training's cache, no second forward
    again = run(shell_command(compose["pipeline"]["command"]))  # a rerun finds everything done
    assert "nothing to do" in again.stdout and "already complete" in again.stderr
    if embeddings.embedder_available():  # labels, but their vectors are left to the app
        assert VectorWatcher(pg_schema, tmp_path / "vectors.log").awaiting() == ["tiny-l1"]

    argv = shell_command(compose["app"]["command"])
    port = free_port()
    argv[argv.index("--host") + 1] = "127.0.0.1"  # loopback only, here
    argv[argv.index("--port") + 1] = str(port)
    server = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        saes = wait_for_json(f"http://127.0.0.1:{port}/api/v1/saes", server)
        assert [sae["name"] for sae in saes["data"]] == ["tiny-l1"]
        page = httpx.get(f"http://127.0.0.1:{port}/saes/tiny-l1/features/0", timeout=30)
        assert page.status_code == 200
        if embeddings.embedder_available():
            # The pipeline labelled without vectors; the app writes them in the background, and
            # semantic search then answers by meaning.
            search = f"http://127.0.0.1:{port}/api/v1/saes/tiny-l1/search?q=code"
            assert wait_for_json(search, server, until=lambda body: body["mode"] == "semantic")
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_for_json(url: str, process: subprocess.Popen, timeout: float = 120.0, until=lambda body: True) -> dict:
    """The first JSON body of ``url`` that satisfies ``until``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(process.stdout.read().decode()[-2000:])
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200 and until(response.json()):
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer as expected in {timeout} s")
