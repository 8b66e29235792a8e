"""The live model in a process of its own, shared by every web worker.

``saescope serve`` starts it (``ModelProcess.start``) before uvicorn: it loads the store's models
once, however many web workers there are, and answers on a Unix socket in a private folder.
Each web worker talks to it through ``RemoteModel``, which has the same ``call`` as the in-app
``ModelHost``; page requests never touch it. The process runs at a lower CPU priority
(``MODEL_NICENESS``) and on half the cores (``model_threads``), so on a machine with few cores
page traffic is served first while a forward pass runs.

One connection carries one request: ``("describe",)`` or ``("call", op)``, where ``op`` is the
typed request of ``sae_core.live.requests`` itself, answered by ``("ok", result)`` or
``("refused", status, message, retry_after_s)``. The queue,
its 503 and the 504 time limit are the model process's ``LiveWorker``'s, as in one process.
Messages are pickles, so the socket lives in a folder only this user can open and every
connection must prove it knows the key stored next to the socket.

Nothing here imports torch; the model process imports ``app.live.host`` after it starts.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.live.worker import LiveRefused, LiveUnavailableError
from app.settings import Settings
from sae_core.errors import SaescopeError
from sae_core.live.requests import GraphOp, LiveOp

if TYPE_CHECKING:
    from app.live.host import ModelHost

log = logging.getLogger("saescope.live")

# Added to the model process's niceness: page workers keep priority over a forward pass, and
# the model still gets about a quarter of a contended core (Linux's CFS weights 1024 vs 335).
MODEL_NICENESS = 5
# How much longer than live_timeout_s a web worker waits: the model process answers 504 at the
# limit itself; past this the process is stuck or gone.
ANSWER_GRACE_S = 10.0
# How often the model process checks that `saescope serve` is still there.
PARENT_CHECK_S = 1.0


def model_threads() -> int:
    """Math threads of the model process: half the cores, the other half left to the web workers.
    A thread more than the cores free makes OpenMP's threads spin waiting for each other: on 2
    busy cores (load 9), a 60-token SmolLM2 forward took 1,346 ms of CPU and 3.2 s with 2
    threads, 256 ms and 0.5 s with 1, and the spinning took that CPU from the pages."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 2) // 2)


def key_path(socket: str | Path) -> Path:
    return Path(f"{socket}.key")


# ---------------------------------------------------------------------------------------------
# Web worker side


class RemoteModel:
    """The live model process, seen from a web worker: ``call`` as on ``ModelHost``."""

    def __init__(self, socket: str, *, timeout_s: float):
        self.socket = socket
        self.timeout_s = timeout_s
        try:
            self._authkey = key_path(socket).read_bytes()
        except OSError as err:
            raise LiveUnavailableError(
                f"no live model process at {socket} ({err.strerror}); "
                "`saescope serve` starts one and sets SAESCOPE_LIVE_SOCKET for its workers"
            ) from None
        description = self._ask(("describe",))
        self.live_saes: frozenset[str] = frozenset(description["saes"])
        self.unavailable: dict[str, str] = description["unavailable"]

    def call(self, op: LiveOp | GraphOp) -> Any:
        return self._ask(("call", op))

    def close(self) -> None:
        """Nothing to release: connections last one request; ``saescope serve`` owns the process."""

    def _ask(self, message: tuple) -> Any:
        try:
            with Client(self.socket, family="AF_UNIX", authkey=self._authkey) as conn:
                conn.send(message)
                if not conn.poll(self.timeout_s + ANSWER_GRACE_S):
                    raise LiveRefused(
                        504, f"the live model process did not answer within {self.timeout_s:g} s"
                    )
                reply = conn.recv()
        except (OSError, EOFError, multiprocessing.AuthenticationError) as err:
            raise LiveRefused(
                503,
                f"the live model process is not answering ({type(err).__name__}: {err}); "
                "the server log says why; restart `saescope serve`",
            ) from None
        if reply[0] == "ok":
            return reply[1]
        _, status, text, retry_after_s = reply
        raise LiveRefused(status, text, retry_after_s=retry_after_s)


# ---------------------------------------------------------------------------------------------
# Model process side


def serve_host(host: ModelHost, listener: Listener) -> None:
    """Answer connections until the listener closes: each on a thread of its own, so a request
    that waits for the model never holds up another one being tokenised or refused."""
    while True:
        try:
            conn = listener.accept()
        except (ConnectionError, EOFError, multiprocessing.AuthenticationError) as err:
            log.warning("refused a connection to the live model: %s", err)  # a client's fault
            continue
        except OSError:  # the listening socket itself is closed or broken
            return
        threading.Thread(target=_answer, args=(host, conn), daemon=True).start()


def _answer(host: ModelHost, conn: Connection) -> None:
    with conn:
        try:
            reply = _reply(host, conn.recv())
        except EOFError:
            return
        try:
            conn.send(reply)
        except OSError:
            pass  # the web worker gave up waiting; the answer is dropped


def _reply(host: ModelHost, message: tuple) -> tuple:
    if message[0] == "describe":
        return "ok", {"saes": sorted(host.saes), "unavailable": host.unavailable}
    _, op = message
    try:
        return "ok", host.call(op)
    except LiveRefused as err:
        return "refused", err.status, err.message, err.retry_after_s
    except Exception as err:  # the request fails; the process and its model live on
        log.exception(
            "live %s on %s failed", type(op).__name__, getattr(op, "sae", None) or op.release
        )
        return (
            "refused",
            500,
            f"the live model failed on this request ({type(err).__name__}); the server log has the details",
            None,
        )


def _model_process_main(settings: Settings, socket: str, ready: Connection, parent: int) -> None:
    """Body of the model process: load, listen, report ready, serve until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; serve stops us
    signal.signal(signal.SIGTERM, _exit_cleanly)
    os.nice(MODEL_NICENESS)
    import torch

    torch.set_num_threads(model_threads())
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("saescope live: %(message)s"))
    logging.getLogger("saescope").addHandler(handler)
    logging.getLogger("saescope").setLevel(logging.INFO)
    import sqlalchemy.orm

    from app.live.host import ModelHost, sae_sources
    from sae_core.store.db import create_engine_for

    try:
        engine = create_engine_for(settings.db_url, readonly=True)
        try:
            with sqlalchemy.orm.Session(engine) as session:
                sources = sae_sources(session)
        finally:
            engine.dispose()
        host = ModelHost.load(sources, settings=settings)
    except SaescopeError as err:
        ready.send(("failed", str(err)))
        return
    Path(socket).unlink(missing_ok=True)  # left behind by a predecessor that was killed
    listener = Listener(socket, family="AF_UNIX", authkey=key_path(socket).read_bytes())
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    ready.send(("ready", sorted(host.saes)))
    ready.close()
    serve_host(host, listener)
    log.error("the live model's socket closed; this process ends and serve starts another")


def _exit_cleanly(signum: int, frame: object) -> None:
    """SIGTERM from ``ModelProcess.stop``: exit through Python, so libraries release what they
    hold (tqdm's lock would otherwise be reported as a leaked semaphore)."""
    raise SystemExit(0)


def _exit_with_parent(parent: int) -> None:
    """End the model process if `saescope serve` dies without stopping it (a SIGKILL)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


class ModelProcess:
    """The live model process of one ``saescope serve``: started before the web workers,
    started again if it dies (an out-of-memory kill, a crash in a native library), and stopped
    after the workers (use it as a context manager). A restart keeps the socket and its key,
    so the workers reconnect by themselves; until it is back, live requests answer 503."""

    def __init__(self, settings: Settings, folder: Path):
        self.settings = settings
        self.folder = folder
        self.socket = str(folder / "live.sock")
        self.process: multiprocessing.process.BaseProcess | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # one launch or stop at a time

    @classmethod
    def start(cls, settings: Settings) -> ModelProcess:
        """Start it and wait until its models are loaded (minutes the first time a model is
        converted); a model that cannot load with ``settings.live`` true fails here in one line."""
        folder = Path(tempfile.mkdtemp(prefix="saescope-live-"))  # mode 0700
        key = key_path(folder / "live.sock")
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        model = cls(settings, folder)
        try:
            with model._lock:
                saes = model._launch()
        except BaseException:  # a model that cannot load, or Ctrl-C while it loads
            model.stop()
            raise
        log.info(
            "live model process %d serves SAEs %s", model.process.pid, ", ".join(saes) or "none"
        )
        threading.Thread(
            target=model._supervise, name="saescope-live-supervisor", daemon=True
        ).start()
        return model

    def _launch(self) -> list[str]:
        """Start the process and wait for its report; the names of the SAEs it serves."""
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked locks
        receive, send = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_model_process_main,
            args=(self.settings, self.socket, send, os.getpid()),
            name="saescope-live",
            daemon=True,
        )
        self.process.start()
        send.close()  # ours; the pipe then reports EOF if the process dies while loading
        try:
            status = receive.recv()
        except EOFError:
            raise LiveUnavailableError(
                f"the live model process exited with code {self.process.exitcode} while loading"
            ) from None
        if status[0] == "failed":
            raise LiveUnavailableError(status[1])
        return status[1]

    def _supervise(self) -> None:
        while True:
            process = self.process
            process.join()
            with self._lock:
                if self._stopping.is_set():
                    return
                log.error(
                    "the live model process exited with code %s; starting it again",
                    process.exitcode,
                )
                try:
                    self._launch()
                except Exception as err:
                    log.error("the live model process cannot start again (%s); live is off", err)
                    return

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            if self.process is not None and self.process.is_alive():
                self.process.terminate()
                self.process.join(10)
                if self.process.is_alive():
                    self.process.kill()
                    self.process.join()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> ModelProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
