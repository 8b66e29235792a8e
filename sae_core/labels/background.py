"""Label vectors written in the background while the browser serves.

Semantic search needs a vector per label, and embedding labels is the slow part of labelling on a
CPU (all-MiniLM-L6-v2 embeds a few hundred labels a second on 2 cores, against over a thousand
labels a second for the rules). So ``saescope precompute`` writes the labels only, and
``saescope serve`` fills in their vectors: ``VectorWatcher`` checks the store once a minute and,
when a complete SAE has labelled features without vectors, runs ``saescope label --embed-only``
for those SAEs in one niced child process. Until an SAE's vectors are all written, its semantic
search answers from label words and says so. Labels a pipeline writes into a store that is
already being served (docker compose's ``pipeline`` next to its ``app``) are picked up the same
way. The watcher itself only counts rows: the embedding model loads in the child, and only when
there is something to embed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy.orm import Session

from sae_core.labels import embeddings
from sae_core.store.db import create_engine_for

CHECK_EVERY_S = 60.0
MAX_BACKOFF_S = 3600.0  # after failed children, the longest wait before the next try
NICE = ["nice", "-n", "10"] if shutil.which("nice") else []  # the browser's requests come first


class VectorWatcher:
    """Keeps a store's label vectors written: ``check`` is one round, ``start`` runs rounds in a
    daemon thread, ``stop`` ends them and the child, if one is running."""

    def __init__(self, db_url: str, log: Path, every_s: float = CHECK_EVERY_S):
        self.db_url, self.log, self.every_s = db_url, log, every_s
        self.child: subprocess.Popen | None = None
        self._names: list[str] = []  # the SAEs the last child was started for
        self._failures = 0
        self._not_before = 0.0  # time.monotonic() before which no child starts (after failures)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def awaiting(self) -> list[str]:
        engine = create_engine_for(self.db_url)
        try:
            with Session(engine) as session:
                return embeddings.saes_awaiting_vectors(session)
        finally:
            engine.dispose()

    def check(self) -> subprocess.Popen | None:
        """Start a child for the SAEs awaiting vectors, unless one is still running, the last ones
        failed a moment ago, or none await; the child started, if any."""
        names = None  # the SAEs awaiting vectors, once read in this round
        if self.child is not None:
            if self.child.poll() is None:
                return None
            # a child that failed, or left its SAEs awaiting (labels it cannot embed), is not
            # started again every minute: the wait doubles, up to an hour
            if self.child.returncode == 0:
                names = self.awaiting()
            stalled = names is None or set(self._names) & set(names)
            self._failures = self._failures + 1 if stalled else 0
            self._not_before = time.monotonic() + min(
                MAX_BACKOFF_S, self.every_s * (2**self._failures - 1)
            )
            self.child = None
        if time.monotonic() < self._not_before:
            return None
        names = self._names = self.awaiting() if names is None else names
        if not names:
            return None
        command = [sys.executable, "-m", "sae_core", "label", "--embed-only"]
        for name in names:
            command += ["--sae", name]
        # the URL goes in the environment, not on the command line: it may hold a password
        env = {**os.environ, "SAESCOPE_DB_URL": self.db_url}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as sink:
            self.child = subprocess.Popen(
                [*NICE, *command], stdout=sink, stderr=subprocess.STDOUT, env=env
            )
        print(
            f"saescope: writing label vectors for semantic search of {', '.join(names)} in the background "
            f"(log: {self.log})",
            flush=True,
        )
        return self.child

    def start(self) -> VectorWatcher:
        self._thread = threading.Thread(target=self._run, name="label-vectors", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.check()
            except Exception as error:  # a store that is down for a moment: try again next round
                print(f"saescope: label vectors not checked: {error}", file=sys.stderr, flush=True)
            if self._stop.wait(self.every_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()
            self.child.wait()
