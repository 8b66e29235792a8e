"""Semantic search's query embeddings, kept off the pages' back.

Embedding a query runs a small BERT (``sae_core.labels.embeddings``), ~20 ms of CPU; forty at
once on the web workers' threads stalled every page for seconds. So, as live prompts do: one
worker thread hands queries over one at a time; at most ``search_queue_size`` wait for it, and
the next is refused at once with 503 and Retry-After, as is one that would likely not be
answered within ``search_timeout_s`` at the recent pace; a caller waits at most that (504).
Repeated queries are answered from an LRU cache and never wait.

The model runs in a child process of the web worker (``EmbeddingProcess``), at a lower CPU
priority (``SEARCH_NICENESS``) and on one math thread. In a thread of the web worker it shared
the pages' interpreter lock: lowered in priority, it was descheduled while holding the lock and
the pages waited for it; and torch's second thread spun on a busy core, a query costing 199 ms
of CPU instead of 21 (load 10 on 2 cores). Under 32 page clients queries then took seconds and
some passed the 10 s limit.

Nothing here imports torch; the child loads the embedding model when the server starts (where
the store has label vectors) or on its first query.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from app.errors import Refused
from app.live.worker import LiveWorker, WorkerBusy, WorkerTimeout
from app.settings import Settings
from sae_core.labels import embeddings
from sae_core.store.db import FeatureEmbeddingRow

# Query vectors kept: 1,024 x 384 float32 is 1.5 MB, and covers what a crowd types repeatedly.
QUERY_CACHE_SIZE = 1024
# Added to the embedding process's niceness, as to the live model process's (MODEL_NICENESS):
# page threads are served first, and embedding still gets about a quarter of a contended core
# (at +10 it got so little on a machine at load 28 that queries timed out).
SEARCH_NICENESS = 5

T = TypeVar("T")


def has_label_vectors(engine: Engine) -> bool:
    """Whether the store holds a label vector, i.e. semantic search embeds queries here at all
    (an SAE without vectors is searched by words)."""
    with engine.connect() as conn:
        return conn.scalar(sa.select(FeatureEmbeddingRow.sae_id).limit(1)) is not None


def _start_embedding_process(niceness: int) -> None:
    """The child's start: one math thread (a query is a few dozen tokens; a second thread only
    spins on a core the pages need), the model loaded, then the CPU priority lowered below the
    pages'. Loading at the web worker's own priority takes seconds; lowered, under a page load on
    a busy machine it took ~50 s, and searches meanwhile timed out."""
    import torch

    torch.set_num_threads(1)
    embeddings.load_embedder()
    os.nice(niceness)


class EmbeddingProcess:
    """A child process holding the embedding model that runs jobs (``run``, ``submit``) one at a
    time, started on the first (or ``start``) and again after it died (an out-of-memory kill):
    that job answers 503, the next starts a new one."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),  # no forked locks or threads
            initializer=_start_embedding_process,
            initargs=(SEARCH_NICENESS,),
        )

    def submit(self, fn: Callable[..., T], /, *args: Any) -> Future[T]:
        """Queue ``fn(*args)`` in the child (``fn`` goes by name, so it is a module's function)."""
        with self._lock:
            try:
                return self._pool.submit(fn, *args)
            except BrokenProcessPool:  # the child died on an earlier job: start the next one
                self._pool.shutdown(wait=False)
                self._pool = self._new_pool()
                return self._pool.submit(fn, *args)

    def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        """``fn(*args)`` in the child, once the jobs queued before it are done."""
        try:
            return self.submit(fn, *args).result()
        except BrokenProcessPool:
            raise Refused(503, "semantic search's model process stopped; retry") from None

    def embed(self, query: str) -> np.ndarray:
        return self.run(embeddings.embed_query, query)

    def start(self) -> None:
        """Start the child now, rather than on the first job (it then loads the model)."""
        self.submit(os.getpid)

    def close(self) -> None:
        with self._lock:
            self._pool.shutdown(cancel_futures=True)


class QueryEmbedder:
    """``embed(query)``: the query's unit vector, from the cache or the embedding worker, which
    embeds with ``embed`` (default: the model, in an ``EmbeddingProcess``)."""

    def __init__(self, *, settings: Settings, embed: Callable[[str], np.ndarray] | None = None):
        self._process = EmbeddingProcess() if embed is None else None
        self._embed = embed or self._process.embed
        self._timeout_s = settings.search_timeout_s
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.worker = LiveWorker(
            queue_size=settings.search_queue_size,
            name="saescope-embed",
            deadline_s=settings.search_timeout_s,
        ).start()

    def warm(self) -> None:
        """Start the model process now: a fresh interpreter importing torch and loading the model
        takes seconds, tens of them on a busy machine, which the first query would otherwise
        wait for within its time limit. Not through the worker, whose mean job duration says
        how long queries take."""
        if self._process is not None:
            self._process.start()

    def close(self) -> None:
        self.worker.stop()
        if self._process is not None:
            self._process.close()

    def embed(self, query: str) -> np.ndarray:
        with self._lock:
            vector = self._cache.get(query)
            if vector is not None:
                self._cache.move_to_end(query)
                return vector
        try:
            vector = self.worker.run(self._embed, query, timeout_s=self._timeout_s)
        except WorkerBusy as err:
            raise Refused(
                503,
                f"semantic search is busy; retry in about {err.retry_after_s} s, "
                "or search the label text (mode=text)",
                headers={"Retry-After": str(err.retry_after_s)},
            ) from None
        except WorkerTimeout as err:
            raise Refused(504, f"semantic search: {err} (search_timeout_s)") from None
        vector.setflags(write=False)  # shared by every caller of the same query
        with self._lock:
            self._cache[query] = vector
            if len(self._cache) > QUERY_CACHE_SIZE:
                self._cache.popitem(last=False)
        return vector
