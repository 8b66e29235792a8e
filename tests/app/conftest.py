"""Fixtures: one synthetic store per backend (SQLite file, Postgres schema), and clients on it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from sae_core.store.db import create_engine_for
from tests.app.synthetic_store import StoreSpec, SyntheticStore, build_synthetic_store
from tests.conftest import postgres_schema


@dataclass(frozen=True)
class StoreUnderTest:
    """A built store: its URL and what was planted in it."""

    url: str
    planted: SyntheticStore

    @property
    def spec(self) -> StoreSpec:
        return self.planted.spec

    @property
    def sae(self) -> str:
        return self.planted.spec.sae_name


@pytest.fixture(scope="session")
def sqlite_store(tmp_path_factory) -> StoreUnderTest:
    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.db'}"
    engine = create_engine_for(url)
    planted = build_synthetic_store(engine, StoreSpec())
    engine.dispose()
    return StoreUnderTest(url, planted)


@pytest.fixture(scope="session")
def postgres_store(pg_url) -> Iterator[StoreUnderTest]:
    """The synthetic store in a schema of its own, so engineers testing at once never collide."""
    with postgres_schema(pg_url, "app_test") as url:
        engine = create_engine_for(url)
        planted = build_synthetic_store(engine, StoreSpec())
        engine.dispose()
        yield StoreUnderTest(url, planted)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def store(request) -> StoreUnderTest:
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture(scope="module")
def client(store) -> Iterator[TestClient]:
    with TestClient(
        create_app(Settings(db_url=store.url, live=False)), raise_server_exceptions=False
    ) as test_client:
        yield test_client
