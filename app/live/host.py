"""The model side of live prompts: the store's SAEs whose model loaded, and one model worker.

``ModelHost.call(op)`` runs one live operation, a typed request of ``sae_core.live.requests``
chosen by its type, and returns the plain ``sae_core`` result (lists, floats and named tuples,
so it pickles across processes). It runs in
the live model process that ``saescope serve`` starts (``app.live.remote``), or inside the app
when no such process is given (tests, an embedded app). Web workers never import this module:
it imports torch.

A request takes its place in the model's queue before anything else, so under overload the 503
comes at once; it is then tokenised on the calling thread (an overlong prompt is 413) and only
model work goes to the worker. Every refusal is a ``LiveRefused`` with its
HTTP status, whatever the transport.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, TypeVar

import sqlalchemy as sa
import torch
from sqlalchemy.orm import Session

from app.errors import error_answer
from app.live.jobs import GraphJobs
from app.live.loaded import LiveSae
from app.live.worker import (
    LiveRefused,
    LiveUnavailableError,
    LiveWorker,
    WorkerBusy,
    WorkerTimeout,
)
from app.settings import Settings
from sae_core.errors import NotFoundError, SaescopeError
from sae_core.inputs.subject import Subject, load_subject
from sae_core.live import probe as live
from sae_core.live.attribution import Attribution, Target, attribution
from sae_core.live.requests import (
    ActivationsOp,
    AttributionOp,
    FeatureOnTextOp,
    GraphImportOp,
    GraphJobOp,
    GraphOp,
    GraphSubmitOp,
    LiveOp,
    ReleaseActivationsOp,
    SteerOp,
)
from sae_core.live.steering import Steering, steer
from sae_core.saes.formats import load_sae, stored_prefix
from sae_core.store.db import SaeRow, SubjectModelRow

log = logging.getLogger("saescope.live")
T = TypeVar("T")
Job = Callable[[], T]  # a prepared request's model work, run on the worker


def sae_sources(session: Session) -> list[tuple[str, int, str, int | None, str]]:
    """(SAE name, layer, path, Matryoshka prefix or None, subject model name) for every SAE in
    the store."""
    rows = session.execute(
        sa.select(SaeRow.name, SaeRow.layer, SaeRow.path, SaeRow.train_cfg, SaeRow.d_sae, SubjectModelRow.name)
        .join(SubjectModelRow, SubjectModelRow.id == SaeRow.model_id)
        .order_by(SaeRow.name)
    )
    return [(name, layer, path, stored_prefix(meta or {}, d_sae), model) for name, layer, path, meta, d_sae, model in rows]


class ModelHost:
    def __init__(
        self, *, saes: dict[str, LiveSae], unavailable: dict[str, str], settings: Settings
    ):
        self.saes = saes
        self.unavailable = unavailable  # SAE name -> why live is off for it
        self.settings = settings
        self.worker = LiveWorker(queue_size=settings.live_queue_size).start()
        # Request threads tokenise, and fast tokenizers are not re-entrant.
        self._tokenizer_lock = threading.Lock()
        # Graph jobs run on a thread of their own; hooks on the shared model are seen by every
        # thread, so a live request and a graph batch never run at once (app.live.jobs).
        self._model_lock = threading.Lock()
        self.graphs = GraphJobs(
            saes=saes,
            settings=settings,
            tokenizer_lock=self._tokenizer_lock,
            model_lock=self._model_lock,
        )
        self._operations: dict[type, Callable[[LiveSae, Any], Job]] = {
            ActivationsOp: self._activations,
            FeatureOnTextOp: self._feature_on_text,
            AttributionOp: self._attribution,
            SteerOp: self._steer,
        }

    @classmethod
    def load(cls, sources: Iterable[tuple[str, int, str, str]], *, settings: Settings) -> ModelHost:
        """Load every SAE of ``sources`` (see ``sae_sources``) with its model;
        ``settings.model`` overrides the store's model name. With ``settings.live`` true, fail
        unless at least one loads."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        subjects: dict[str, Subject] = {}
        saes: dict[str, LiveSae] = {}
        unavailable: dict[str, str] = {}
        sources = list(sources)
        for name, layer, path, prefix, model_name in sources:
            spec = settings.model or model_name
            try:
                if spec not in subjects:
                    subjects[spec] = load_subject(spec, device=device)
                subject = subjects[spec]
                sae = load_sae(path, d_in=subject.d_model, prefix=prefix).to(device)
                saes[name] = LiveSae(
                    name=name, layer=subject.check_layer(layer), subject=subject, sae=sae
                )
            except SaescopeError as err:
                unavailable[name] = str(err)
                log.warning("live prompts are off for SAE %s: %s", name, err)
        if settings.live and sources and not saes:
            reasons = "; ".join(f"{name}: {why}" for name, why in unavailable.items())
            raise LiveUnavailableError(f"--live was asked for but no SAE's model loads ({reasons})")
        return cls(saes=saes, unavailable=unavailable, settings=settings)

    @property
    def live_saes(self) -> frozenset[str]:
        return frozenset(self.saes)

    def close(self) -> None:
        self.worker.stop()
        self.graphs.close()

    def call(self, op: LiveOp | GraphOp) -> Any:
        """Run ``op`` on its SAE's model; a LiveRefused says why it cannot.

        In three steps: a place in the model's queue first, so a refused request costs no work;
        then the request is prepared on this thread (tokenised, its feature index checked); then
        the model work runs on the worker, within the server's time limit. Graph operations go
        to the graph jobs (their own queue and thread)."""
        if isinstance(op, GraphSubmitOp | GraphJobOp | GraphImportOp):
            return self._refusing(self.graphs.call, op)
        if isinstance(op, ReleaseActivationsOp):
            targets = [self._target(name) for name in op.saes]
            return self._refusing(self._run, partial(self._release_activations, targets, op))
        target = self._target(op.sae)
        return self._refusing(self._run, partial(self._operations[type(op)], target, op))

    def _target(self, sae_name: str) -> LiveSae:
        target = self.saes.get(sae_name)
        if target is None:
            reason = self.unavailable.get(sae_name, "it is not in the store the model side read")
            raise LiveRefused(503, f"live prompts are off for SAE {sae_name!r}: {reason}")
        return target

    def _run(self, prepare: Callable[[], Job[T]]) -> T:
        """Take a place in the queue, then ``prepare`` the request (on this thread), then run the
        model work it returns on the worker."""
        with self.worker.admit() as place:
            job = prepare()
            return place.run(_holding(self._model_lock, job), timeout_s=self.settings.live_timeout_s)

    @staticmethod
    def _refusing(fn: Callable[..., T], *args) -> T:
        """``fn(*args)``, each way it can refuse as a LiveRefused with its HTTP status."""
        try:
            return fn(*args)
        except WorkerBusy as err:
            raise LiveRefused(
                503,
                f"{err}; the server runs one live request at a time",
                retry_after_s=err.retry_after_s,
            ) from None
        except WorkerTimeout as err:
            raise LiveRefused(
                504, f"{err} (live_timeout_s); try a shorter prompt or fewer new tokens"
            ) from None
        except live.PromptTooLong as err:
            raise LiveRefused(413, f"{err} (max_prompt_tokens)") from None
        except SaescopeError as err:  # an unknown feature, a target that is not one token ...
            status, message, _ = error_answer(err)
            raise LiveRefused(status, message) from None

    # -- preparing a request --------------------------------------------------------------

    def _encode(self, target: LiveSae, text: str, *, chat: bool = False) -> live.Prompt:
        with self._tokenizer_lock:
            return live.encode_prompt(
                target.subject, text, chat=chat, max_tokens=self.settings.max_prompt_tokens
            )

    def _token_id(self, target: LiveSae, text: str | None, token_id: int | None) -> int | None:
        if text is None:
            return token_id
        with self._tokenizer_lock:
            return live.single_token_id(target.subject, text)

    # -- operations: each prepares its request and returns the model work, a call of no arguments

    def _activations(self, target: LiveSae, op: ActivationsOp) -> Job[live.PromptActivations]:
        prompt = self._encode(target, op.text)
        return partial(
            live.activations, *target.model, prompt, per_token=op.per_token, top=op.top
        )

    def _feature_on_text(self, target: LiveSae, op: FeatureOnTextOp) -> Job[live.FeatureOnText]:
        if not 0 <= op.index < target.sae.d_sae:  # before tokenising: a 404 costs nothing
            raise NotFoundError.feature(op.sae, op.index, target.sae.d_sae)
        prompt = self._encode(target, op.text)
        return partial(live.feature_activations, *target.model, prompt, op.index)

    def _attribution(self, target: LiveSae, op: AttributionOp) -> Job[Attribution]:
        prompt = self._encode(target, op.text)
        spec = Target(
            position=op.position,
            token=self._token_id(target, op.token, op.token_id),
            contrast=self._token_id(target, op.contrast, op.contrast_id),
        )
        return partial(attribution, *target.model, prompt, spec, top=op.top)

    def _release_activations(
        self, targets: list[LiveSae], op: ReleaseActivationsOp
    ) -> Job[live.ReleaseActivations]:
        subject = targets[0].subject
        if any(target.subject is not subject for target in targets):
            raise LiveRefused(
                422, "these SAEs read different models; one forward pass cannot serve them all"
            )
        prompt = self._encode(targets[0], op.text)
        return partial(
            live.release_activations,
            subject,
            [(target.name, target.sae, target.layer) for target in targets],
            prompt,
            per_token=op.per_token,
            top=op.top,
        )

    def _steer(self, target: LiveSae, op: SteerOp) -> Job[Steering]:
        prompt = self._encode(target, op.text, chat=op.chat)
        return partial(
            steer, *target.model, prompt, list(op.features), mode=op.mode, generation=op.generation
        )


def _holding(lock: threading.Lock, job: Job[T]) -> Job[T]:
    """``job``, run while holding ``lock``."""

    def run() -> T:
        with lock:
            return job()

    return run
