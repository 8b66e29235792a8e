"""Semantic search's query embeddings, kept off the pages' back.

Embedding a query runs a small BERT (``sae_core.labels.embeddings``), tens of milliseconds of
CPU; forty at once on the web workers' threads stalled every page for seconds. So, as live
prompts do: one worker thread embeds, at a lower CPU priority than the threads serving pages
(``SEARCH_NICENESS``; the math library's threads, started from it, inherit it); at most
``search_queue_size`` queries wait for it, and the next is refused at once with 503 and
Retry-After; a caller waits at most ``search_timeout_s`` (504). Repeated queries are answered
from an LRU cache and never wait.

Nothing here imports torch; the worker thread loads the embedding model on its first query.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from app.errors import Refused
from app.live.worker import LiveWorker, WorkerBusy, WorkerTimeout
from app.settings import Settings
from sae_core.labels import embeddings

# Query vectors kept: 1,024 x 384 float32 is 1.5 MB, and covers what a crowd types repeatedly.
QUERY_CACHE_SIZE = 1024
# Added to the embedding thread's niceness, as to the live model process's (MODEL_NICENESS):
# page threads are served first, and embedding still gets about a quarter of a contended core
# (at +10 it got so little on a machine at load 28 that queries timed out).
SEARCH_NICENESS = 5


class QueryEmbedder:
    """``embed(query)``: the query's unit vector, from the cache or the embedding worker."""

    def __init__(
        self,
        *,
        settings: Settings,
        embed: Callable[[str], np.ndarray] = embeddings.embed_query,
    ):
        self._embed = embed
        self._timeout_s = settings.search_timeout_s
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.worker = LiveWorker(
            queue_size=settings.search_queue_size, name="saescope-embed", niceness=SEARCH_NICENESS
        ).start()

    def close(self) -> None:
        self.worker.stop()

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
