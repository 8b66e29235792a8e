"""Live prompts: ``/api/v1`` endpoints, the prompt page, and the htmx fragments it swaps in.

``lifespan`` reaches the model side when live is not switched off: the live model process of
``saescope serve``, or a model loaded into this app (``app.live.service``). Every endpoint calls
one ``LiveService`` data function through ``LiveService.admitted``; the API returns its model
and the matching fragment renders it. Pages never touch the model, so browsing stays fast while
it is busy.

The live routes are ``async``, and reach nothing through a sync dependency, so that admission
runs on the event loop before anything else is awaited (a sync route or dependency first waits
for a worker thread): under overload a 503 costs no thread, no session and no message to the
model side.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, NamedTuple, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from app import queries
from app.deps import LiveDep, SessionDep, SettingsDep
from app.errors import Refused, error_answer
from app.live.schemas import (
    AttributionPublic,
    AttributionRequest,
    FeatureOnTextPublic,
    FeatureTextRequest,
    PromptActivationsPublic,
    PromptRequest,
    PromptTokenPublic,
    PromptTokenValuePublic,
    ReleaseActivationsPublic,
    SteeringPublic,
    SteerRequest,
)
from app.live.service import LiveService, live_off_reason, require_live
from app.params import FeatureIndex
from app.rendering import render, url_segment
from sae_core.errors import SaescopeError

router = APIRouter()
M = TypeVar("M", bound=BaseModel)

LIVE_ERRORS = {
    404: {"description": "Unknown SAE or feature"},
    413: {"description": "The prompt has more tokens than max_prompt_tokens"},
    422: {"description": "Invalid request (bad feature index, a target that is not one token ...)"},
    503: {"description": "Live is off for this SAE, or the queue is full (see Retry-After)"},
    504: {"description": "The model did not answer within live_timeout_s"},
}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Reach the model side unless live is switched off (routes get it as ``LiveDep``)."""
    settings = app.state.settings
    service = None
    if settings.live is not False:
        service = LiveService.open(sessions=app.state.sessionmaker, settings=settings)
    app.state.live = service
    try:
        yield
    finally:
        if service is not None:
            service.close()


def _sae_path(sae: str) -> str:
    return f"/saes/{url_segment(sae)}"


# ---------------------------------------------------------------------------------------------
# /api/v1


@router.post(
    "/api/v1/saes/{sae}/activations",
    tags=["live"],
    responses=LIVE_ERRORS,
    summary="Which features fire on a prompt",
)
async def post_activations(sae: str, body: PromptRequest, live: LiveDep) -> PromptActivationsPublic:
    service = require_live(live)
    return await service.admitted(service.activations, sae_name=sae, request=body)


@router.post(
    "/api/v1/releases/{release}/activations",
    tags=["live"],
    responses={**LIVE_ERRORS, 404: {"description": "Unknown release"}},
    summary="Which features of every SAE of a release fire on a prompt",
    description="One forward pass to the deepest layer of the release's SAEs; each SAE encodes "
    "the residual stream of its own layer. `per_token` and `top` apply to each SAE.",
)
async def post_release_activations(
    release: str, body: PromptRequest, live: LiveDep
) -> ReleaseActivationsPublic:
    service = require_live(live)
    return await service.admitted(service.release_activations, release_name=release, request=body)


@router.post(
    "/api/v1/saes/{sae}/features/{index}/activations",
    tags=["live"],
    responses=LIVE_ERRORS,
    summary="One feature's activation on custom text",
)
async def post_feature_activations(
    sae: str, index: FeatureIndex, body: FeatureTextRequest, live: LiveDep
) -> FeatureOnTextPublic:
    service = require_live(live)
    return await service.admitted(
        service.feature_on_text, sae_name=sae, index=index, text=body.text
    )


@router.post(
    "/api/v1/saes/{sae}/attribution",
    tags=["live"],
    responses=LIVE_ERRORS,
    summary="Attribute a next-token logit (or logit difference) to features and positions",
)
async def post_attribution(sae: str, body: AttributionRequest, live: LiveDep) -> AttributionPublic:
    service = require_live(live)
    return await service.admitted(service.attribution, sae_name=sae, request=body)


@router.post(
    "/api/v1/saes/{sae}/steer",
    tags=["live"],
    responses=LIVE_ERRORS,
    summary="Generate with and without steering features, same seed, side by side",
)
async def post_steer(sae: str, body: SteerRequest, live: LiveDep) -> SteeringPublic:
    service = require_live(live)
    return await service.admitted(service.steer, sae_name=sae, request=body)


# ---------------------------------------------------------------------------------------------
# Page and fragments


@router.get("/saes/{sae}/prompt", include_in_schema=False, response_class=HTMLResponse)
def prompt_page(
    request: Request,
    sae: str,
    session: SessionDep,
    settings: SettingsDep,
    live: LiveDep,
    text: Annotated[str, Query(max_length=20_000)] = "",
) -> Response:
    """The prompt page (``?text=`` prefills the prompt); it never runs the model itself. When
    the SAE's release has others, it also offers what fires in all of them at once."""
    sae_public = queries.get_sae(session=session, sae_name=sae)
    release = None
    if sae_public.release is not None:
        release = queries.get_release(session=session, release_name=sae_public.release)
    context = {
        "sae": sae_public,
        "sae_path": _sae_path(sae),
        "off_reason": live_off_reason(live, sae),
        "release": release if release is not None and len(release.saes) > 1 else None,
        "release_off_reason": next(
            (
                f"{other.name}: {reason}"
                for other in (release.saes if release else [])
                if (reason := live_off_reason(live, other.name))
            ),
            None,
        ),
        "text": text,
        "max_prompt_tokens": settings.max_prompt_tokens,
        "max_new_tokens": settings.max_new_tokens,
    }
    return render(request, "prompt.html", context)


class FormProblem(NamedTuple):
    """A form that failed validation, answered as a fragment rather than a full error page."""

    message: str


def form_of(model: type[M]):
    """Dependency: the request's form fields as ``model``, or a FormProblem saying what is wrong."""

    async def parse(request: Request) -> M | FormProblem:
        try:
            return model.model_validate(dict(await request.form()), strict=False)
        except ValidationError as err:
            problems = (
                f"{'.'.join(map(str, e['loc'])) or 'form'}: {e['msg']}" for e in err.errors()
            )
            return FormProblem("; ".join(problems))

    return Depends(parse)


async def _fragment(
    request: Request,
    template: str,
    body: BaseModel | FormProblem,
    live: LiveService | None,
    compute: Callable[[LiveService, BaseModel], Awaitable[BaseModel]],
    **context,
) -> Response:
    """Render ``template`` with ``result``, what ``compute(service, body)`` answers (through
    ``LiveService.admitted``: admission first); a failure renders the error partial with its
    status (the page's forms swap error responses in too, so the message is seen)."""
    if isinstance(body, FormProblem):
        return _error_fragment(request, 422, body.message)
    try:
        context["result"] = await compute(require_live(live), body)
    except (Refused, SaescopeError) as err:
        return _error_fragment(request, *error_answer(err))
    return await run_in_threadpool(render, request, template, context)


def _token_values(tokens: list[PromptTokenPublic], values: list[float]) -> list[PromptTokenValuePublic]:
    """The prompt's tokens with one feature's values, as the heatmap partial reads them."""
    return [PromptTokenValuePublic(text=t.text, value=v) for t, v in zip(tokens, values, strict=True)]


def _error_fragment(
    request: Request, status: int, message: str, headers: dict | None = None
) -> Response:
    response = render(request, "_partials/live_error.html", {"status": status, "message": message})
    response.status_code = status
    response.headers.update(headers or {})
    return response


@router.post(
    "/saes/{sae}/-/fragments/prompt/activations",
    include_in_schema=False,
    response_class=HTMLResponse,
)
async def activations_fragment(
    request: Request,
    sae: str,
    live: LiveDep,
    body: Annotated[PromptRequest | FormProblem, form_of(PromptRequest)],
) -> Response:
    return await _fragment(
        request,
        "_partials/prompt_activations.html",
        body,
        live,
        lambda service, body: service.admitted(service.activations, sae_name=sae, request=body),
        sae_path=_sae_path(sae),
        token_values=_token_values,
    )


@router.post(
    "/releases/{release}/-/fragments/prompt/activations",
    include_in_schema=False,
    response_class=HTMLResponse,
)
async def release_activations_fragment(
    request: Request,
    release: str,
    live: LiveDep,
    body: Annotated[PromptRequest | FormProblem, form_of(PromptRequest)],
) -> Response:
    return await _fragment(
        request,
        "_partials/prompt_release.html",
        body,
        live,
        lambda service, body: service.admitted(
            service.release_activations, release_name=release, request=body
        ),
        sae_path_of=_sae_path,
    )


@router.post(
    "/saes/{sae}/-/fragments/prompt/attribution",
    include_in_schema=False,
    response_class=HTMLResponse,
)
async def attribution_fragment(
    request: Request,
    sae: str,
    live: LiveDep,
    body: Annotated[AttributionRequest | FormProblem, form_of(AttributionRequest)],
) -> Response:
    return await _fragment(
        request,
        "_partials/prompt_attribution.html",
        body,
        live,
        lambda service, body: service.admitted(service.attribution, sae_name=sae, request=body),
        sae_path=_sae_path(sae),
    )


@router.post(
    "/saes/{sae}/-/fragments/prompt/steer", include_in_schema=False, response_class=HTMLResponse
)
async def steer_fragment(
    request: Request,
    sae: str,
    live: LiveDep,
    body: Annotated[SteerRequest | FormProblem, form_of(SteerRequest)],
) -> Response:
    return await _fragment(
        request,
        "_partials/prompt_steering.html",
        body,
        live,
        lambda service, body: service.admitted(service.steer, sae_name=sae, request=body),
    )


@router.post(
    "/saes/{sae}/-/fragments/features/{index}/try",
    include_in_schema=False,
    response_class=HTMLResponse,
)
async def feature_try_fragment(
    request: Request,
    sae: str,
    index: FeatureIndex,
    live: LiveDep,
    body: Annotated[FeatureTextRequest | FormProblem, form_of(FeatureTextRequest)],
) -> Response:
    return await _fragment(
        request,
        "_partials/feature_prompt_result.html",
        body,
        live,
        lambda service, body: service.admitted(
            service.feature_on_text, sae_name=sae, index=index, text=body.text
        ),
    )
