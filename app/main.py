"""``create_app(settings)``: the FastAPI application over one store.

The lifespan opens the store's engine (SQLite read-only unless a write token allows label edits)
and enters the lifespans of the live and labels routers (``app.routes.live`` loads the model there).
Nothing here imports torch: a browse-only server starts in about a second.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager

import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker
from threadpoolctl import threadpool_limits

from app.errors import install_error_handlers
from app.families.map import prepare_maps
from app.guards import RequestGuard
from app.openapi import install_openapi
from app.rendering import STATIC_DIR, make_templates
from app.routes import api, families, graphs, labels, live, pages
from app.settings import Settings
from sae_core import __version__
from sae_core.store.db import (
    StoreError,
    check_store_url,
    create_engine_for,
    head_revision,
    schema_revision,
)

# Routers with work at start-up and shutdown: each module has ``router`` and may have
# ``lifespan(app)``, an async context manager entered after the store is open (live loads the
# model there). Importing them loads no torch.
EXTENSIONS = (live, labels)


# SQLite reads pages through a memory map of up to this many bytes (it caps the request at its
# own compile-time limit, 2 GB here) instead of a read() into its 2 MB page cache per page: a
# label search joins thousands of feature rows scattered over the file, and mapped it took 2.1
# instead of 6.8 ms of CPU on the bench's store. Only the address space is reserved; the pages
# are the OS's file cache, shared by every worker.
SQLITE_MMAP_BYTES = 1 << 33


def open_store(settings: Settings) -> Engine:
    """The engine for ``settings.db_url``, checked to hold a saescope store."""
    check_store_url(settings.db_url, create=False)
    engine = create_engine_for(settings.db_url, readonly=settings.write_token is None)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _map_sqlite_file)
    shown = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            has_store = sa.inspect(conn).has_table("saes")
    except sa.exc.DBAPIError as err:
        engine.dispose()
        reason = str(err.orig).strip().splitlines()[0] if err.orig else str(err)
        raise StoreError(
            f"cannot open the store at {shown} ({reason}); check --db / SAESCOPE_DB_URL"
        ) from None
    if not has_store:
        engine.dispose()
        raise StoreError(
            f"{shown} holds no saescope store; run `saescope precompute --db ...` into it first"
        )
    current, head = schema_revision(engine), head_revision()
    if current != head:
        engine.dispose()
        raise StoreError(
            f"{shown} is at schema revision {current}, this saescope reads {head}; "
            "run `saescope migrate --db ...` first"
        )
    return engine


def _map_sqlite_file(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute(f"PRAGMA mmap_size={SQLITE_MMAP_BYTES}")
    cursor.close()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine = open_store(app.state.settings)
    app.state.engine = engine
    app.state.sessionmaker = sessionmaker(engine, expire_on_commit=False)
    try:
        async with AsyncExitStack() as stack:
            for module in app.state.extensions:
                if hasattr(module, "lifespan"):
                    await stack.enter_async_context(module.lifespan(app))
            with app.state.sessionmaker() as session:
                prepare_maps(session)
            with frozen_startup_objects(), one_blas_thread():
                yield
    finally:
        engine.dispose()


def one_blas_thread() -> threadpool_limits:
    """numpy's BLAS on one thread while serving: requests are a web worker's parallelism, and
    OpenBLAS's second thread spins waiting on a core the pages need. Semantic search's product
    of 16k label vectors with the query took 22 ms of CPU with two threads on a busy machine,
    1.6 ms with one. Restored at shutdown."""
    return threadpool_limits(limits=1, user_api="blas")


@contextmanager
def frozen_startup_objects() -> Iterator[None]:
    """Keep what start-up built (modules, the app, its routes: ~140k objects) out of the cycle
    collector's full passes while serving. A full pass walks every tracked object and holds the
    worker meanwhile: ~140 ms over those, once every few dozen page requests, which was the
    serve bench's p99. Unfrozen at shutdown, so an app started in a test leaves nothing behind."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; ``settings`` default to the ``SAESCOPE_*`` environment (``saescope serve`` sets it)."""
    app = FastAPI(
        title="saescope",
        version=__version__,
        summary="Features of sparse autoencoders on language models: browse, search, probe.",
        lifespan=lifespan,
        docs_url=None,  # served by app.routes.pages from vendored files, not a CDN
        redoc_url=None,
    )
    app.state.settings = settings or Settings()
    app.state.templates = make_templates()
    app.state.extensions = EXTENSIONS
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(RequestGuard)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(api.router)
    app.include_router(families.router)
    app.include_router(families.pages)
    app.include_router(graphs.router)
    for module in app.state.extensions:
        app.include_router(module.router)
    app.include_router(pages.router)
    return app
