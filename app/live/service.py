"""The web side of live prompts: one model backend, and the data functions that turn its
``sae_core`` results into the models pages and ``/api/v1`` both return, with the store's labels.

Every live request is admitted first, on the event loop (``LiveService.admitted``, with the
places of ``app.live.admission``): a refusal under overload is answered before anything is
awaited, with no worker thread, no session and no round trip to the model. The backend is the
live model process that ``saescope serve`` starts (``app.live.remote``,
shared by every web worker), or, when the settings name none, a ``ModelHost`` loaded inside this
app (tests, an app embedded in another program). Both answer ``call(op)``, a typed request of
``sae_core.live.requests``, with plain results or a ``LiveRefused``; this module imports no torch
either way.
``app.routes.live`` reaches it through ``app.deps.LiveDep`` (``app.state.live``; None when live
is switched off).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app import queries
from app.live.admission import LivePlaces
from app.live.remote import RemoteModel
from app.live.schemas import (
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
    PromptTokenValuePublic,
    RankedFeaturePublic,
    ReleaseActivationsPublic,
    SaeActivationsPublic,
    SteeringPublic,
    SteerRequest,
)
from app.live.worker import LiveRefused
from app.settings import Settings
from sae_core.live.requests import (
    ActivationsOp,
    AttributionOp,
    FeatureOnTextOp,
    GraphOp,
    LiveOp,
    ReleaseActivationsOp,
    SteerOp,
)
from sae_core.live.results import (
    Attribution,
    FeatureOnText,
    Generation,
    PromptActivations,
    PromptToken,
    ReleaseActivations,
    SaeActivations,
    SteerFeature,
    Steering,
)
from sae_core.store.db import FeatureRow, SaeRow
from sae_core.store.lookup import find_release, find_sae
from sae_core.store.releases import release_saes

T = TypeVar("T")


class ModelBackend(Protocol):
    """What the web side needs of the model side (``ModelHost`` or ``RemoteModel``)."""

    live_saes: frozenset[str]
    unavailable: dict[str, str]  # SAE name -> why live is off for it

    def call(self, op: LiveOp | GraphOp) -> Any: ...

    def close(self) -> None: ...


LIVE_OFF = (
    "live prompts are off on this server; start it with `saescope serve --live` "
    "(SAESCOPE_LIVE=true) where the SAE's model can be loaded"
)


def require_live(service: LiveService | None) -> LiveService:
    """The app's live service; LiveRefused (503) when the server runs without one."""
    if service is None:
        raise LiveRefused(503, LIVE_OFF)
    return service


def live_on(service: LiveService | None, sae_name: str) -> bool:
    """Whether pages offer live prompts for ``sae_name`` on this server."""
    return service is not None and service.is_live(sae_name)


def live_off_reason(service: LiveService | None, sae_name: str) -> str | None:
    """Why live prompts are off for ``sae_name`` on this server, or None when they are on."""
    if service is None:
        return LIVE_OFF
    return None if service.is_live(sae_name) else service.off_reason(sae_name)


class LiveService:
    def __init__(
        self,
        *,
        backend: ModelBackend,
        settings: Settings,
        sessions: sessionmaker,
        places_folder: Path | None = None,
    ):
        """``places_folder`` holds the admission places (``app.live.admission``), shared by
        every web worker that talks to the same model side; None makes a private one, removed
        at ``close`` (a model loaded into this app serves this app alone)."""
        self.backend = backend
        self.settings = settings
        self.sessions = sessions
        self._own_folder = None
        if places_folder is None:
            places_folder = self._own_folder = Path(tempfile.mkdtemp(prefix="saescope-places-"))
        # The model's queue and the request it runs: at most that many are with it at once.
        self.places = LivePlaces(places_folder, settings.live_queue_size + 1)

    @classmethod
    def open(cls, *, sessions: sessionmaker, settings: Settings) -> LiveService:
        """Connect to the live model process named by ``settings.live_socket`` (its private
        folder holds the places every worker shares), or load the store's models into this app
        when it names none."""
        if settings.live_socket:
            backend = RemoteModel(settings.live_socket, timeout_s=settings.live_timeout_s)
            folder = Path(settings.live_socket).parent
        else:
            from app.live.host import ModelHost, sae_sources  # imports torch

            with sessions() as session:
                backend = ModelHost.load(sae_sources(session), settings=settings)
            folder = None
        return cls(backend=backend, settings=settings, sessions=sessions, places_folder=folder)

    def close(self) -> None:
        self.backend.close()
        if self._own_folder is not None:
            shutil.rmtree(self._own_folder, ignore_errors=True)

    async def admitted(self, data: Callable[..., T], /, **kwargs) -> T:
        """``data(session=..., **kwargs)``, one of the data functions below, for a live request
        that has a place. The place is taken here, on the event loop, before anything is
        awaited: when every place is held, the LiveRefused (503, Retry-After) comes with no
        worker thread, no session and no message to the model side. The data function then runs
        on a worker thread with a session of its own."""
        with self.places.hold():
            return await run_in_threadpool(self._in_session, data, **kwargs)

    def _in_session(self, data: Callable[..., T], **kwargs) -> T:
        with self.sessions() as session:
            return data(session=session, **kwargs)

    def is_live(self, sae_name: str) -> bool:
        return sae_name in self.backend.live_saes

    def off_reason(self, sae_name: str) -> str:
        return self.backend.unavailable.get(
            sae_name, "it was added after the server started; restart the server"
        )

    def call(self, session: Session, op: LiveOp) -> Any:
        """``op`` on the model side; an unknown SAE is a NotFoundError and every refusal a
        LiveRefused with its status (and Retry-After when the queue is full)."""
        for sae_name in op.saes if isinstance(op, ReleaseActivationsOp) else (op.sae,):
            if not self.is_live(sae_name):
                find_sae(session, sae_name)  # 404 for an unknown SAE
                raise LiveRefused(
                    503, f"live prompts are off for SAE {sae_name!r}: {self.off_reason(sae_name)}"
                )
        return self.backend.call(op)

    # -- data functions: one per endpoint, shared by its page fragment ---------------------

    def activations(
        self, *, session: Session, sae_name: str, request: PromptRequest
    ) -> PromptActivationsPublic:
        op = ActivationsOp(
            sae=sae_name, text=request.text, per_token=request.per_token, top=request.top
        )
        result: PromptActivations = self.call(session, op)
        return PromptActivationsPublic(
            sae=sae_name, tokens=_tokens(result.tokens), **_firing(session, sae_name, result)
        )

    def release_activations(
        self, *, session: Session, release_name: str, request: PromptRequest
    ) -> ReleaseActivationsPublic:
        """What fires in every SAE of the release, from one forward pass (each SAE at its own
        layer), with each SAE's labels."""
        saes = release_saes(session, find_release(session, release_name).id)
        if not saes:
            raise LiveRefused(503, f"release {release_name!r} has no complete SAE yet")
        op = ReleaseActivationsOp(
            release=release_name,
            saes=tuple(sae.name for sae in saes),
            text=request.text,
            per_token=request.per_token,
            top=request.top,
        )
        result: ReleaseActivations = self.call(session, op)
        widths = {sae.name: sae.d_sae for sae in saes}
        return ReleaseActivationsPublic(
            release=release_name,
            tokens=_tokens(result.tokens),
            saes=[
                SaeActivationsPublic(
                    sae=part.sae,
                    layer=part.layer,
                    d_sae=widths[part.sae],
                    **_firing(session, part.sae, part),
                )
                for part in result.saes
            ],
        )

    def feature_on_text(
        self, *, session: Session, sae_name: str, index: int, text: str
    ) -> FeatureOnTextPublic:
        op = FeatureOnTextOp(sae=sae_name, index=index, text=text)
        result: FeatureOnText = self.call(session, op)  # admission first: no store work before
        summary = queries.get_feature_summary(session=session, sae_name=sae_name, index=index)
        return FeatureOnTextPublic(
            sae=sae_name,
            index=index,
            label=summary.label,
            tokens=[
                PromptTokenValuePublic(text=t.text, value=v)
                for t, v in zip(result.tokens, result.values, strict=True)
            ],
            max_value=result.max_value,
            max_position=result.max_position,
            corpus_max=summary.max_act,
        )

    def attribution(
        self, *, session: Session, sae_name: str, request: AttributionRequest
    ) -> AttributionPublic:
        op = AttributionOp(
            sae=sae_name,
            text=request.text,
            position=request.position,
            token=request.token,
            token_id=request.token_id,
            contrast=request.contrast,
            contrast_id=request.contrast_id,
            top=request.top,
        )
        result: Attribution = self.call(session, op)
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
        max_new_tokens = min(request.max_new_tokens, self.settings.max_new_tokens)
        op = SteerOp(
            sae=sae_name,
            text=request.text,
            chat=request.apply_chat_template,
            features=tuple(SteerFeature(f.index, f.strength) for f in request.features),
            mode=request.mode,
            generation=Generation(
                max_new_tokens=max_new_tokens, temperature=request.temperature, seed=request.seed
            ),
        )
        result: Steering = self.call(session, op)
        return SteeringPublic(
            sae=sae_name,
            prompt_text=result.prompt_text,
            mode=request.mode,
            features=request.features,
            max_new_tokens=max_new_tokens,
            temperature=request.temperature,
            seed=request.seed,
            default=ContinuationPublic(**result.default._asdict()),
            steered=ContinuationPublic(**result.steered._asdict()),
        )


def _firing(
    session: Session, sae_name: str, result: PromptActivations | SaeActivations
) -> dict[str, list]:
    """``top_per_token`` and ``ranked`` of one SAE's result, with the store's labels."""
    indices = [r.feature for r in result.ranked] + [
        fv.feature for row in result.top_per_token for fv in row
    ]
    labels = _labels(session, sae_name, indices)
    return {
        "top_per_token": [
            [
                FeatureValuePublic(index=fv.feature, value=fv.value, label=labels.get(fv.feature))
                for fv in row
            ]
            for row in result.top_per_token
        ],
        "ranked": [
            RankedFeaturePublic(
                index=r.feature,
                label=labels.get(r.feature),
                max_value=r.max_value,
                max_position=r.max_position,
                values=r.values,
            )
            for r in result.ranked
        ],
    }


def _tokens(tokens: Iterable[PromptToken]) -> list[PromptTokenPublic]:
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
