"""The first released schema: models, vocabulary, SAEs, contexts, features, examples, token
index, labels, label embeddings, and the full-text index over labels.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)

# SQLite: an FTS5 table kept in sync with features.label by triggers (features is a rowid table).
SQLITE_FTS = [
    "CREATE VIRTUAL TABLE features_fts USING fts5(label, content='features', content_rowid='rowid')",
    """CREATE TRIGGER features_fts_ai AFTER INSERT ON features BEGIN
         INSERT INTO features_fts(rowid, label) VALUES (new.rowid, coalesce(new.label, ''));
       END""",
    """CREATE TRIGGER features_fts_ad AFTER DELETE ON features BEGIN
         INSERT INTO features_fts(features_fts, rowid, label) VALUES ('delete', old.rowid, coalesce(old.label, ''));
       END""",
    """CREATE TRIGGER features_fts_au AFTER UPDATE OF label ON features BEGIN
         INSERT INTO features_fts(features_fts, rowid, label) VALUES ('delete', old.rowid, coalesce(old.label, ''));
         INSERT INTO features_fts(rowid, label) VALUES (new.rowid, coalesce(new.label, ''));
       END""",
]
SQLITE_FTS_DROP = [
    "DROP TRIGGER IF EXISTS features_fts_au",
    "DROP TRIGGER IF EXISTS features_fts_ad",
    "DROP TRIGGER IF EXISTS features_fts_ai",
    "DROP TABLE IF EXISTS features_fts",
]
# Postgres: a GIN index on the label's tsvector ('simple': no stemming, labels are short).
POSTGRES_FTS = [
    "CREATE INDEX ix_features_label_tsv ON features USING gin (to_tsvector('simple', coalesce(label, '')))",
]


def sae_fk() -> sa.Column:
    return sa.Column("sae_id", sa.Integer, sa.ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True)


def upgrade() -> None:
    op.create_table(
        "subject_models",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("architecture", sa.String(64), nullable=False),
        sa.Column("d_model", sa.Integer, nullable=False),
        sa.Column("n_layers", sa.Integer, nullable=False),
        sa.Column("vocab_size", sa.Integer, nullable=False),
        sa.Column("bos_token_id", sa.Integer, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
    )
    op.create_table(
        "vocab",
        sa.Column(
            "model_id", sa.Integer, sa.ForeignKey("subject_models.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("token_id", sa.Integer, primary_key=True),
        sa.Column("text", sa.Text, nullable=False),
    )
    op.create_table(
        "saes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("subject_models.id"), nullable=False),
        sa.Column("layer", sa.Integer, nullable=False),
        sa.Column("hook_name", sa.String(200), nullable=False),
        sa.Column("architecture", sa.String(32), nullable=False),
        sa.Column("d_in", sa.Integer, nullable=False),
        sa.Column("d_sae", sa.Integer, nullable=False),
        sa.Column("k", sa.Integer, nullable=True),
        sa.Column("l1_coeff", sa.Float, nullable=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("train_cfg", sa.JSON, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("corpus", sa.JSON, nullable=False),
        sa.Column("precompute_cfg", sa.JSON, nullable=False),
        sa.Column("n_tokens", sa.Integer, nullable=False),
        sa.Column("density_hist", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("completed_at", TIMESTAMP, nullable=True),
    )
    op.create_table(
        "contexts",
        sae_fk(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("token_ids", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "features",
        sae_fk(),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("density", sa.Float, nullable=False),
        sa.Column("max_act", sa.Float, nullable=False),
        sa.Column("mean_act", sa.Float, nullable=False),
        sa.Column("act_hist", sa.JSON, nullable=False),
        sa.Column("intervals", sa.JSON, nullable=False),
        sa.Column("logit_top", sa.JSON, nullable=False),
        sa.Column("logit_bottom", sa.JSON, nullable=False),
        sa.Column("logit_hist", sa.JSON, nullable=False),
        sa.Column("neighbours_cos", sa.JSON, nullable=False),
        sa.Column("neighbours_coact", sa.JSON, nullable=False),
        sa.Column("label", sa.Text, nullable=True),
        sa.Column("label_source", sa.String(64), nullable=True),
        sa.Column("label_precision", sa.Float, nullable=True),
        sa.Column("label_recall", sa.Float, nullable=True),
        sa.Column("label_f1", sa.Float, nullable=True),
    )
    op.create_index("ix_features_density", "features", ["sae_id", "density"])
    op.create_index("ix_features_max_act", "features", ["sae_id", "max_act"])
    op.create_index("ix_features_label_f1", "features", ["sae_id", "label_f1"])
    op.create_table(
        "examples",
        sae_fk(),
        sa.Column("feature_idx", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(8), primary_key=True),
        sa.Column("bin", sa.Integer, primary_key=True),
        sa.Column("rank", sa.Integer, primary_key=True),
        sa.Column("context_id", sa.Integer, nullable=False),
        sa.Column("max_act", sa.Float, nullable=False),
        sa.Column("max_pos", sa.Integer, nullable=False),
        sa.Column("acts", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "token_features",
        sae_fk(),
        sa.Column("token_id", sa.Integer, primary_key=True),
        sa.Column("rank", sa.Integer, primary_key=True),
        sa.Column("feature_idx", sa.Integer, nullable=False),
        sa.Column("mean_act", sa.Float, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
    )
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sae_id", sa.Integer, sa.ForeignKey("saes.id", ondelete="CASCADE"), nullable=False),
        sa.Column("feature_idx", sa.Integer, nullable=False),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("precision", sa.Float, nullable=True),
        sa.Column("recall", sa.Float, nullable=True),
        sa.Column("f1", sa.Float, nullable=True),
        sa.Column("rule", sa.JSON, nullable=True),
    )
    op.create_index("ix_labels_feature", "labels", ["sae_id", "feature_idx", "id"])
    op.create_table(
        "feature_embeddings",
        sae_fk(),
        sa.Column("feature_idx", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
    )
    for statement in SQLITE_FTS if op.get_bind().dialect.name == "sqlite" else POSTGRES_FTS:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for statement in SQLITE_FTS_DROP:
            op.execute(statement)
    for table in (
        "feature_embeddings",
        "labels",
        "token_features",
        "examples",
        "features",
        "contexts",
        "saes",
        "vocab",
        "subject_models",
    ):
        op.drop_table(table)
