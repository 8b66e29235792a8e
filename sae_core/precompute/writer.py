"""Precompute's side of the store: the staging row and the final swap.

A run writes under a staging SAE row named ``<name>~staging`` (status "running"), so readers, which
list only complete SAEs, never see half a result. Checkpoints of the streaming accumulators are
files beside the activation spill (sae_core.precompute.checkpoint), named by the staging row. The
results go in one transaction that also deletes the SAE it replaces (if any) and renames the
staging row to ``<name>``: a kill at any moment leaves either the old SAE or the new one, and
rerunning the same command picks up from the last checkpoint.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from sae_core.store.db import (
    ContextRow,
    ExampleRow,
    FeatureRow,
    FeatureWordRow,
    SaeRow,
    SubjectModelRow,
    TokenFeatureRow,
    VocabRow,
    utcnow,
)
from sae_core.store.releases import join_release

INSERT_BATCH = 2000  # rows per executemany: large enough to amortise round trips, small in memory
STAGING_SUFFIX = "~staging"


def staging_name(name: str) -> str:
    return name + STAGING_SUFFIX


def complete_sae_id(engine: Engine, name: str) -> int | None:
    with engine.connect() as conn:
        return conn.scalar(sa.select(SaeRow.id).where(SaeRow.name == name, SaeRow.status == "complete"))


def file_complete(engine: Engine, sae_id: int, release: str) -> None:
    """File an SAE that is already complete into ``release`` (a precompute that skips it)."""
    with engine.begin() as conn:
        join_release(conn, sae_id, release)


def batched(rows: Iterable[dict], size: int = INSERT_BATCH) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def insert_rows(conn: Connection, table, rows: Iterable[dict]) -> int:
    """Insert row dicts, all with the same keys, into ``table`` (an ORM class) through the
    driver's own executemany, ``INSERT_BATCH`` rows at a time; how many were inserted. JSON columns come as their text, ``json.dumps`` of the value
    (what SQLAlchemy's JSON type writes on SQLite and PostgreSQL alike, so the stores are byte for
    byte the same): SQLAlchemy's per-row parameter processing (construct_params, a JSON
    serialiser per column) took longer than SQLite's inserts themselves."""
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return 0
    columns = list(first)
    quote = conn.dialect.identifier_preparer.quote
    marker = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    sql = (
        f"INSERT INTO {quote(table.__tablename__)} ({', '.join(map(quote, columns))}) "
        f"VALUES ({', '.join([marker] * len(columns))})"
    )
    values = operator.itemgetter(*columns)  # row -> tuple in column order (tables have >= 2 columns)
    n = 0
    for chunk in batched(itertools.chain([first], rows)):
        conn.exec_driver_sql(sql, [values(row) for row in chunk])
        n += len(chunk)
    return n


def ensure_model(engine: Engine, info: dict, bos_token_id: int | None, vocab: Callable[[], list[dict]]) -> int:
    """The subject model's row, created with its vocabulary rows (``vocab()``: token_id, text and
    raw, decoded only then) the first time it is seen."""
    with engine.begin() as conn:
        model_id = conn.scalar(sa.select(SubjectModelRow.id).where(SubjectModelRow.name == info["name"]))
        if model_id is not None:
            return model_id
        model_id = conn.scalar(
            sa.insert(SubjectModelRow)
            .values(
                name=info["name"],
                source=info["source"],
                architecture=info["architecture"],
                d_model=info["d_model"],
                n_layers=info["n_layers"],
                vocab_size=info["vocab_size"],
                bos_token_id=bos_token_id,
                created_at=utcnow(),
            )
            .returning(SubjectModelRow.id)
        )
        insert_rows(conn, VocabRow, ({"model_id": model_id, **row} for row in vocab()))
        return model_id


def open_staging(engine: Engine, name: str, sae_values: dict) -> int:
    """The id of the staging row for ``name``. A staging row made with other settings
    (``precompute_cfg`` differs) is dropped and started again."""
    with engine.begin() as conn:
        row = conn.execute(
            sa.select(SaeRow.id, SaeRow.precompute_cfg).where(SaeRow.name == staging_name(name))
        ).first()
        if row is not None and row.precompute_cfg == sae_values["precompute_cfg"]:
            return row.id
        if row is not None:
            conn.execute(sa.delete(SaeRow).where(SaeRow.id == row.id))
        return conn.scalar(
            sa.insert(SaeRow)
            .values(name=staging_name(name), status="running", created_at=utcnow(), **sae_values)
            .returning(SaeRow.id)
        )


class StoreRows(NamedTuple):
    """Everything one SAE adds to the store besides its own row, as iterables of row dicts."""

    features: Iterable[dict]
    examples: Iterable[dict]
    contexts: Iterable[dict]
    token_features: Iterable[dict]
    feature_words: Iterable[dict]


def publish(engine: Engine, sae_id: int, name: str, release: str, sae_updates: dict, rows: StoreRows) -> None:
    """Write the results under the staging row and swap it in, into the release ``release``, all in
    one transaction."""
    with engine.begin() as conn:
        for table in (FeatureRow, ExampleRow, ContextRow, TokenFeatureRow, FeatureWordRow):
            conn.execute(sa.delete(table).where(table.sae_id == sae_id))
        insert_rows(conn, FeatureRow, rows.features)
        insert_rows(conn, ExampleRow, rows.examples)
        insert_rows(conn, ContextRow, rows.contexts)
        insert_rows(conn, TokenFeatureRow, rows.token_features)
        insert_rows(conn, FeatureWordRow, rows.feature_words)
        conn.execute(sa.delete(SaeRow).where(SaeRow.name == name))
        conn.execute(
            sa.update(SaeRow)
            .where(SaeRow.id == sae_id)
            .values(name=name, status="complete", completed_at=utcnow(), **sae_updates)
        )
        join_release(conn, sae_id, release)


def reclaim_space(engine: Engine) -> None:
    """Give back the pages that checkpoints and replaced rows freed: SQLite keeps them in the file
    (on the demo store, 126 of 170 MB) until VACUUM. Postgres reuses them by itself. Run once
    after a precompute has published all its SAEs: VACUUM rewrites the whole file, so one per
    SAE rewrote the SAEs published before it again and again."""
    if engine.dialect.name == "sqlite":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM")
