"""The tokens each feature fires on most often (``feature_words``), which labels read as words the
feature fires on beyond its examples. A store migrated from 0007 has none until its SAEs are
precomputed again; its labels then go without those words.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feature_words",
        sa.Column(
            "sae_id", sa.Integer, sa.ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("feature_idx", sa.Integer, primary_key=True),
        sa.Column("rank", sa.Integer, primary_key=True),
        sa.Column("token_id", sa.Integer, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("occurrences", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("feature_words")
