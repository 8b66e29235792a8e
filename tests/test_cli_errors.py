"""Every mistake a user can make on the command line ends in one clear line on stderr and a
non-zero exit, with no traceback and nothing created or changed (issue 19's list, one row each).

The commands run in this process (``sae_core.cli.main``), so a row costs a fraction of a second.
Rows about permissions run as the unprivileged user ``nobody`` when the tests run as root (root
reads and writes everything), on files that belong to root.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest
from alembic import command

from sae_core.cli import main
from sae_core.store.db import alembic_config, create_engine_for, migrate, writer_lock
from tests.conftest import PG_URL, _pg_available
from tests.live_support import random_sae

NOBODY = 65534
PG_DOWN = "postgresql+psycopg://postgres@127.0.0.1:1/test"  # nothing listens on port 1
PG_NO_DB = PG_URL.rsplit("/", 1)[0] + "/saescope_no_such_database"
PROGRESS = re.compile(r"\d(it|doc)/s\]|\?(it|doc)/s\]")  # tqdm's bars, on stderr by design
needs_pg = pytest.mark.skipif(not _pg_available(), reason="PostgreSQL is not reachable")


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # formatted with {ws} (the workspace), {model}, {sae}, {corpus}
    says: str  # a fragment of the one line
    unprivileged: bool = False  # run as nobody (a permissions problem)
    marks: tuple = ()


CASES = [
    # One store check, shared by precompute, label, migrate and serve.
    Case("db-not-a-url", "precompute --sae {sae} --db notaurl", "not a database URL"),
    Case("db-unknown-dialect", "label --sae x --db mysql://u@h/db", "SQLite or PostgreSQL, not mysql"),
    Case("db-not-a-url-demo", "demo --db notaurl", "not a database URL"),
    Case("db-missing-folder", "migrate --db sqlite:///{ws}/missing/store.db", "does not exist"),
    Case("db-missing-folder-serve", "serve --db sqlite:///{ws}/missing/store.db --no-live", "no store at"),
    Case("db-read-only", "precompute --sae {sae} --model {model} --layer 1 --db sqlite:///{ws}/readonly.db", "read-only", True),
    Case("db-read-only-migrate", "migrate --db sqlite:///{ws}/readonly.db", "read-only", True),
    Case("pg-unreachable", f"migrate --db {PG_DOWN}", "cannot open the store"),
    Case("pg-unreachable-label", f"label --sae x --db {PG_DOWN}", "cannot open the store"),
    Case("pg-unreachable-serve", f"serve --no-live --db {PG_DOWN}", "cannot open the store"),
    Case("pg-no-database", f"precompute --sae {{sae}} --db {PG_NO_DB}", "does not exist", marks=(needs_pg,)),
    Case("pg-no-database-serve", f"serve --no-live --db {PG_NO_DB}", "does not exist", marks=(needs_pg,)),
    Case("serve-old-schema", "serve --no-live --db sqlite:///{ws}/old.db", "saescope migrate"),
    Case("label-missing-sqlite", "label --sae x --db sqlite:///{ws}/nothing.db", "no store at"),
    # Options.
    Case("serve-port", "serve --port 70000", "not a TCP port"),
    Case("train-k-over-width", "train --model {model} --layer 1 --k 1000 --width 64 --out {ws}/run", "--k 1000"),
    Case("train-lr-nan", "train --model {model} --layer 1 --lr nan --out {ws}/run", "--lr"),
    Case("train-width-0", "train --model {model} --layer 1 --width 0 --out {ws}/run", "--width"),
    Case("train-out-file", "train --model {model} --layer 1 --corpus {corpus} --out {ws}/afile", "is a file"),
    Case("precompute-name-dots", "precompute --sae {sae} --model {model} --layer 1 --db sqlite:///{ws}/new.db --name ..", "--name"),
    # Inputs.
    Case(
        "corpus-unreadable",
        "train --model {model} --layer 1 --corpus {ws}/secret.txt --out {ws}/run",
        "Permission denied",
        True,
    ),
    Case(
        "corpus-nul-bytes",
        "train --model {model} --layer 1 --corpus {ws}/nul.txt --out {ws}/run",
        "NUL bytes",
    ),
    Case("cfg-unreadable", "precompute --sae {ws}/sae-cfg --db sqlite:///{ws}/open/new.db", "cfg.json: cannot read", True),
    Case("sae-folder-unreadable", "precompute --sae {ws}/sae-closed --db sqlite:///{ws}/open/new.db", "permission denied", True),
    Case(
        "weights-unreadable",
        "precompute --sae {ws}/sae-weights --db sqlite:///{ws}/open/new.db",
        "Permission denied",
        True,
    ),
    Case("foreign-k-over-d-sae", "precompute --sae {ws}/sae-k --db sqlite:///{ws}/new.db", "k=99"),
    # A second identical precompute while the first holds the store's lock.
    Case(
        "precompute-twice",
        "precompute --sae {sae} --model {model} --layer 1 --corpus {corpus} --db sqlite:///{ws}/busy.db --name busy",
        "another precompute of busy",
    ),
]


@pytest.fixture(scope="module")
def workspace(llama_dir, tmp_path_factory) -> Iterator[Path]:
    """Everything the rows read, in a folder nobody can traverse (root's pytest folders cannot)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (lazy imports,
    # done now: as nobody, transformers cannot write the module caches it imports through)
    ws = Path(tempfile.mkdtemp(prefix="saescope-cli-"))
    ws.chmod(0o755)
    model = ws / "model"
    shutil.copytree(llama_dir, model)
    sae = random_sae(32, d_sae=16, architecture="topk", k=4, layer=1)
    for name in ("sae", "sae-cfg", "sae-closed", "sae-weights", "sae-k"):
        sae.save(ws / name)
    foreign = json.loads((ws / "sae-k" / "cfg.json").read_text())
    (ws / "sae-k" / "cfg.json").write_text(json.dumps(foreign | {"k": 99}))
    corpus = ws / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 50)
    (ws / "secret.txt").write_text("private text\n")
    (ws / "nul.txt").write_bytes(b"\x00" * 4096)
    (ws / "afile").write_text("not a folder\n")
    readonly = create_engine_for(f"sqlite:///{ws}/readonly.db")
    migrate(readonly)
    readonly.dispose()
    old = create_engine_for(f"sqlite:///{ws}/old.db")
    with old.begin() as conn:
        command.upgrade(alembic_config(conn), "0002")
    old.dispose()
    busy = create_engine_for(f"sqlite:///{ws}/busy.db")
    migrate(busy)
    busy.dispose()
    (ws / "cache").mkdir()
    (ws / "open").mkdir()  # where nobody may create a store
    for path in [ws, *ws.rglob("*")]:  # readable by all, but for what the rows close
        path.chmod(0o755 if path.is_dir() else 0o644)
    (ws / "open").chmod(0o777)
    for closed in ("sae-cfg/cfg.json", "sae-closed", "sae-weights/sae_weights.safetensors", "secret.txt"):
        (ws / closed).chmod(0o700 if (ws / closed).is_dir() else 0o600)
    yield ws
    shutil.rmtree(ws)


def snapshot(folder: Path) -> dict[str, str]:
    """Every path below ``folder`` with a digest of its bytes (folders: ''). SQLite's -shm and
    an empty -wal are left out: any read-only reader of a WAL store leaves them, and they hold
    no data (a WAL with pages in it counts)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(folder.rglob("*"))
        if not (p.name.endswith("-shm") or (p.name.endswith("-wal") and p.stat().st_size == 0))
    }


@contextmanager
def as_nobody() -> Iterator[None]:
    if os.geteuid() != 0:
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's refusals
        return exit.code


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_a_mistake_is_one_line_and_changes_nothing(case, workspace, capsys, monkeypatch):
    monkeypatch.setenv("SAESCOPE_CACHE", str(workspace / "cache"))
    argv = case.argv.format(
        ws=workspace, model=workspace / "model", sae=workspace / "sae", corpus=workspace / "corpus.txt"
    ).split()
    before = snapshot(workspace)
    holding = case.id == "precompute-twice"
    with ExitStackOf(holding, workspace):
        with as_nobody() if case.unprivileged else nullcontext():
            code = run_cli(argv)
    err = capsys.readouterr().err
    assert code not in (0, None), err
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert case.says in lines[0], lines[0]
    assert snapshot(workspace) == before


@contextmanager
def ExitStackOf(holding: bool, workspace: Path) -> Iterator[None]:
    """For the twice row: the first run, holding the store's lock while the second starts."""
    if not holding:
        yield
        return
    engine = create_engine_for(f"sqlite:///{workspace}/busy.db")
    try:
        with writer_lock(engine, "busy"):
            yield
    finally:
        engine.dispose()


@needs_pg
def test_the_lock_on_postgres_refuses_a_second_writer_of_the_same_sae(pg_schema):
    engine, other = create_engine_for(pg_schema), create_engine_for(pg_schema)
    try:
        with writer_lock(engine, "busy"):
            with pytest.raises(Exception, match="another precompute of busy"):
                with writer_lock(other, "busy"):
                    pass
            with writer_lock(other, "another-sae"):  # other SAEs are not held up
                pass
        with writer_lock(other, "busy"):  # released with the first
            pass
    finally:
        engine.dispose()
        other.dispose()
