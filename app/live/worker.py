"""The model worker: one thread runs every live job, fed by a bounded queue; and the errors live
requests end in, shared by the model side and the web side.

A CPU forward pass uses every core, so running two at once only makes both slower; one thread
keeps latency predictable. A request takes its place in the queue first (``admit``), before any
work on it (tokenising, reading the store): when every place is held it is refused at once (the
API answers 503 with Retry-After) instead of piling up, and a caller waits at most its timeout
(504). A job
that times out while still queued is cancelled; one already running finishes and its result is
dropped (a forward pass cannot be interrupted), which the job-length limits keep short.

Semantic search embeds its queries on a worker of its own (``app.labels.query_embeddings``),
with the same queue and refusal.

Nothing here imports torch.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, NamedTuple, TypeVar

from app.errors import Refused
from sae_core.errors import SaescopeError

T = TypeVar("T")

# Weight of the newest job in the running mean of job durations behind Retry-After: recent
# enough to follow a change of workload, smooth enough that one long job does not dominate.
DURATION_SMOOTHING = 0.2


class LiveRefused(Refused):
    """A live request the model side will not or cannot serve, with the HTTP status that says
    why (413 prompt too long, 422 bad request, 503 busy or off, 504 too slow). It crosses the
    process boundary as plain values; ``app.errors`` answers it, with Retry-After when set."""

    def __init__(self, status: int, message: str, *, retry_after_s: int | None = None):
        retry = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
        super().__init__(status, message, headers=retry)
        self.retry_after_s = retry_after_s


class LiveUnavailableError(SaescopeError):
    """Live was required (``--live``) but no SAE's model could be loaded."""


class WorkerBusy(Exception):
    """The queue is full; ``retry_after_s`` estimates when a slot frees up."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"the model is busy; retry in about {retry_after_s} s")
        self.retry_after_s = retry_after_s


class WorkerTimeout(Exception):
    """A job did not finish within its caller's time limit."""

    def __init__(self, timeout_s: float):
        super().__init__(f"the model did not answer within {timeout_s:g} s")
        self.timeout_s = timeout_s


class WorkerStopped(Exception):
    """The worker has shut down (the server is stopping)."""


class _Job(NamedTuple):
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict
    future: Future
    place: Place


class Place:
    """A place in the worker's queue, taken by ``LiveWorker.admit`` before any work is done on a
    request and held until its job starts (or the request gives it back: ``release``, or leaving
    the ``with`` block without running a job)."""

    def __init__(self, worker: LiveWorker):
        self._worker = worker
        self._held = True
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._worker._leave()

    def submit(self, fn: Callable[..., T], /, *args, **kwargs) -> Future[T]:
        """Queue ``fn(*args, **kwargs)`` in this place."""
        if self._worker._stopped.is_set():
            self.release()
            raise WorkerStopped("the live worker has stopped")
        future: Future[T] = Future()
        self._worker._queue.put(_Job(fn, args, kwargs, future, self))
        return future

    def run(self, fn: Callable[..., T], /, *args, timeout_s: float, **kwargs) -> T:
        """Queue ``fn`` in this place and wait up to ``timeout_s`` for its result (or its
        exception); a job still queued at the limit is cancelled and gives its place back."""
        future = self.submit(fn, *args, **kwargs)
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            if future.cancel():
                self.release()
            raise WorkerTimeout(timeout_s) from None

    def __enter__(self) -> Place:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:  # the request failed before its job was queued
            self.release()


class LiveWorker:
    """Runs submitted callables one at a time on a single daemon thread. At most ``queue_size``
    requests hold a place (admitted, not yet started); more are refused at ``admit``. With a
    ``deadline_s`` (the callers' time limit), a request is refused too when the jobs ahead of it
    and its own would likely not be done by then, at the running mean duration: on a busy
    machine it gets its 503 at once rather than a 504 after waiting out the limit."""

    def __init__(
        self,
        *,
        queue_size: int,
        name: str = "saescope-live",
        deadline_s: float | None = None,
    ):
        self._queue: queue.Queue[_Job | None] = queue.Queue()  # admission bounds it
        self.queue_size = queue_size
        self.deadline_s = deadline_s
        self._waiting = 0  # places held: admitted requests whose job has not started
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._stopped = threading.Event()
        self._mean_duration_s = 1.0  # until a job has run: a CPU forward of a short prompt
        self._running = 0  # 1 while a job runs

    def start(self) -> LiveWorker:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Cancel queued jobs, let the running one finish, and end the thread."""
        self._stopped.set()
        self._queue.put(None)
        self._thread.join()

    @property
    def queued(self) -> int:
        return self._waiting

    def admit(self) -> Place:
        """A place in the queue, or WorkerBusy at once when every place is held: the first thing
        a request does, so a refusal costs no work."""
        with self._lock:
            if self._stopped.is_set():
                raise WorkerStopped("the live worker has stopped")
            if self._waiting >= self.queue_size or self._late(self._waiting):
                raise WorkerBusy(self._retry_after_s(self._waiting))
            self._waiting += 1
        return Place(self)

    def _leave(self) -> None:
        with self._lock:
            self._waiting -= 1

    def submit(self, fn: Callable[..., T], /, *args, **kwargs) -> Future[T]:
        """Admit and queue ``fn(*args, **kwargs)``; raises WorkerBusy at once when full."""
        return self.admit().submit(fn, *args, **kwargs)

    def run(self, fn: Callable[..., T], /, *args, timeout_s: float, **kwargs) -> T:
        """Admit, queue, and wait up to ``timeout_s`` for the result (or the job's exception)."""
        return self.admit().run(fn, *args, timeout_s=timeout_s, **kwargs)

    def _late(self, waiting: int) -> bool:
        """Whether a job admitted now would likely end past the deadline: the running job, the
        ``waiting`` ones and itself, each at the mean duration. A job that would start at once
        is never late: it runs, and its duration corrects a mean that one slow job raised."""
        ahead = waiting + self._running
        return (
            self.deadline_s is not None
            and ahead > 0
            and (ahead + 1) * self._mean_duration_s > self.deadline_s
        )

    def _retry_after_s(self, waiting: int) -> int:
        """Whole seconds until the queue has likely drained by one job: every waiting job plus
        the running one, at the running mean duration."""
        return max(1, math.ceil((waiting + 1) * self._mean_duration_s))

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job.place.release()  # started (or skipped): its place goes to the next request
            if self._stopped.is_set():
                job.future.cancel()  # queued before stop; it will never run
                continue
            if not job.future.set_running_or_notify_cancel():
                continue  # its caller gave up while it waited
            started = time.perf_counter()
            self._running = 1
            result, error = None, None
            try:
                result = job.fn(*job.args, **job.kwargs)
            except BaseException as err:  # the caller re-raises it; the worker lives on
                error = err
            elapsed = time.perf_counter() - started
            with self._lock:  # idle again before the caller has its answer
                self._running = 0
                self._mean_duration_s += DURATION_SMOOTHING * (elapsed - self._mean_duration_s)
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
