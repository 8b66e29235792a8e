"""The model side of live prompts: the store's SAEs whose model loaded, and one model worker.

``ModelHost.call(op, sae, **params)`` runs one live operation and returns the plain
``sae_core`` result (lists, floats and named tuples, so it pickles across processes). It runs in
the live model process that ``saescope serve`` starts (``app.live.remote``), or inside the app
when no such process is given (tests, an embedded app). Web workers never import this module:
it imports torch.

Prompts are tokenised on the calling thread, so an overlong one is refused (413) before it takes
a queue slot; only model work goes to the worker. Every refusal is a ``LiveRefused`` with its
HTTP status, whatever the transport.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
import torch
from sqlalchemy.orm import Session

from app.live.jobs import GRAPH_OPERATIONS, GraphJobs
from app.live.worker import (
    LiveRefused,
    LiveUnavailableError,
    LiveWorker,
    WorkerBusy,
    WorkerTimeout,
)
from app.settings import Settings
from sae_core.errors import SaescopeError
from sae_core.inputs.subject import Subject, load_subject
from sae_core.live import probe as live
from sae_core.live.attribution import Attribution, Target, attribution
from sae_core.live.steering import Generation, SteerFeature, Steering, steer
from sae_core.saes.sae import SAE, load_sae
from sae_core.store.db import SaeRow, SubjectModelRow

log = logging.getLogger("saescope.live")
T = TypeVar("T")


def sae_sources(session: Session) -> list[tuple[str, int, str, str]]:
    """(SAE name, layer, path, subject model name) for every SAE in the store."""
    rows = session.execute(
        sa.select(SaeRow.name, SaeRow.layer, SaeRow.path, SubjectModelRow.name)
        .join(SubjectModelRow, SubjectModelRow.id == SaeRow.model_id)
        .order_by(SaeRow.name)
    )
    return [tuple(row) for row in rows]


@dataclass(frozen=True)
class LiveSae:
    """One SAE ready for live prompts: its subject model (shared by SAEs of the same model)."""

    name: str
    layer: int
    subject: Subject
    sae: SAE


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
        self._operations: dict[str, Callable[..., Any]] = {
            "activations": self._activations,
            "feature_on_text": self._feature_on_text,
            "attribution": self._attribution,
            "steer": self._steer,
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
        for name, layer, path, model_name in sources:
            spec = settings.model or model_name
            try:
                if spec not in subjects:
                    subjects[spec] = load_subject(spec, device=device)
                subject = subjects[spec]
                sae = load_sae(path, d_in=subject.d_model).to(device)
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

    def call(self, operation: str, sae_name: str, **params) -> Any:
        """Run ``operation`` on ``sae_name``'s model (graph operations: on a release's, named
        by ``sae_name``); a LiveRefused says why it cannot."""
        target = self.saes.get(sae_name)
        if target is None and operation not in GRAPH_OPERATIONS:
            reason = self.unavailable.get(sae_name, "it is not in the store the model side read")
            raise LiveRefused(503, f"live prompts are off for SAE {sae_name!r}: {reason}")
        try:
            if operation in GRAPH_OPERATIONS:
                return self.graphs.call(operation, sae_name, **params)
            return self._operations[operation](target, **params)
        except live.PromptTooLong as err:
            raise LiveRefused(413, f"{err} (max_prompt_tokens)") from None
        except SaescopeError as err:  # a bad feature index, a target that is not one token ...
            raise LiveRefused(422, str(err)) from None

    # -- plumbing -------------------------------------------------------------------------

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

    def _run(self, fn: Callable[..., T], target: LiveSae, *args, **kwargs) -> T:
        """``fn(subject, sae, layer, *args, **kwargs)`` on the model worker, within the
        server's queue and time limits."""
        try:
            return self.worker.run(
                _holding(self._model_lock, fn),
                target.subject,
                target.sae,
                target.layer,
                *args,
                timeout_s=self.settings.live_timeout_s,
                **kwargs,
            )
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

    # -- operations -------------------------------------------------------------------------

    def _activations(
        self, target: LiveSae, *, text: str, per_token: int, top: int
    ) -> live.PromptActivations:
        prompt = self._encode(target, text)
        return self._run(live.activations, target, prompt, per_token=per_token, top=top)

    def _feature_on_text(self, target: LiveSae, *, index: int, text: str) -> live.FeatureOnText:
        prompt = self._encode(target, text)
        return self._run(live.feature_activations, target, prompt, index)

    def _attribution(
        self,
        target: LiveSae,
        *,
        text: str,
        position: int | None,
        token: str | None,
        token_id: int | None,
        contrast: str | None,
        contrast_id: int | None,
        top: int,
    ) -> Attribution:
        prompt = self._encode(target, text)
        spec = Target(
            position=position,
            token=self._token_id(target, token, token_id),
            contrast=self._token_id(target, contrast, contrast_id),
        )
        return self._run(attribution, target, prompt, spec, top=top)

    def _steer(
        self,
        target: LiveSae,
        *,
        text: str,
        chat: bool,
        features: list[tuple[int, float]],
        mode: str,
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> Steering:
        prompt = self._encode(target, text, chat=chat)
        generation = Generation(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        return self._run(
            steer,
            target,
            prompt,
            [SteerFeature(index, strength) for index, strength in features],
            mode=mode,
            generation=generation,
        )


def _holding(lock: threading.Lock, fn: Callable[..., T]) -> Callable[..., T]:
    def run(*args, **kwargs) -> T:
        with lock:
            return fn(*args, **kwargs)

    return run
