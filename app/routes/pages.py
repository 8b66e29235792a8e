"""HTML pages and the htmx fragments they swap in.

Each page renders the model its ``/api/v1`` twin returns and names the twin in a ``Link`` header.
Fragments live under ``/saes/{sae}/-/fragments/...`` and render one partial, the same file the
full page includes.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Path, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app import queries
from app.deps import SessionDep
from app.rendering import SWAGGER_UI, render, url_segment
from app.schemas import FeatureSearch
from app.search import search_features

router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)

PAGE_TOP_EXAMPLES = (
    10  # the strongest examples, readable without scrolling far; "more" fetches the rest
)
PAGE_BIN_EXAMPLES = 3  # per interval bin: enough to see what weak activations look like
MORE_EXAMPLES = 20  # examples per "more" click
FeatureIndex = Annotated[int, Path(ge=0)]


def search_url(path: str, search: FeatureSearch, **changes) -> str:
    """``path`` with the search's non-default parameters (and ``changes``) as its query string."""
    params = search.model_dump(exclude_defaults=True) | changes
    query = urlencode({k: v for k, v in params.items() if v is not None and v != ""})
    return f"{path}?{query}" if query else path


def _sae_path(sae: str) -> str:
    return f"/saes/{url_segment(sae)}"


@router.get("/docs")
def api_docs(request: Request) -> Response:
    """Swagger UI for the OpenAPI schema, from vendored files: the docs work offline too."""
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title="saescope API",
        swagger_js_url=f"/static/{SWAGGER_UI}/swagger-ui-bundle.js",
        swagger_css_url=f"/static/{SWAGGER_UI}/swagger-ui.css",
        swagger_favicon_url="/static/favicon.svg",
    )


@router.get("/")
def index_page(request: Request, session: SessionDep) -> Response:
    saes = queries.list_saes(session=session)
    releases = queries.list_releases(session=session)
    context = {"saes": saes, "releases": releases}
    return render(request, "index.html", context, alternate="/api/v1/saes")


@router.get("/saes/{sae}")
def sae_page(
    request: Request, sae: str, search: Annotated[FeatureSearch, Query()], session: SessionDep
) -> Response:
    detail = queries.get_sae(session=session, sae_name=sae)
    results = search_features(session=session, sae_name=sae, search=search)
    context = {"sae": detail, "search": search, "results": results, "search_url": search_url}
    return render(request, "sae.html", context, alternate=f"/api/v1{_sae_path(sae)}")


@router.get("/saes/{sae}/-/fragments/features")
def feature_rows_fragment(
    request: Request, sae: str, search: Annotated[FeatureSearch, Query()], session: SessionDep
) -> Response:
    results = search_features(session=session, sae_name=sae, search=search)
    context = {"sae_name": sae, "search": search, "results": results, "search_url": search_url}
    response = render(request, "_partials/feature_rows.html", context)
    response.headers["HX-Replace-Url"] = search_url(
        _sae_path(sae), search
    )  # the address bar follows the search
    return response


@router.get("/saes/{sae}/jump")
def jump_to_feature(sae: str, index: Annotated[int, Query(ge=0)]) -> Response:
    return RedirectResponse(f"{_sae_path(sae)}/features/{index}", status_code=303)


@router.get("/saes/{sae}/features/{index}")
def feature_page(request: Request, sae: str, index: FeatureIndex, session: SessionDep) -> Response:
    feature = queries.get_feature(
        session=session,
        sae_name=sae,
        index=index,
        top_limit=PAGE_TOP_EXAMPLES,
        interval_limit=PAGE_BIN_EXAMPLES,
    )
    context = {"feature": feature, "more": MORE_EXAMPLES}
    return render(
        request, "feature.html", context, alternate=f"/api/v1{_sae_path(sae)}/features/{index}"
    )


@router.get("/saes/{sae}/-/fragments/features/{index}/examples")
def examples_fragment(
    request: Request,
    sae: str,
    index: FeatureIndex,
    session: SessionDep,
    kind: Literal["top", "interval"] = "top",
    bin: Annotated[int | None, Query(ge=0)] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = MORE_EXAMPLES,
) -> Response:
    examples = queries.list_examples(
        session=session, sae_name=sae, index=index, kind=kind, bin=bin, offset=offset, limit=limit
    )
    max_act = queries.get_feature_summary(session=session, sae_name=sae, index=index).max_act
    context = {
        "sae_name": sae,
        "index": index,
        "kind": kind,
        "bin": bin,
        "examples": examples.data,
        "count": examples.count,
        "offset": offset + len(examples.data),
        "max_value": max_act,
        "more": limit,
    }
    return render(request, "_partials/examples.html", context)


@router.get("/saes/{sae}/-/fragments/features/{index}/preview")
def preview_fragment(
    request: Request, sae: str, index: FeatureIndex, session: SessionDep
) -> Response:
    preview = queries.get_feature_preview(session=session, sae_name=sae, index=index)
    return render(request, "_partials/neighbour_preview.html", {"preview": preview})
