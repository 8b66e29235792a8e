"""Alembic environment: runs on the connection ``sae_core.store.db.migrate`` hands it (no alembic.ini)."""

from alembic import context

from sae_core.store.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
