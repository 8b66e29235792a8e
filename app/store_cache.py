"""What pages read again and again but the store changes rarely, kept in memory per engine with
the *version* of the store it was read at, and read again when the version moves.

A version is a few cheap queries the caller chooses (for a feature map: the SAEs on it with when
each map was written, and the newest label). Only labels and maps change under a served SAE:
precompute publishes a finished SAE under a new row id, every label change, from any process,
appends to ``labels`` (``label_version``), and a map written again is marked (``mark_mapped``).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sae_core.store.db import LabelRow, SaeRow

T = TypeVar("T")


def label_version(session: Session) -> int | None:
    """The newest label's id: it moves with every label written, by the app or `saescope label`."""
    return session.scalar(sa.select(sa.func.max(LabelRow.id)))


def published(sae: SaeRow) -> tuple:
    """What names one precomputed SAE in the caches: precompute publishes each run under a row of
    its own, created when the run began."""
    return sae.id, sae.created_at


class StoreCache(Generic[T]):
    """The last ``size`` values read, per engine (a test's store dies with its engine), each with
    the version it was read at."""

    def __init__(self, size: int):
        self.size = size
        self.lock = threading.Lock()
        self.by_engine: weakref.WeakKeyDictionary[Engine, OrderedDict] = weakref.WeakKeyDictionary()

    def read(self, session: Session, key: Hashable, version: Hashable, build: Callable[[], T]) -> T:
        """The value kept for ``key`` at ``version``, or ``build()``'s, kept from now on. Two
        requests may build it at once; both answers are right, and the last is kept."""
        engine = session.get_bind()
        with self.lock:
            entries = self.by_engine.setdefault(engine, OrderedDict())
            if key in entries and entries[key][0] == version:
                entries.move_to_end(key)
                return entries[key][1]
        value = build()
        with self.lock:
            entries[key] = (version, value)
            entries.move_to_end(key)
            while len(entries) > self.size:
                entries.popitem(last=False)
        return value
