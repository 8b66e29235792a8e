"""Releases: named sets of SAEs on one subject model (several layers and widths), precomputed
together and shown together. Every SAE of an older store becomes a release of one, named after it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "releases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("subject_models.id"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    # SQLite: a plain ADD COLUMN with an inline REFERENCES (Alembic would want batch mode, which
    # rebuilds `saes`; dropping it with foreign keys on would cascade into every feature row).
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "ALTER TABLE saes ADD COLUMN release_id INTEGER REFERENCES releases (id) ON DELETE SET NULL"
        )
    else:
        op.add_column(
            "saes",
            sa.Column(
                "release_id",
                sa.Integer,
                sa.ForeignKey("releases.id", ondelete="SET NULL"),
                nullable=True,
            ),
        )
    # Staging rows of an unfinished precompute get their release when they are published.
    op.execute(
        "INSERT INTO releases (name, model_id, created_at) "
        "SELECT name, model_id, created_at FROM saes WHERE status = 'complete'"
    )
    op.execute(
        "UPDATE saes SET release_id = (SELECT releases.id FROM releases WHERE releases.name = saes.name) "
        "WHERE status = 'complete'"
    )


def downgrade() -> None:
    op.drop_column("saes", "release_id")  # SQLite 3.35+ drops a column in place, no rebuild
    op.drop_table("releases")
