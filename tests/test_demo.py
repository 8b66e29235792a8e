"""`saescope demo` end to end on a tiny model and corpus, into SQLite and into PostgreSQL, then
the pages a new user opens first."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from sae_core.cli import main
from sae_core.commands import demo

# The quick budget, shrunk further so the tiny model's run takes seconds.
TINY = demo.Budget(train_tokens=8_192, cache_tokens=8_192, width=128, k=8, precompute_tokens=4_096, eval_contexts=16)


@pytest.fixture
def tiny_budget(monkeypatch):
    monkeypatch.setitem(demo.BUDGETS, "quick", TINY)


def run_demo(db_url: str, model_dir, corpus, tmp_path) -> None:
    argv = ["demo", "--quick", "--no-serve", "--model", str(model_dir), "--layer", "1",
            "--corpus", str(corpus), "--db", db_url, "--out", str(tmp_path / "sae")]
    assert main(argv) == 0


def check_pages(db_url: str) -> None:
    with TestClient(create_app(Settings(db_url=db_url, live=False))) as client:
        saes = client.get("/api/v1/saes").json()
        assert saes["count"] == 1
        sae = saes["data"][0]
        assert sae["d_sae"] == TINY.width
        assert client.get("/").status_code == 200
        page = client.get(f"/saes/{sae['name']}")
        assert page.status_code == 200 and "feature" in page.text.lower()
        alive = client.get(f"/api/v1/saes/{sae['name']}/features", params={"alive": "true", "sort": "density", "order": "desc"}).json()
        assert alive["count"] > 0
        top = alive["data"][0]["index"]
        feature = client.get(f"/api/v1/saes/{sae['name']}/features/{top}").json()
        assert feature["top_examples"], "the densest feature has top examples"
        assert client.get(f"/saes/{sae['name']}/features/{top}").status_code == 200


def test_demo_into_sqlite(tiny_budget, llama_dir, text_corpus, tmp_path):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    run_demo(url, llama_dir, text_corpus, tmp_path)
    check_pages(url)
    # A second run reuses every stage and is done at once.
    run_demo(url, llama_dir, text_corpus, tmp_path)
    check_pages(url)


@pytest.mark.postgres
def test_demo_into_postgres(tiny_budget, llama_dir, text_corpus, tmp_path, pg_schema):
    run_demo(pg_schema, llama_dir, text_corpus, tmp_path)
    check_pages(pg_schema)
