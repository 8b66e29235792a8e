"""Checkpoints of an unfinished precompute, so a killed run resumes where it stopped.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "precompute_state",
        sa.Column("sae_id", sa.Integer, sa.ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("batches_done", sa.Integer, nullable=False),
        sa.Column("spill_bytes", sa.BigInteger, nullable=False),
        sa.Column("state", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("precompute_state")
