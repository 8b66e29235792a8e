"""Each feature's words (``feature_words``, a row per token) become one row per feature with its
lists packed as int32 arrays (``feature_word_lists``): at 128 words a feature, the rows took 71 MB
of the demo release's store and their reading most of what the words cost a labelling run. The
rows a store holds are packed on the way, in the order of their ranks.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

import itertools

import numpy as np
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

ROWS_PER_READ = 10_000
FEATURES_PER_WRITE = 1_000

_rows = sa.table(
    "feature_words",
    sa.column("sae_id", sa.Integer),
    sa.column("feature_idx", sa.Integer),
    sa.column("rank", sa.Integer),
    sa.column("token_id", sa.Integer),
    sa.column("count", sa.Integer),
    sa.column("occurrences", sa.Integer),
)
_lists = sa.table(
    "feature_word_lists",
    sa.column("sae_id", sa.Integer),
    sa.column("feature_idx", sa.Integer),
    sa.column("token_ids", sa.LargeBinary),
    sa.column("counts", sa.LargeBinary),
    sa.column("occurrences", sa.LargeBinary),
)


def _pack(values) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


def _unpack(blob) -> list[int]:
    return np.frombuffer(blob, dtype="<i4").tolist()


def _batches(items, size: int):
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def upgrade() -> None:
    op.create_table(
        "feature_word_lists",
        sa.Column("sae_id", sa.Integer, sa.ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("feature_idx", sa.Integer, primary_key=True),
        sa.Column("token_ids", sa.LargeBinary, nullable=False),
        sa.Column("counts", sa.LargeBinary, nullable=False),
        sa.Column("occurrences", sa.LargeBinary, nullable=False),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(_rows.c.sae_id, _rows.c.feature_idx, _rows.c.token_id, _rows.c.count, _rows.c.occurrences).order_by(
            _rows.c.sae_id, _rows.c.feature_idx, _rows.c.rank
        ),
        execution_options={"yield_per": ROWS_PER_READ},  # this statement alone: streamed
    )
    packed = (
        {
            "sae_id": sae_id,
            "feature_idx": feature_idx,
            "token_ids": _pack([r.token_id for r in words]),
            "counts": _pack([r.count for r in words]),
            "occurrences": _pack([r.occurrences for r in words]),
        }
        for (sae_id, feature_idx), group in itertools.groupby(rows, key=lambda r: (r.sae_id, r.feature_idx))
        for words in [list(group)]
    )
    for batch in _batches(packed, FEATURES_PER_WRITE):
        conn.execute(_lists.insert(), batch)
    op.drop_table("feature_words")


def downgrade() -> None:
    op.create_table(
        "feature_words",
        sa.Column("sae_id", sa.Integer, sa.ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("feature_idx", sa.Integer, primary_key=True),
        sa.Column("rank", sa.Integer, primary_key=True),
        sa.Column("token_id", sa.Integer, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("occurrences", sa.Integer, nullable=False),
    )
    conn = op.get_bind()
    lists = conn.execute(sa.select(_lists)).all()
    rows = (
        {"sae_id": row.sae_id, "feature_idx": row.feature_idx, "rank": rank, "token_id": t, "count": c, "occurrences": o}
        for row in lists
        for rank, (t, c, o) in enumerate(
            zip(_unpack(row.token_ids), _unpack(row.counts), _unpack(row.occurrences), strict=True)
        )
    )
    for batch in _batches(rows, ROWS_PER_READ):
        conn.execute(_rows.insert(), batch)
    op.drop_table("feature_word_lists")
