"""Feature families: links between features of SAEs on one hook, and the feature map.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feature_links",
        sa.Column("sae_id", sa.Integer, sa.ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("feature_idx", sa.Integer, primary_key=True),
        sa.Column("other_sae_id", sa.Integer, sa.ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("other_idx", sa.Integer, primary_key=True),
        sa.Column("cosine", sa.Float, nullable=False),
        sa.Column("n_both", sa.Integer, nullable=False),
        sa.Column("n_self", sa.Integer, nullable=False),
        sa.Column("n_other", sa.Integer, nullable=False),
    )
    op.create_table(
        "feature_map",
        sa.Column("sae_id", sa.Integer, sa.ForeignKey("saes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("feature_idx", sa.Integer, primary_key=True),
        sa.Column("x", sa.Float, nullable=False),
        sa.Column("y", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("feature_map")
    op.drop_table("feature_links")
