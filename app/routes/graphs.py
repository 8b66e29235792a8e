"""Attribution graphs: start one as a job, follow it, read it as a page or as JSON, import one.

- ``POST /api/v1/releases/{name}/graphs`` answers 202 with the job's URL (503 + Retry-After
  when the graph queue is full); ``GET /api/v1/graph-jobs/{release}/{id}`` says its stage.
- ``GET /graphs/{slug}`` is the graph page, ``GET /api/v1/graphs/{slug}`` its JSON (the export:
  Neuronpedia's and circuit-tracer's format, the view's ``pin``/``group`` parameters in
  ``qParams``); ``POST /api/v1/releases/{name}/graphs/import`` saves a graph JSON.
- ``/releases/{name}/graphs`` is the form and list; its form posts to a fragment that polls the
  job's fragment (htmx) until the graph is ready, then sends the browser to it.

Graphs are computed and saved by the live model process (``app.live.jobs``); this module only
reads the store.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.orm import Session

from app import queries
from app.deps import SessionDep
from app.errors import Refused, error_answer
from app.graph_view import GraphView, layout, parse_groups, with_view
from app.live.jobs import GraphJobStatus
from app.live.service import require_live
from app.rendering import render, url_segment
from sae_core.errors import NotFoundError, SaescopeError
from sae_core.live.graph_json import GraphDocument, dumps, loads
from sae_core.live.graph_settings import Pruning
from sae_core.live.requests import GraphImportOp, GraphJobOp, GraphOp, GraphSubmitOp
from sae_core.store.graphs import get_graph, list_graphs
from sae_core.store.lookup import find_release
from sae_core.store.releases import get_release, release_saes

router = APIRouter()
GRAPH_ERRORS = {
    404: {"description": "Unknown release, job or graph"},
    413: {"description": "The prompt has more tokens than graph_max_prompt_tokens"},
    422: {"description": "Invalid request (a target that is not one token ...)"},
    503: {"description": "Live is off, or the graph queue is full (see Retry-After)"},
}
PANEL_EXAMPLES = 5  # top examples in a node's side panel: enough to recognise the feature


class GraphRequestBody(BaseModel):
    prompt: str = Field(
        min_length=1, max_length=20_000, description="Text to explain (BOS is prepended)."
    )
    target: str | None = Field(
        default=None,
        description="Explain this next token (exactly one token); default: the top prediction.",
    )
    contrast: str | None = Field(
        default=None, description="Explain logit(target) - logit(contrast) instead."
    )
    node_share: float = Field(
        default=Pruning.node_share, gt=0, le=1, description="Share of influence kept nodes carry."
    )
    edge_share: float = Field(
        default=Pruning.edge_share,
        gt=0,
        le=1,
        description="Share of edge influence kept edges carry.",
    )


class GraphJobPublic(BaseModel):
    id: str
    release: str
    state: str = Field(description="queued | running | done | failed")
    stage: str
    done: int
    total: int
    elapsed_s: float
    error: str | None
    url: str = Field(description="Where to poll this job")
    graph_url: str | None = Field(description="The graph's page, once done")


def _backend_call(request: Request, op: GraphOp):
    """A graph operation on the live model process; a refusal is a LiveRefused (503 when the
    server runs without the live model)."""
    return require_live(request.app.state.live).backend.call(op)


def _job_public(job: GraphJobStatus) -> GraphJobPublic:
    return GraphJobPublic(
        id=job.id,
        release=job.release,
        state=job.state,
        stage=job.stage,
        done=job.done,
        total=job.total,
        elapsed_s=round(job.elapsed_s, 2),
        error=job.error,
        url=f"/api/v1/graph-jobs/{url_segment(job.release)}/{job.id}",
        graph_url=f"/graphs/{job.slug}" if job.slug else None,
    )


def submit_graph(
    request: Request, session: Session, release: str, body: GraphRequestBody
) -> GraphJobPublic:
    find_release(session, release)
    job = _backend_call(request, GraphSubmitOp(release=release, **body.model_dump()))
    return _job_public(job)


def _document(session: Session, slug: str) -> GraphDocument:
    row = get_graph(session, slug)
    if row is None:
        raise NotFoundError(f"no graph {slug!r} in this store")
    return loads(row.document)


def _view(
    session: Session, slug: str, pin: list[str], group: list[str]
) -> tuple[GraphDocument, GraphView]:
    """The graph laid out with the URL's pins and groups, or the document's own when the URL
    names none (an imported view, or a plain link)."""
    document = _document(session, slug)
    if pin or group:
        pinned, groups = pin, parse_groups(group)
    else:
        pinned = document.qParams.pinnedIds
        groups = [(g[0], g[1:]) for g in document.qParams.supernodes if len(g) > 1]
    return document, layout(document, slug, pinned=pinned, groups=groups)


# ---------------------------------------------------------------------------------------------
# /api/v1


@router.post(
    "/api/v1/releases/{release}/graphs",
    tags=["graphs"],
    status_code=202,
    responses=GRAPH_ERRORS,
    summary="Start an attribution graph of a prompt over the release's SAEs (a background job)",
)
def post_graph(
    release: str, body: GraphRequestBody, request: Request, session: SessionDep
) -> JSONResponse:
    job = submit_graph(request, session, release, body)
    return JSONResponse(job.model_dump(), status_code=202, headers={"Location": job.url})


@router.get(
    "/api/v1/graph-jobs/{release}/{job_id}",
    tags=["graphs"],
    responses=GRAPH_ERRORS,
    summary="A graph job's state and stage",
)
def get_graph_job(release: str, job_id: str, request: Request) -> GraphJobPublic:
    return _job_public(_backend_call(request, GraphJobOp(release=release, job_id=job_id)))


@router.get(
    "/api/v1/graphs/{slug}",
    tags=["graphs"],
    responses={404: {"description": "Unknown graph"}},
    summary="A graph as Neuronpedia/circuit-tracer JSON, with the view's pins and groups",
)
def get_graph_json(
    slug: str,
    session: SessionDep,
    pin: Annotated[list[str], Query()] = [],  # noqa: B006 (FastAPI copies defaults)
    group: Annotated[list[str], Query()] = [],  # noqa: B006
) -> Response:
    document, view = _view(session, slug, pin, group)
    if pin or group:
        document = with_view(document, view)
    return Response(
        dumps(document),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{slug}.json"'},
    )


@router.post(
    "/api/v1/releases/{release}/graphs/import",
    tags=["graphs"],
    status_code=201,
    responses=GRAPH_ERRORS,
    summary="Save a graph JSON (circuit-tracer's, a Neuronpedia download, an export) under a release",
)
def import_graph(
    release: str,
    request: Request,
    session: SessionDep,
    document: Annotated[dict, Body(description="The graph JSON")],
) -> JSONResponse:
    find_release(session, release)
    slug = _backend_call(request, GraphImportOp(release=release, text=json.dumps(document)))
    return JSONResponse(
        {"slug": slug, "url": f"/graphs/{slug}"},
        status_code=201,
        headers={"Location": f"/graphs/{slug}"},
    )


# ---------------------------------------------------------------------------------------------
# Pages and fragments


@router.get("/releases/{release}/graphs", include_in_schema=False, response_class=HTMLResponse)
def graphs_page(release: str, request: Request, session: SessionDep, text: str = "") -> Response:
    row = find_release(session, release)
    context = {
        "release": row.name,
        "layers": [sae.layer for sae in release_saes(session, row.id)],
        "graphs": list_graphs(session, row.id),
        "text": text,
        "settings": request.app.state.settings,
        "live_off": request.app.state.live is None,
    }
    return render(request, "graphs.html", context)


@router.post(
    "/releases/{release}/-/fragments/graphs", include_in_schema=False, response_class=HTMLResponse
)
async def graph_form(release: str, request: Request, session: SessionDep) -> Response:
    form = dict(await request.form())
    try:
        body = GraphRequestBody(
            prompt=form.get("prompt", ""),
            target=form.get("target") or None,
            contrast=form.get("contrast") or None,
        )
        job = submit_graph(request, session, release, body)
    except ValidationError as err:
        return _error(request, 422, str(err).splitlines()[0])
    except (Refused, SaescopeError) as err:
        return _error(request, *error_answer(err))
    return _job_fragment(request, job)


@router.get(
    "/graph-jobs/{release}/{job_id}/fragment", include_in_schema=False, response_class=HTMLResponse
)
def graph_job_fragment(release: str, job_id: str, request: Request) -> Response:
    try:
        job = _job_public(_backend_call(request, GraphJobOp(release=release, job_id=job_id)))
    except (Refused, SaescopeError) as err:
        return _error(request, *error_answer(err))
    return _job_fragment(request, job)


def _job_fragment(request: Request, job: GraphJobPublic) -> Response:
    response = render(request, "_partials/graph_job.html", {"job": job})
    if job.graph_url:
        response.headers["HX-Redirect"] = job.graph_url
    return response


def _error(request: Request, status: int, message: str, headers: dict | None = None) -> Response:
    response = render(request, "_partials/live_error.html", {"status": status, "message": message})
    response.status_code = status
    response.headers.update(headers or {})
    return response


@router.get("/graphs/{slug}", include_in_schema=False, response_class=HTMLResponse)
def graph_page(
    slug: str,
    request: Request,
    session: SessionDep,
    pin: Annotated[list[str], Query()] = [],  # noqa: B006
    group: Annotated[list[str], Query()] = [],  # noqa: B006
) -> Response:
    _, view = _view(session, slug, pin, group)
    return render(request, "graph.html", {"view": view}, alternate=f"/api/v1/graphs/{slug}")


@router.get(
    "/graphs/{slug}/-/fragments/nodes/{node_id}",
    include_in_schema=False,
    response_class=HTMLResponse,
)
def node_panel(slug: str, node_id: str, request: Request, session: SessionDep) -> Response:
    document = _document(session, slug)
    node = document.node(node_id)
    if node is None:
        raise NotFoundError(f"graph {slug!r} has no node {node_id!r}")
    sae_name = examples = None
    if node.feature_type == "cross layer transcoder" and node.feature is not None:
        release = get_release(session, document.metadata.scan)
        saes = release_saes(session, release.id) if release else []
        by_layer = {str(s.layer): s.name for s in saes}
        sae_name = by_layer.get(node.layer)
        if sae_name is not None:
            try:
                examples = queries.list_examples(
                    session=session, sae_name=sae_name, index=node.feature, limit=PANEL_EXAMPLES
                )
                summary = queries.get_feature_summary(
                    session=session, sae_name=sae_name, index=node.feature
                )
            except NotFoundError:
                sae_name = examples = None
    context = {
        "slug": slug,
        "node": node,
        "prompt": document.metadata.prompt,
        "sae_name": sae_name,
        "examples": examples.data if examples else [],
        "max_value": summary.max_act if examples else 0.0,
        "token": document.metadata.prompt_tokens[node.ctx_idx]
        if node.ctx_idx < len(document.metadata.prompt_tokens)
        else "",
    }
    return render(request, "_partials/graph_node.html", context)
