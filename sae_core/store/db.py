"""The store: the one contract between precompute (writes) and serving (reads).

SQLite is the embedded default, PostgreSQL the self-hosted one; the same tables serve both.
Arrays that are only ever read whole (token ids of a context, per-token activations) are packed
into compact binary blobs; small per-feature lists (histograms, logit effects, neighbours) are JSON.

Packed formats (little-endian):
- context tokens: int32 per token, BOS included;
- example activations: ``uint16 n`` + ``n × uint16 positions`` + ``n × uint8 levels`` where
  ``value = level / 255 · max_act`` (max_act is stored exactly in its own column, and the max
  position always carries level 255).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sae_core.errors import SaescopeError

MIGRATIONS = Path(__file__).with_name("migrations")  # Alembic scripts; versions/ holds one file per revision


# The widest integer every column holds on both backends (Integer is 32-bit on PostgreSQL):
# anything that reaches a query as a number is bounded by it first.
INT_MAX = 2**31 - 1


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(sa.types.TypeDecorator):
    """``DateTime(timezone=True)`` that reads back aware on SQLite too (which stores no zone):
    every timestamp the store writes is UTC, so a naive one read back is UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    pass


class SubjectModelRow(Base):
    """A subject language model whose vocabulary the store holds."""

    __tablename__ = "subject_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)  # spec, e.g. "smollm2-135m"
    source: Mapped[str] = mapped_column(Text)
    architecture: Mapped[str] = mapped_column(String(64))
    d_model: Mapped[int] = mapped_column(Integer)
    n_layers: Mapped[int] = mapped_column(Integer)
    vocab_size: Mapped[int] = mapped_column(Integer)
    bos_token_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class VocabRow(Base):
    """Token id -> display text, so pages render without loading the tokenizer."""

    __tablename__ = "vocab"

    model_id: Mapped[int] = mapped_column(ForeignKey("subject_models.id", ondelete="CASCADE"), primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)  # decoded text of the single token ("Ġfoo" -> " foo")
    # The token's bytes when they are not text alone (part of a character split across tokens);
    # pages join a run of them before decoding (sae_core.inputs.token_bytes).
    raw: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class ReleaseRow(Base):
    """A named set of SAEs on one subject model (layers x widths), precomputed together.
    An SAE precomputed alone is a release of one, named after the SAE."""

    __tablename__ = "releases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)  # url slug, e.g. "smollm2-135m-demo"
    model_id: Mapped[int] = mapped_column(ForeignKey("subject_models.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SaeRow(Base):
    """One SAE and the run that precomputed it."""

    __tablename__ = "saes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)  # url slug, e.g. "smollm2-135m-l15-topk-8192"
    model_id: Mapped[int] = mapped_column(ForeignKey("subject_models.id"))
    # None only while a precompute is unfinished: publishing puts every SAE in a release
    release_id: Mapped[int | None] = mapped_column(
        ForeignKey("releases.id", ondelete="SET NULL"), nullable=True
    )
    layer: Mapped[int] = mapped_column(Integer)
    hook_name: Mapped[str] = mapped_column(String(200))
    architecture: Mapped[str] = mapped_column(String(32))
    d_in: Mapped[int] = mapped_column(Integer)
    d_sae: Mapped[int] = mapped_column(Integer)
    k: Mapped[int | None] = mapped_column(Integer, nullable=True)
    l1_coeff: Mapped[float | None] = mapped_column(Float, nullable=True)
    path: Mapped[str] = mapped_column(Text)  # SAE folder it was loaded from
    train_cfg: Mapped[dict] = mapped_column(JSON, default=dict)  # training config, tokens seen
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)  # metrics.json of the SAE folder
    corpus: Mapped[dict] = mapped_column(JSON, default=dict)  # corpus spec, ctx_len, seed, n_contexts
    precompute_cfg: Mapped[dict] = mapped_column(JSON, default=dict)  # top_k, bins, tokens, seed
    n_tokens: Mapped[int] = mapped_column(Integer, default=0)  # non-special tokens precomputed over
    density_hist: Mapped[dict] = mapped_column(JSON, default=dict)  # {"edges": [...], "counts": [...]} of log10 density
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | complete
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # When its feature map was last written (``mark_mapped``, in the same transaction): a served
    # map's version, so a server tells a rebuilt map without reading its points. None: no map.
    map_built_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class ContextRow(Base):
    """A token window, stored once and shared by every example that shows it."""

    __tablename__ = "contexts"

    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # index of the context in the corpus
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int32 LE, see pack_tokens


class FeatureRow(Base):
    __tablename__ = "features"

    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)  # tokens where it fired (> 0)
    density: Mapped[float] = mapped_column(Float, default=0.0)  # count / saes.n_tokens
    max_act: Mapped[float] = mapped_column(Float, default=0.0)
    mean_act: Mapped[float] = mapped_column(Float, default=0.0)  # mean over the tokens where it fired
    act_hist: Mapped[dict] = mapped_column(JSON, default=dict)  # {"edges": [...], "counts": [...]} nonzero acts
    intervals: Mapped[list] = mapped_column(JSON, default=list)  # [{"bin", "lo", "hi", "share", "count"}]
    logit_top: Mapped[list] = mapped_column(JSON, default=list)  # [[token_id, value], ...] descending
    logit_bottom: Mapped[list] = mapped_column(JSON, default=list)  # [[token_id, value], ...] ascending
    logit_hist: Mapped[dict] = mapped_column(JSON, default=dict)
    neighbours_cos: Mapped[list] = mapped_column(JSON, default=list)  # [[idx, cosine], ...]
    neighbours_coact: Mapped[list] = mapped_column(JSON, default=list)  # [[idx, score], ...]
    label: Mapped[str | None] = mapped_column(Text, nullable=True)
    label_source: Mapped[str | None] = mapped_column(String(64), nullable=True)  # auto | llm:<model> | human:<who>
    label_precision: Mapped[float | None] = mapped_column(Float, nullable=True)
    label_recall: Mapped[float | None] = mapped_column(Float, nullable=True)
    label_f1: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (
        Index("ix_features_density", "sae_id", "density"),
        Index("ix_features_max_act", "sae_id", "max_act"),
        Index("ix_features_label_f1", "sae_id", "label_f1"),
    )


class ExampleRow(Base):
    """A context shown on a feature page: a top example or an interval sample."""

    __tablename__ = "examples"

    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    feature_idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # "top" | "interval"
    bin: Mapped[int] = mapped_column(Integer, primary_key=True)  # interval bin; 0 for top
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    context_id: Mapped[int] = mapped_column(Integer)
    max_act: Mapped[float] = mapped_column(Float)  # exact
    max_pos: Mapped[int] = mapped_column(Integer)
    acts: Mapped[bytes] = mapped_column(LargeBinary)  # see pack_acts


class TokenFeatureRow(Base):
    """Which features fire most on a vocabulary token (search by token)."""

    __tablename__ = "token_features"

    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    feature_idx: Mapped[int] = mapped_column(Integer)
    mean_act: Mapped[float] = mapped_column(Float)  # mean activation on this token (zeros included)
    count: Mapped[int] = mapped_column(Integer)  # firings on this token


class FeatureWordRow(Base):
    """The vocabulary tokens a feature fires on most often over the precompute corpus, most firings
    first, with how often: the words labels add beyond the feature's examples
    (``sae_core.labels.corpus_words``). One row per feature, its lists packed (``pack_tokens``):
    a row per token took 36 bytes a word and was most of what reading the words cost."""

    __tablename__ = "feature_word_lists"

    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    feature_idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int32 (n,)
    counts: Mapped[bytes] = mapped_column(LargeBinary)  # int32 (n,): firings on each token
    occurrences: Mapped[bytes] = mapped_column(LargeBinary)  # int32 (n,): each token's in the corpus


# ---------------------------------------------------------------------------------------------
# Labels and their search index (labels issue; sae_core.labels.run writes them). Every label a feature
# was ever given lives in `labels`; `features.label*` holds the current one.


class LabelRow(Base):
    """One label of one feature, machine or human, with how well it predicts the feature firing."""

    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"))
    feature_idx: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(64))  # auto | llm:<model> | human:<who>
    author: Mapped[str] = mapped_column(String(200))  # person for human edits, else the program
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    precision: Mapped[float | None] = mapped_column(Float, nullable=True)  # None: nothing to score
    recall: Mapped[float | None] = mapped_column(Float, nullable=True)
    f1: Mapped[float | None] = mapped_column(Float, nullable=True)
    rule: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # see sae_core.labels.rules

    __table_args__ = (Index("ix_labels_feature", "sae_id", "feature_idx", "id"),)


class FeatureEmbeddingRow(Base):
    """Sentence embedding of a feature's latest label of one kind, for semantic search."""

    __tablename__ = "feature_embeddings"

    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)
    feature_idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # auto | llm | human
    text: Mapped[str] = mapped_column(Text)  # what was embedded; re-embedded when it changes
    model: Mapped[str] = mapped_column(String(100))
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32 LE, unit norm
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class GraphRow(Base):
    """A finished attribution graph of a release (``sae_core.store.graphs``)."""

    __tablename__ = "graphs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)  # its shareable URL: /graphs/<slug>
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id", ondelete="CASCADE"))
    # sha256 of what was asked (release, prompt, target, thresholds, limits): the same request
    # reuses the graph. None for an imported graph.
    request_key: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    prompt: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16))  # "computed" | "imported"
    document: Mapped[str] = mapped_column(Text)  # the graph JSON (sae_core.live.graph_json)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_graphs_release", "release_id", "created_at"),)


# ---------------------------------------------------------------------------------------------
# Packed arrays


def pack_tokens(token_ids) -> bytes:
    return np.asarray(token_ids, dtype="<i4").tobytes()


def unpack_tokens(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<i4")


def pack_acts(values) -> tuple[bytes, float, int]:
    """Per-token activations (seq,) -> (blob, max_act exact, max_pos). Zeros are not stored."""
    values = np.asarray(values, dtype=np.float32)
    if values.size and values.max() > 0:
        return pack_acts_rows(values[None])[0]
    max_pos = int(values.argmax()) if values.size else 0
    max_act = float(values[max_pos]) if values.size else 0.0
    return np.zeros(1, dtype="<u2").tobytes(), max_act, max_pos  # nothing fired: no positions


def pack_acts_rows(dense: np.ndarray) -> list[tuple[bytes, float, int]]:
    """``pack_acts`` of every row of (rows, seq) float32 activations, each row with a positive
    maximum, in one numpy pass over the rows (a call per row spent ~70 us on numpy's per-call
    overhead; precompute packs 184k examples for a 4,096-wide SAE at 100k tokens)."""
    max_pos = dense.argmax(axis=1)  # the first maximum
    max_act = dense[np.arange(len(dense)), max_pos]  # (rows,) float32
    row, position = np.nonzero(dense > 0)  # row-major: positions ascending within each row
    levels = np.clip(np.rint(dense[row, position] / max_act[row] * 255), 1, 255).astype("u1")
    ends = np.cumsum(np.bincount(row, minlength=len(dense))).tolist()
    position_bytes, level_bytes = position.astype("<u2").tobytes(), levels.tobytes()
    packed, start = [], 0
    for end, act, pos in zip(ends, max_act.tolist(), max_pos.tolist(), strict=True):
        header = (end - start).to_bytes(2, "little")  # the blob: n, n positions, n levels
        packed.append((header + position_bytes[2 * start : 2 * end] + level_bytes[start:end], act, pos))
        start = end
    return packed


def unpack_levels_rows(blobs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``unpack_levels`` of many blobs in one numpy pass over them joined (a call per blob costs a
    few numpy calls; a family page decodes ~600, a chunk of labels thousands): how many positions
    each blob has, (rows,), then every blob's positions and levels end to end, (n,) int64 and (n,)
    uint8. Entry k of a blob of n sits at byte 2 + 2k (position) and 2 + 2n + k (level)."""
    lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    start = np.cumsum(lengths) - lengths  # where each blob begins
    counts = _uint16_at(data, start)
    row = np.repeat(np.arange(len(blobs)), counts)  # (n,) the blob of each entry
    k = np.arange(row.size) - np.repeat(np.cumsum(counts) - counts, counts)  # its rank in its blob
    positions = _uint16_at(data, start[row] + 2 + 2 * k)
    return counts, positions, data[start[row] + 2 + 2 * counts[row] + k]


def _uint16_at(data: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The little-endian uint16s of ``data`` (bytes) at offsets ``at``, as int64."""
    return data[at].astype(np.int64) | data[at + 1].astype(np.int64) << 8


def unpack_levels(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The positions where ``pack_acts``'s values fired, and their levels there (1-255, each the
    value / max_act * 255, rounded): (n,) uint16 and (n,) uint8."""
    n = int.from_bytes(blob[:2], "little")
    positions = np.frombuffer(blob, dtype="<u2", count=n, offset=2)
    levels = np.frombuffer(blob, dtype="u1", count=n, offset=2 + 2 * n)
    return positions, levels


def unpack_acts(blob: bytes, max_act: float, length: int) -> np.ndarray:
    """Inverse of ``pack_acts``: a dense (length,) float32 array."""
    positions, levels = unpack_levels(blob)
    out = np.zeros(length, dtype=np.float32)
    out[positions] = levels.astype(np.float32) / 255.0 * max_act
    return out


# ---------------------------------------------------------------------------------------------
# Engine and schema


class StoreError(SaescopeError):
    """The store cannot be opened or used as asked."""


def default_db_url() -> str:
    """``SAESCOPE_DB_URL`` when set (docker-compose sets it), else ``saescope.db`` in the current folder."""
    return os.environ.get("SAESCOPE_DB_URL") or "sqlite:///saescope.db"


BACKENDS = ("sqlite", "postgresql")


def check_store_url(url: str, *, create: bool) -> None:
    """Refuse, in one line, a store URL no command can use: not a URL, a backend other than SQLite
    or PostgreSQL, a SQLite file that is missing (``create=False``: commands that read a store)
    or that could not be created or written, a PostgreSQL server that does not answer or has no
    such database. Creates nothing."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise StoreError(
            f"--db {url!r} is not a database URL; e.g. sqlite:///saescope.db or "
            "postgresql+psycopg://user@host/db"
        ) from None
    backend = parsed.get_backend_name()
    if backend not in BACKENDS:
        raise StoreError(f"--db {url!r}: saescope stores live in SQLite or PostgreSQL, not {backend}")
    if backend == "sqlite":
        _check_sqlite_path(parsed.database or "", create=create)
        return
    engine = sa.create_engine(url)
    try:
        with engine.connect():
            pass
    except sa.exc.DBAPIError as err:
        reason = str(err.orig).strip().splitlines()[0] if err.orig else str(err)
        shown = parsed.render_as_string(hide_password=True)
        raise StoreError(f"cannot open the store at {shown}: {reason}") from None
    except ModuleNotFoundError as err:
        raise StoreError(f"--db {url!r} needs the driver {err.name!r}; pip install it") from None
    finally:
        engine.dispose()


def _check_sqlite_path(database: str, *, create: bool) -> None:
    if database in ("", ":memory:"):
        raise StoreError("--db names no SQLite file; e.g. sqlite:///saescope.db")
    path = Path(database)
    if path.is_dir():
        raise StoreError(f"--db {path} is a folder, not a SQLite file")
    if not path.exists():
        if not create:
            raise StoreError(f"no store at {path}; run `saescope precompute --db ...` first")
        if not path.parent.is_dir():
            raise StoreError(f"--db {path}: the folder {path.parent} does not exist; create it first")
        if not os.access(path.parent, os.W_OK | os.X_OK, effective_ids=True):
            raise StoreError(f"--db {path}: cannot create a file in {path.parent} (permission denied)")
        return
    if not os.access(path, os.R_OK, effective_ids=True):
        raise StoreError(f"--db {path}: cannot read the file (permission denied)")
    if create and not os.access(path, os.W_OK, effective_ids=True):
        raise StoreError(f"--db {path} is read-only; make it writable or use another --db")


@contextmanager
def writer_lock(engine: Engine, name: str) -> Iterator[None]:
    """Hold the store's lock for writing SAE ``name``, or refuse at once if another process holds
    it: PostgreSQL's advisory lock on the name (released with its connection, so a killed run
    leaves none), on SQLite an exclusive flock of the database file (SQLite has one writer)."""
    held = StoreError(
        f"another precompute of {name} is writing into this store; wait for it to finish, "
        "or stop it, and run again (it resumes)"
    )
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            key = conn.scalar(sa.text("select hashtext(:name)"), {"name": f"saescope:{name}"})
            if not conn.scalar(sa.text("select pg_try_advisory_lock(:key)"), {"key": key}):
                raise held
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sa.text("select pg_advisory_unlock(:key)"), {"key": key})
                conn.commit()
        return
    with open(engine.url.database, "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise held from None
        yield  # closing the file releases the lock


def driver_rows(session: Session, statement: sa.Select) -> list[tuple]:
    """The rows of ``statement``, in the session's transaction, as plain tuples straight from the
    database driver: for bulk reads of numbers and blobs, where SQLAlchemy's rows cost twice the
    query itself (the demo 4k SAE's 180k examples: 0.68 s against 0.21 s). Its parameters must
    be integers, which are written into the SQL."""
    compiled = statement.compile(dialect=session.get_bind().dialect)
    for value in compiled.params.values():
        values = value if isinstance(value, list | tuple) else [value]
        if not all(isinstance(v, int) for v in values):
            raise TypeError(f"driver_rows takes integer parameters only, not {value!r}")
    sql = statement.compile(
        dialect=session.get_bind().dialect, compile_kwargs={"literal_binds": True}
    )
    cursor = session.connection().connection.cursor()
    try:
        cursor.execute(str(sql))
        return cursor.fetchall()
    finally:
        cursor.close()


def create_engine_for(url: str, *, readonly: bool = False) -> Engine:
    """One engine per process. SQLite gets WAL (readers never block the writer) and foreign keys;
    ``readonly`` opens SQLite read-only so serving can never write by accident."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if readonly:
            if not Path(path).is_file():
                raise StoreError(f"no store at {path}; run `saescope precompute` first")
            engine = sa.create_engine(
                f"sqlite:///file:{path}?mode=ro&uri=true", connect_args={"check_same_thread": False}
            )
        else:
            engine = sa.create_engine(url, connect_args={"check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            if not readonly:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def alembic_config(connection) -> AlembicConfig:
    """Alembic configuration that runs the migrations on ``connection`` (no alembic.ini needed)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def schema_revision(engine: Engine) -> str | None:
    """The Alembic revision the store is at (None for an empty database)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    """The schema revision this saescope writes and reads."""
    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision: creates it on an empty database, upgrades an older
    one in place, and refuses a store written by a newer saescope (never touching it)."""
    scripts = ScriptDirectory(str(MIGRATIONS))
    head = scripts.get_current_head()
    known = {rev.revision for rev in scripts.walk_revisions()}
    current = schema_revision(engine)
    if current is not None and current not in known:
        raise StoreError(
            f"the store is at schema revision {current!r}, which this saescope does not know "
            f"(it knows up to {head!r}); upgrade saescope or use another --db"
        )
    if current is None and sa.inspect(engine).has_table("saes"):
        raise StoreError("the store has saescope tables but no schema revision; move it aside and precompute again")
    if current == head:
        return
    with engine.begin() as conn:
        alembic_command.upgrade(alembic_config(conn), "head")
