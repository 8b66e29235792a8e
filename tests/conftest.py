"""Shared fixtures: tiny models in temporary folders, an isolated cache, database URLs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import pytest
import torch

from tests.tiny import make_gpt2, make_llama

torch.set_num_threads(1)  # tests share 2 cores; one thread each is fastest overall
# huggingface_hub reads HF_HUB_OFFLINE once, when first imported (often by a session fixture,
# before the per-test fixture below runs): set it now, so no test waits on the network.
os.environ["HF_HUB_OFFLINE"] = "1"

PG_URL = os.environ.get("SAESCOPE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own SAESCOPE_CACHE, so nothing reads the user's real cache."""
    monkeypatch.setenv("SAESCOPE_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    return make_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def llama(llama_dir):
    from sae_core.inputs.subject import load_subject

    return load_subject(str(llama_dir))


def _pg_available() -> bool:
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(PG_URL)
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_url():
    """URL of the real PostgreSQL test database. CI starts the server; fail loudly if it is down."""
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {PG_URL}")
        pytest.skip(f"PostgreSQL is not reachable at {PG_URL}")
    return PG_URL


@contextmanager
def postgres_schema(pg_url: str, prefix: str = "t") -> Iterator[str]:
    """A fresh schema on the real PostgreSQL, dropped on exit even after a failure; yields ``pg_url``
    with every connection's search_path set to it. Unique names let engineers test at once."""
    import sqlalchemy as sa

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    separator = "&" if "?" in pg_url else "?"
    admin = sa.create_engine(pg_url)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"create schema {name}")
        try:
            yield f"{pg_url}{separator}options=-csearch_path%3D{name}"
        finally:
            with admin.begin() as conn:
                conn.exec_driver_sql(f"drop schema {name} cascade")
    finally:
        admin.dispose()


@pytest.fixture
def pg_schema(pg_url) -> Iterator[str]:
    """A fresh schema on the real PostgreSQL for one test (dropped afterwards); yields its URL."""
    with postgres_schema(pg_url) as url:
        yield url


@pytest.fixture
def make_pg_schema(pg_url) -> Iterator[Callable[[str], str]]:
    """For tests that need several schemas: each call makes one and returns its URL; all are
    dropped after the test."""
    with ExitStack() as stack:

        def make(prefix: str = "t") -> str:
            return stack.enter_context(postgres_schema(pg_url, prefix))

        yield make


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """A small folder of real text: a dozen standard-library modules (code, comments, docstrings)."""
    import shutil
    import sysconfig
    from pathlib import Path

    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "glob.py",
                 "heapq.py", "keyword.py", "linecache.py", "numbers.py", "shlex.py", "string.py"):
        shutil.copy(stdlib / name, folder / f"{name}.txt")
    return folder
