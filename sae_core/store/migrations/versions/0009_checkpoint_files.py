"""Precompute's checkpoints leave the store (``precompute_state``) for files beside the activation
spill (sae_core.precompute.checkpoint): a database row took two copies of the accumulators on its
way in, the peak of the whole precompute. A run interrupted before this migration starts its pass
again; the spill file it left in the cache is not read any more and can be deleted.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_table("precompute_state")


def downgrade() -> None:
    op.create_table(
        "precompute_state",
        sa.Column("sae_id", sa.Integer, sa.ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("batches_done", sa.Integer, nullable=False),
        sa.Column("spill_bytes", sa.BigInteger, nullable=False),
        sa.Column("state", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
