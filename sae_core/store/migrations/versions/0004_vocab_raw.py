"""The bytes of tokens that are part of a character (byte-level BPE splits emoji and accented
letters across tokens), so pages join them into the text people wrote.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("vocab", sa.Column("raw", sa.LargeBinary, nullable=True))


def downgrade() -> None:
    op.drop_column("vocab", "raw")
