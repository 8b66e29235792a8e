"""Attribution graphs: finished graphs of a release, saved under a shareable slug and found again
by the key of what was asked (release, prompt, target, thresholds, limits).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "graphs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("slug", sa.String(64), nullable=False, unique=True),
        sa.Column(
            "release_id",
            sa.Integer,
            sa.ForeignKey("releases.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("request_key", sa.String(64), nullable=True, unique=True),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_graphs_release", "graphs", ["release_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_graphs_release", table_name="graphs")
    op.drop_table("graphs")
