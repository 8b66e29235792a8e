"""Attribution graphs as background jobs in the live model process.

A graph takes tens of seconds on a CPU, too long for a request: ``GraphSubmitOp`` checks the
request (release loaded, prompt within ``graph_max_prompt_tokens``, targets one token each),
answers at once with a job, and one thread of its own (a ``LiveWorker`` with a bounded queue:
503 + Retry-After when full) computes it, so live prompts on the other worker are not held up
behind it: a live request and a graph batch never run at once (hooks on the shared model are
seen by every thread), so the job holds the host's model lock and lets it go between batches,
and a live request waits one batch at most. ``GraphJobOp`` reports the job's stage; a job past ``graph_timeout_s`` stops at its next
stage or batch and fails with that reason. A finished graph is saved in the store (the live model
process is the one writer of graphs) and a request asked before is answered from there, with no
job. ``GraphImportOp`` saves an uploaded graph JSON.

``ModelHost.call`` hands these operations here. ``GraphJobStatus`` is what crosses to the web
side: plain values, and this module imports torch only inside the model process's methods.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from app.live.worker import LiveRefused, LiveWorker, WorkerBusy
from app.settings import Settings
from sae_core.errors import SaescopeError
from sae_core.live.requests import GraphImportOp, GraphJobOp, GraphOp, GraphSubmitOp

if TYPE_CHECKING:
    from app.live.loaded import LiveSae
    from sae_core.live.graph_run import GraphRequest, ReleaseLayer

log = logging.getLogger("saescope.live")
KEPT_JOBS = 200  # finished jobs remembered for polling; older ones are forgotten
YIELD_S = 0.005  # the model lock is let go this long between batches: a waiting request takes it


@dataclass(frozen=True)
class GraphJobStatus:
    id: str
    release: str
    state: str  # "queued" | "running" | "done" | "failed"
    stage: str  # what it is doing: "waiting", "edges into layer 15", "pruning", ...
    done: int  # progress within the stage
    total: int
    slug: str | None  # the saved graph, once done
    error: str | None  # why it failed
    elapsed_s: float


class GraphTimeLimit(SaescopeError):
    pass


class GraphJobs:
    def __init__(
        self,
        *,
        saes: dict[str, LiveSae],
        settings: Settings,
        tokenizer_lock: threading.Lock,
        model_lock: threading.Lock,
    ):
        self.saes = saes
        self.settings = settings
        self.tokenizer_lock = tokenizer_lock
        self.model_lock = model_lock
        self.worker = LiveWorker(
            queue_size=settings.graph_queue_size, name="saescope-graphs"
        ).start()
        self._jobs: OrderedDict[str, GraphJobStatus] = OrderedDict()
        self._lock = threading.Lock()
        self._sessions = None

    def close(self) -> None:
        self.worker.stop()
        if self._sessions is not None:
            self._sessions.kw["bind"].dispose()

    def call(self, op: GraphOp) -> Any:
        if isinstance(op, GraphSubmitOp):
            return self._graph_submit(op)
        if isinstance(op, GraphJobOp):
            return self._graph_job(op)
        return self._graph_import(op)

    # -- the store ----------------------------------------------------------------------------

    def sessions(self):
        """A writable session factory on the store, opened on first use."""
        if self._sessions is None:
            import sqlalchemy as sa
            from sqlalchemy.orm import sessionmaker

            from sae_core.store.db import create_engine_for

            engine = create_engine_for(self.settings.db_url)
            if not sa.inspect(engine).has_table("graphs"):
                engine.dispose()
                raise LiveRefused(
                    503, "the store has no graphs table yet; run `saescope migrate --db ...` once"
                )
            self._sessions = sessionmaker(engine, expire_on_commit=False)
        return self._sessions

    def _loaded(self, release: str) -> tuple[list[ReleaseLayer], str]:
        """The release's SAEs (one per layer), all loaded here, and the first one's name."""
        from sae_core.live.graph_run import release_layers

        with self.sessions()() as session:
            _, _, layers = release_layers(session, release)
        missing = [layer.name for layer in layers if layer.name not in self.saes]
        if missing:
            raise LiveRefused(
                503, f"live prompts are off for SAE {missing[0]!r} of release {release!r}"
            )
        return layers, layers[0].name

    # -- operations ---------------------------------------------------------------------------

    def _graph_submit(self, op: GraphSubmitOp) -> GraphJobStatus:
        from sae_core.live.graph_run import GraphRequest
        from sae_core.live.graph_settings import GraphLimits, Pruning
        from sae_core.live.probe import PromptTooLong, encode_prompt, single_token_id
        from sae_core.store.graphs import find_graph

        layers, first = self._loaded(op.release)
        subject = self.saes[first].subject
        with self.tokenizer_lock:  # refuse a bad request now, not in a failed job later
            try:
                encode_prompt(subject, op.prompt, max_tokens=self.settings.graph_max_prompt_tokens)
            except PromptTooLong as err:
                raise LiveRefused(413, f"{err} (graph_max_prompt_tokens)") from None
            for token in (op.target, op.contrast):
                if token is not None:
                    single_token_id(subject, token)
        request = GraphRequest(
            release=op.release,
            prompt=op.prompt,
            target=op.target,
            contrast=op.contrast,
            pruning=Pruning(op.node_share, op.edge_share),
            limits=GraphLimits(max_features=self.settings.graph_max_features),
            max_prompt_tokens=self.settings.graph_max_prompt_tokens,
        )
        job = GraphJobStatus(
            uuid.uuid4().hex[:16], op.release, "queued", "waiting", 0, 0, None, None, 0.0
        )
        with self.sessions()() as session:
            saved = find_graph(session, request.key())
        if saved is not None:
            job = replace(job, state="done", stage="saved before", slug=saved.slug)
            self._remember(job)
            return job
        self._remember(job)
        try:
            self.worker.submit(self._execute, job.id, request, layers)
        except WorkerBusy as err:
            self._forget(job.id)
            raise LiveRefused(
                503,
                f"{err}; the server builds {self.settings.graph_queue_size} graph(s) at most in its queue",
                retry_after_s=err.retry_after_s,
            ) from None
        return job

    def _graph_job(self, op: GraphJobOp) -> GraphJobStatus:
        with self._lock:
            job = self._jobs.get(op.job_id)
        if job is None or job.release != op.release:
            raise LiveRefused(
                404, f"no graph job {op.job_id!r} (jobs are forgotten when the server restarts)"
            )
        return job

    def _graph_import(self, op: GraphImportOp) -> str:
        from sae_core.live.graph_run import import_document

        return import_document(self.sessions(), op.release, op.text).slug

    # -- the job ------------------------------------------------------------------------------

    def _execute(self, job_id: str, request: GraphRequest, layers: list[ReleaseLayer]) -> None:
        from sae_core.live.graph import GraphSae
        from sae_core.live.graph_run import run_request

        start = time.monotonic()
        limit = self.settings.graph_timeout_s

        def progress(stage: str, done: int, total: int) -> None:
            elapsed = time.monotonic() - start
            if elapsed > limit:
                raise GraphTimeLimit(
                    f"the graph took longer than {limit:g} s (graph_timeout_s) and was stopped "
                    f"while {stage}; try a shorter prompt"
                )
            self._update(
                job_id, state="running", stage=stage, done=done, total=total, elapsed_s=elapsed
            )
            self.model_lock.release()  # between batches: a waiting live request runs now
            time.sleep(YIELD_S)
            self.model_lock.acquire()

        def load(_model: str, _layers):
            subject = self.saes[layers[0].name].subject
            return subject, [GraphSae(layer.layer, self.saes[layer.name].sae) for layer in layers]

        self.model_lock.acquire()
        try:
            progress("starting", 0, 1)
            row = run_request(self.sessions(), request, load=load, progress=progress)
        except SaescopeError as err:
            self._update(job_id, state="failed", error=str(err), elapsed_s=time.monotonic() - start)
        except Exception as err:  # the job fails; the worker and the model live on
            log.exception("graph job %s failed", job_id)
            message = f"the graph failed ({type(err).__name__}); the server log has the details"
            self._update(job_id, state="failed", error=message, elapsed_s=time.monotonic() - start)
        else:
            self._update(
                job_id,
                state="done",
                stage="done",
                slug=row.slug,
                elapsed_s=time.monotonic() - start,
            )
        finally:
            self.model_lock.release()

    def _remember(self, job: GraphJobStatus) -> None:
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > KEPT_JOBS:
                self._jobs.popitem(last=False)

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def _update(self, job_id: str, **changes) -> None:
        with self._lock:
            if job_id in self._jobs:
                self._jobs[job_id] = replace(self._jobs[job_id], **changes)
