"""Admission of live requests in the web worker, before any work and without waiting.

The model side's queue (``LiveWorker``, in the live model process) holds ``live_queue_size``
requests and runs one. Asking it whether there is room costs a round trip to that process: a
connection, its key handshake and a thread, in a process that runs at a lower CPU priority and
whose interpreter is busy with the forward pass in progress. Under overload every refusal paid
that (0.2 s median, 2.2 s max at load 15 on 2 cores, against 28 ms for the round trip alone).

So the web side keeps the count itself: ``LivePlaces`` lets at most ``live_queue_size + 1``
live requests (the queue and the one running) be with the model side at once, across every web
worker of one server, and refuses the next at once with 503 and Retry-After. Each request holds
an exclusive ``flock`` on one of that many files in a folder the server's processes share (the
live model process's private folder): taking one is a non-blocking system call, and the kernel
frees it if a worker dies. The model side's own queue stays as the second line (a request whose
caller timed out may still be running there).
"""

from __future__ import annotations

import fcntl
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.live.worker import DURATION_SMOOTHING, LiveRefused


class LivePlaces:
    """``size`` places shared by every process that opens ``folder``; ``hold()`` takes one for a
    request's time with the model side, or refuses with 503 at once."""

    def __init__(self, folder: str | Path, size: int):
        self.folder = Path(folder)
        self.size = size
        self._paths = [self.folder / f"live-place-{i}" for i in range(size)]
        # Running mean of how long a request holds its place (its wait in the model's queue and
        # its run): until one has been answered, a short CPU forward.
        self._held_s = 1.0
        self._lock = threading.Lock()

    def _take(self) -> int | None:
        """The descriptor of a free place, locked; None when every place is held. Each take
        opens its own descriptor: ``flock`` is per open file, so two requests of one process
        cannot share a place."""
        for path in self._paths:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd
        return None

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold a place while the block runs; LiveRefused(503) with Retry-After when none is
        free."""
        fd = self._take()
        if fd is None:
            retry_after_s = self.retry_after_s()
            raise LiveRefused(
                503,
                f"the model is busy; retry in about {retry_after_s} s; the server runs one live "
                "request at a time",
                retry_after_s=retry_after_s,
            )
        started = time.perf_counter()
        try:
            yield
        finally:
            os.close(fd)  # closing the only descriptor of the lock releases it
            elapsed = time.perf_counter() - started
            with self._lock:
                self._held_s += DURATION_SMOOTHING * (elapsed - self._held_s)

    def retry_after_s(self) -> int:
        """Whole seconds after which every place has likely turned over once: the running mean
        of how long this worker's requests held theirs."""
        return max(1, math.ceil(self._held_s))
