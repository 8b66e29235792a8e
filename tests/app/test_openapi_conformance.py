"""The server does what its OpenAPI document says: schemathesis (every check, every operation,
live routes included) against a served store with the tiny live model, on both backends.

A fixed seed and a few examples per operation keep it deterministic and fast (~850 requests,
most of them schemathesis's coverage phase: boundaries, wrong types, NUL bytes, huge numbers).
tests/app/schemathesis.toml lists the answers a schema cannot predict, and why.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.main import create_app
from app.settings import Settings
from tests.app.server_process import serving_app
from tests.conftest import postgres_schema
from tests.live_support import build_live_store

CONFIG = Path(__file__).with_name("schemathesis.toml")
TOKEN = "schemathesis-token"
SEED = 20260101
EXAMPLES = 5  # per operation and phase; the coverage phase adds its boundary cases


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield build_live_store(tmp_path)
        return
    with postgres_schema(request.getfixturevalue("pg_url"), "openapi") as url:
        yield build_live_store(tmp_path, url)


@pytest.mark.slow
def test_every_answer_is_the_documented_one(store_url, llama_dir, tmp_path):
    settings = Settings(
        db_url=store_url,
        model=str(llama_dir),
        live=True,
        write_token=TOKEN,  # label edits are exercised too, with and without the token
        max_prompt_tokens=40,
        max_new_tokens=8,
    )
    with serving_app(create_app(settings)) as base:
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                "from schemathesis.cli import schemathesis; schemathesis()",
                "--config-file",
                str(CONFIG),
                "run",
                f"{base}/openapi.json",
                "--checks=all",
                f"--seed={SEED}",
                f"--max-examples={EXAMPLES}",
                "--workers=1",
                f"--header=Authorization: Bearer {TOKEN}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,  # where schemathesis keeps its cache
        )
    summary = run.stdout[-6000:]
    assert run.returncode == 0, summary
    assert " passed" in summary and "failures" not in summary.lower()
