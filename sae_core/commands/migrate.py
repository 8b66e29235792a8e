"""`saescope migrate`: create or upgrade the store's schema (docker-compose's prestart step)."""

from __future__ import annotations

from sae_core.store.db import (
    check_store_url,
    create_engine_for,
    default_db_url,
    migrate,
    schema_revision,
)

HELP = "create or upgrade the store's schema to the current version"


def add_arguments(parser):
    parser.add_argument("--db", default=None, help="SQLAlchemy URL (default: $SAESCOPE_DB_URL or sqlite:///saescope.db)")


def run(args) -> int:
    url = args.db or default_db_url()
    check_store_url(url, create=True)
    engine = create_engine_for(url)
    try:
        before = schema_revision(engine)
        migrate(engine)
        after = schema_revision(engine)
    finally:
        engine.dispose()
    if before == after:
        print(f"saescope: store schema is current (revision {after})")
    else:
        print(f"saescope: store schema upgraded from {before or 'empty'} to {after}")
    return 0
