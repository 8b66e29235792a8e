"""`saescope demo` end to end on a tiny model and corpus, into SQLite and into PostgreSQL, then
the pages a new user opens first."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from sae_core.cli import main
from sae_core.commands import demo
from sae_core.labels import embeddings
from sae_core.labels.background import VectorWatcher
from sae_core.saes.train_config import TrainConfig
from sae_core.store.db import FeatureEmbeddingRow, FeatureRow, SaeRow, create_engine_for

# The quick budget, shrunk further so the tiny model's run takes seconds.
TINY = demo.Budget(
    train_tokens=8_192, batch_size=1024, lr_scale=4.0, cache_tokens=8_192, widths=(64, 128), side_width=32, k=8, precompute_tokens=4_096, eval_contexts=16
)


@pytest.fixture
def tiny_budget(monkeypatch):
    monkeypatch.setitem(demo.BUDGETS, "quick", TINY)


def run_demo(db_url: str, model_dir, corpus, tmp_path) -> None:
    argv = ["demo", "--quick", "--no-serve", "--model", str(model_dir), "--layer", "1",
            "--corpus", str(corpus), "--db", db_url, "--out", str(tmp_path / "sae")]
    assert main(argv) == 0


def check_pages(db_url: str) -> None:
    with TestClient(create_app(Settings(db_url=db_url, live=False))) as client:
        releases = client.get("/api/v1/releases").json()
        assert releases["count"] == 1  # one release: two widths on layer 1, small SAEs on 0 and 2
        [release] = releases["data"]
        assert (release["layers"], release["widths"]) == ([0, 1, 2], [32, 64, 128])
        cells = [(sae["layer"], sae["d_sae"]) for sae in release["saes"]]
        assert cells == [(0, 32), (1, 64), (1, 128), (2, 32)]
        sae = release["saes"][2]
        assert 'class="saes release"' in client.get("/").text
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
    # Short budgets train in small batches at a raised rate (see demo.BUDGETS), every SAE alike.
    for folder in (tmp_path / "sae").iterdir():
        training = json.loads((folder / "cfg.json").read_text())["saescope"]["training"]
        cfg = TrainConfig(architecture=training["architecture"], width=training["width"], k=training["k"])
        assert training["batch_size"] == TINY.batch_size
        assert training["lr"] == pytest.approx(cfg.resolved_lr(training["width"]) * TINY.lr_scale)
    # Precompute read its tokens from the caches training built: no second forward pass.
    engine = create_engine_for(url)
    with engine.connect() as conn:
        sources = conn.scalars(sa.select(SaeRow.precompute_cfg)).all()
    engine.dispose()
    assert [cfg.get("activations") for cfg in sources] == ["fp16 cache"] * 4
    # A second run reuses every stage and is done at once.
    run_demo(url, llama_dir, text_corpus, tmp_path)
    check_pages(url)
    if embeddings.embedder_available():
        check_background_embedding(url, tmp_path)


def embedded_and_labelled(engine) -> tuple[int, int]:
    with engine.connect() as conn:
        embedded = conn.scalar(sa.select(sa.func.count()).select_from(FeatureEmbeddingRow))
        labelled = conn.scalar(sa.select(sa.func.count()).where(FeatureRow.label.is_not(None)))
    return embedded, labelled


def check_background_embedding(url: str, tmp_path) -> None:
    """Without --no-serve the demo serves before the label vectors are written; serve's
    background process then writes every SAE's, as --no-serve did before returning."""
    engine = create_engine_for(url)
    embedded, labelled = embedded_and_labelled(engine)
    assert embedded == labelled > 0  # --no-serve: all written before the demo returned
    with engine.begin() as conn:
        conn.execute(sa.delete(FeatureEmbeddingRow))
        names = conn.scalars(sa.select(SaeRow.name).order_by(SaeRow.id)).all()
    watcher = VectorWatcher(url, tmp_path / "vectors.log")
    assert watcher.awaiting() == names
    child = watcher.check()
    assert child.wait(timeout=300) == 0, (tmp_path / "vectors.log").read_text()
    assert embedded_and_labelled(engine) == (labelled, labelled)
    assert watcher.check() is None and watcher.awaiting() == []
    engine.dispose()


@pytest.mark.postgres
def test_demo_into_postgres(tiny_budget, llama_dir, text_corpus, tmp_path, pg_schema):
    run_demo(pg_schema, llama_dir, text_corpus, tmp_path)
    check_pages(pg_schema)
