"""The app factory: settings, opening the store, the browse-only server without torch, errors."""

from __future__ import annotations

import gc
import subprocess
import sys
import types
from contextlib import asynccontextmanager

import pytest
import sqlalchemy as sa
from fastapi import APIRouter
from fastapi.testclient import TestClient

from app import main
from app.main import create_app, open_store
from app.settings import Settings
from sae_core.store.db import StoreError


def test_browse_only_server_serves_without_importing_torch_or_numba(sqlite_store):
    """A web worker holds neither the models nor the labels' rule search (numba, ~55 MB)."""
    script = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from app.main import create_app\n"
        "from app.settings import Settings\n"
        f"with TestClient(create_app(Settings(db_url={sqlite_store.url!r}, live=False))) as client:\n"
        f"    assert client.get('/saes/{sqlite_store.sae}/features/1').status_code == 200\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numba') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SAESCOPE_DB_URL", "sqlite:///elsewhere.db")
    monkeypatch.setenv("SAESCOPE_LIVE", "false")
    monkeypatch.setenv("SAESCOPE_MAX_PROMPT_TOKENS", "64")
    settings = Settings()
    assert (settings.db_url, settings.live, settings.max_prompt_tokens) == (
        "sqlite:///elsewhere.db",
        False,
        64,
    )
    assert settings.write_token is None
    assert all(field.description for field in Settings.model_fields.values())


def test_missing_or_empty_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no store at"):
        open_store(Settings(db_url=f"sqlite:///{tmp_path / 'missing.db'}"))
    empty = tmp_path / "empty.db"
    sa.create_engine(f"sqlite:///{empty}").connect().close()
    with pytest.raises(StoreError, match="holds no saescope store"):
        open_store(Settings(db_url=f"sqlite:///{empty}"))


def test_unreachable_postgres_is_a_clear_error():
    with pytest.raises(StoreError, match="cannot open the store at postgresql"):
        open_store(
            Settings(db_url="postgresql+psycopg://nobody:secret@127.0.0.1:1/none?connect_timeout=2")
        )


def test_sqlite_is_read_only_without_a_write_token(sqlite_store):
    engine = open_store(Settings(db_url=sqlite_store.url))
    try:
        with pytest.raises(sa.exc.OperationalError, match="readonly"), engine.begin() as conn:
            conn.exec_driver_sql("UPDATE features SET label = 'changed'")
    finally:
        engine.dispose()


def test_unexpected_errors_answer_500_without_a_traceback(sqlite_store):
    app = create_app(Settings(db_url=sqlite_store.url, live=False))

    @app.get("/api/v1/boom")
    def boom():
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/api/v1/boom")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error; the server log has the details"}


def test_extension_routers_are_included_with_their_lifespan(sqlite_store, monkeypatch):
    events = []
    module = types.ModuleType("app.routes.extra")
    module.router = APIRouter()

    @module.router.get("/extra")
    def extra():
        return {"engine_open": hasattr(app.state, "engine")}

    @asynccontextmanager
    async def lifespan(app):
        events.append("start")
        yield
        events.append("stop")

    module.lifespan = lifespan
    monkeypatch.setattr(main, "EXTENSIONS", (module,))
    app = create_app(Settings(db_url=sqlite_store.url, live=False))
    with TestClient(app) as client:
        assert client.get("/extra").json() == {"engine_open": True}
    assert events == ["start", "stop"]


def test_objects_built_at_start_up_are_frozen_while_serving(sqlite_store):
    before = gc.get_freeze_count()
    with TestClient(create_app(Settings(db_url=sqlite_store.url, live=False))) as client:
        assert client.get(f"/saes/{sqlite_store.sae}").status_code == 200
        assert gc.get_freeze_count() > before + 10_000  # the modules, the app and its routes
    assert gc.get_freeze_count() == before


def test_sqlite_is_read_through_a_memory_map(sqlite_store):
    with TestClient(create_app(Settings(db_url=sqlite_store.url, live=False))) as client:
        with client.app.state.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA mmap_size").scalar() > 100 << 20


def test_numpy_math_runs_on_one_thread_while_serving(sqlite_store):
    from threadpoolctl import threadpool_info

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    before = blas_threads()
    with TestClient(create_app(Settings(db_url=sqlite_store.url, live=False))):
        assert blas_threads() == {1}
    assert blas_threads() == before
