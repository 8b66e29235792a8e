"""The server's live side: the store's SAEs whose model loaded, one model worker, and the data
functions that turn ``sae_core`` results into the models pages and ``/api/v1`` both return.

Imported only when live may be on (it imports torch); ``app.routes.live`` reaches it through
``app.state.live``. Prompts are tokenised in the request thread, so an overlong one is refused
(413) before it takes a queue slot; only model work goes to the worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import sqlalchemy as sa
import torch
from fastapi import HTTPException
from sqlalchemy.orm import Session

from app import queries
from app.live_schemas import (
    AttributionEntryPublic,
    AttributionPublic,
    AttributionRequest,
    ContinuationPublic,
    FeatureAttributionPublic,
    FeatureOnTextPublic,
    FeatureValuePublic,
    PredictionPublic,
    PromptActivationsPublic,
    PromptRequest,
    PromptTokenPublic,
    RankedFeaturePublic,
    SteeringPublic,
    SteerRequest,
    TokenValuePublic,
)
from app.live_worker import LiveWorker, WorkerBusy, WorkerTimeout
from app.settings import Settings
from sae_core import live
from sae_core.attribution import Target, attribution
from sae_core.errors import SaescopeError
from sae_core.sae import SAE, load_sae
from sae_core.steering import Generation, SteerFeature, steer
from sae_core.store import FeatureRow, SaeRow, SubjectModelRow
from sae_core.subject import Subject, load_subject

log = logging.getLogger("saescope.live")
T = TypeVar("T")


class LiveUnavailableError(SaescopeError):
    """Live was required (``--live``) but no SAE's model could be loaded."""


@dataclass(frozen=True)
class LiveSae:
    """One SAE ready for live prompts: its subject model (shared by SAEs of the same model)."""

    name: str
    layer: int
    subject: Subject
    sae: SAE


class LiveService:
    def __init__(
        self, *, saes: dict[str, LiveSae], unavailable: dict[str, str], settings: Settings
    ):
        self.saes = saes
        self.unavailable = unavailable  # SAE name -> why live is off for it
        self.settings = settings
        self.worker = LiveWorker(queue_size=settings.live_queue_size).start()
        self._tokenizer_lock = (
            threading.Lock()
        )  # request threads tokenise; fast tokenizers are not re-entrant

    @classmethod
    def load(cls, *, session: Session, settings: Settings) -> LiveService:
        """Load every SAE of the store with its model (``settings.model`` overrides the store's
        model name). With ``settings.live`` true, fail unless at least one loads."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        rows = session.execute(
            sa.select(SaeRow.name, SaeRow.layer, SaeRow.path, SubjectModelRow.name)
            .join(SubjectModelRow, SubjectModelRow.id == SaeRow.model_id)
            .order_by(SaeRow.name)
        ).all()
        subjects: dict[str, Subject] = {}
        saes: dict[str, LiveSae] = {}
        unavailable: dict[str, str] = {}
        for name, layer, path, model_name in rows:
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
        if settings.live and rows and not saes:
            reasons = "; ".join(f"{name}: {why}" for name, why in unavailable.items())
            raise LiveUnavailableError(f"--live was asked for but no SAE's model loads ({reasons})")
        return cls(saes=saes, unavailable=unavailable, settings=settings)

    def close(self) -> None:
        self.worker.stop()

    # -- plumbing -------------------------------------------------------------------------

    def get(self, *, session: Session, sae_name: str) -> LiveSae:
        if sae_name in self.saes:
            return self.saes[sae_name]
        queries.get_sae_row(session=session, sae_name=sae_name)  # 404 for an unknown SAE
        reason = self.unavailable.get(sae_name, "it was added after the server started")
        raise HTTPException(503, f"live prompts are off for SAE {sae_name!r}: {reason}")

    def encode(self, target: LiveSae, text: str, *, chat: bool = False) -> live.Prompt:
        with self._tokenizer_lock:
            try:
                return live.encode_prompt(
                    target.subject, text, chat=chat, max_tokens=self.settings.max_prompt_tokens
                )
            except live.PromptTooLong as err:
                raise HTTPException(413, f"{err} (max_prompt_tokens)") from None

    def token_id(self, target: LiveSae, text: str | None, token_id: int | None) -> int | None:
        if text is None:
            return token_id
        with self._tokenizer_lock:
            return live.single_token_id(target.subject, text)

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn`` on the model worker, with the server's queue and time limits as HTTP errors."""
        try:
            return self.worker.run(fn, *args, timeout_s=self.settings.live_timeout_s, **kwargs)
        except WorkerBusy as err:
            raise HTTPException(
                503,
                f"{err}; the server runs one live request at a time",
                headers={"Retry-After": str(err.retry_after_s)},
            ) from None
        except WorkerTimeout as err:
            raise HTTPException(
                504, f"{err} (live_timeout_s); try a shorter prompt or fewer new tokens"
            ) from None

    # -- data functions: one per endpoint, shared by its page fragment ---------------------

    def activations(
        self, *, session: Session, sae_name: str, request: PromptRequest
    ) -> PromptActivationsPublic:
        target = self.get(session=session, sae_name=sae_name)
        prompt = self.encode(target, request.text)
        result = self.run(
            live.activations,
            target.subject,
            target.sae,
            target.layer,
            prompt,
            per_token=request.per_token,
            top=request.top,
        )
        indices = [r.feature for r in result.ranked] + [
            fv.feature for row in result.top_per_token for fv in row
        ]
        labels = _labels(session, sae_name, indices)
        return PromptActivationsPublic(
            sae=sae_name,
            tokens=_tokens(result.tokens),
            top_per_token=[
                [
                    FeatureValuePublic(
                        index=fv.feature, value=fv.value, label=labels.get(fv.feature)
                    )
                    for fv in row
                ]
                for row in result.top_per_token
            ],
            ranked=[
                RankedFeaturePublic(
                    index=r.feature,
                    label=labels.get(r.feature),
                    max_value=r.max_value,
                    max_position=r.max_position,
                    values=r.values,
                )
                for r in result.ranked
            ],
        )

    def feature_on_text(
        self, *, session: Session, sae_name: str, index: int, text: str
    ) -> FeatureOnTextPublic:
        target = self.get(session=session, sae_name=sae_name)
        summary = queries.get_feature_summary(session=session, sae_name=sae_name, index=index)
        prompt = self.encode(target, text)
        result = self.run(
            live.feature_activations, target.subject, target.sae, target.layer, prompt, index
        )
        return FeatureOnTextPublic(
            sae=sae_name,
            index=index,
            label=summary.label,
            tokens=[
                TokenValuePublic(text=t.text, value=v)
                for t, v in zip(result.tokens, result.values, strict=True)
            ],
            max_value=result.max_value,
            max_position=result.max_position,
            corpus_max=summary.max_act,
        )

    def attribution(
        self, *, session: Session, sae_name: str, request: AttributionRequest
    ) -> AttributionPublic:
        target = self.get(session=session, sae_name=sae_name)
        prompt = self.encode(target, request.text)
        spec = Target(
            position=request.position,
            token=self.token_id(target, request.token, request.token_id),
            contrast=self.token_id(target, request.contrast, request.contrast_id),
        )
        result = self.run(
            attribution, target.subject, target.sae, target.layer, prompt, spec, top=request.top
        )
        labels = _labels(
            session,
            sae_name,
            [e.feature for e in result.entries] + [f.feature for f in result.features],
        )
        return AttributionPublic(
            sae=sae_name,
            tokens=_tokens(result.tokens),
            position=result.position,
            target=PredictionPublic(**result.token._asdict()),
            contrast=PredictionPublic(**result.contrast._asdict()) if result.contrast else None,
            metric=result.metric,
            predictions=[PredictionPublic(**p._asdict()) for p in result.predictions],
            entries=[
                AttributionEntryPublic(
                    index=e.feature,
                    label=labels.get(e.feature),
                    position=e.position,
                    activation=e.activation,
                    attribution=e.attribution,
                    dla=e.dla,
                )
                for e in result.entries
            ],
            features=[
                FeatureAttributionPublic(
                    index=f.feature,
                    label=labels.get(f.feature),
                    attribution=f.attribution,
                    dla=f.dla,
                    top_position=f.top_position,
                    values=f.values,
                )
                for f in result.features
            ],
            total=result.total,
            error=result.error,
        )

    def steer(self, *, session: Session, sae_name: str, request: SteerRequest) -> SteeringPublic:
        target = self.get(session=session, sae_name=sae_name)
        prompt = self.encode(target, request.text, chat=request.apply_chat_template)
        generation = Generation(
            max_new_tokens=min(request.max_new_tokens, self.settings.max_new_tokens),
            temperature=request.temperature,
            seed=request.seed,
        )
        features = [SteerFeature(f.index, f.strength) for f in request.features]
        result = self.run(
            steer,
            target.subject,
            target.sae,
            target.layer,
            prompt,
            features,
            mode=request.mode,
            generation=generation,
        )
        return SteeringPublic(
            sae=sae_name,
            prompt_text=result.prompt_text,
            mode=request.mode,
            features=request.features,
            max_new_tokens=generation.max_new_tokens,
            temperature=generation.temperature,
            seed=generation.seed,
            default=ContinuationPublic(**result.default._asdict()),
            steered=ContinuationPublic(**result.steered._asdict()),
        )


def _tokens(tokens: Iterable[live.PromptToken]) -> list[PromptTokenPublic]:
    return [PromptTokenPublic(**t._asdict()) for t in tokens]


def _labels(session: Session, sae_name: str, indices: Iterable[int]) -> dict[int, str | None]:
    """Feature index -> its label in the store, in one query."""
    wanted = sorted(set(indices))
    if not wanted:
        return {}
    rows = session.execute(
        sa.select(FeatureRow.idx, FeatureRow.label)
        .join(SaeRow, SaeRow.id == FeatureRow.sae_id)
        .where(SaeRow.name == sae_name, FeatureRow.idx.in_(wanted))
    )
    return {idx: label for idx, label in rows}
