"""When each SAE's feature map was last written (``saes.map_built_at``): the version a server
checks to tell a rebuilt map, in place of summing the map's points on every request.

A store migrated with maps in it gets the time of the migration as their mark.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("saes", sa.Column("map_built_at", sa.DateTime(timezone=True), nullable=True))
    saes = sa.table("saes", sa.column("id", sa.Integer), sa.column("map_built_at", sa.DateTime(timezone=True)))
    points = sa.table("feature_map", sa.column("sae_id", sa.Integer))
    op.execute(
        saes.update()
        .where(sa.exists().where(points.c.sae_id == saes.c.id))
        .values(map_built_at=datetime.now(timezone.utc))
    )


def downgrade() -> None:
    with op.batch_alter_table("saes") as batch:
        batch.drop_column("map_built_at")
