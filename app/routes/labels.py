"""Label edits, label history and semantic search.

Editing needs the server's write token (``Settings.write_token``): with none configured editing
is off and every edit answers 403; a request without the right ``Authorization: Bearer <token>``
answers 401 and changes nothing. An edit names its author; the store keeps every label with who
and when (``labels`` table), and the newest human label becomes the feature's label.

Each route calls one data function of ``app.labels.service`` and returns its model
(``app.labels.schemas``). The feature page's edit form (``_partials/label_edit.html``) PUTs to a
fragment URL that answers the same partial; ``static/labels.js`` moves the token typed in the
form into the header.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Form, Header, Query, Request
from fastapi.responses import HTMLResponse, Response

from app.deps import QueryEmbedderDep, SessionDep, SettingsDep
from app.errors import Refused, error_answer
from app.guards import require_write_token
from app.labels import service
from app.labels.query_embeddings import QueryEmbedder, has_label_vectors
from app.labels.schemas import (
    LabelEdit,
    LabelHistoryPublic,
    LabelRecordPublic,
    LabelSearchPublic,
    ReleaseLabelSearchPublic,
)
from app.params import FeatureIndex, StoreText
from app.rendering import render, url_segment
from sae_core.errors import SaescopeError
from sae_core.labels import embeddings
from sae_core.labels.search import SearchMode, SearchSort
from sae_core.store.lookup import find_release

router = APIRouter()

MAX_SEARCH_RESULTS = 100  # one page of hits; semantic search ranks all features anyway
# Labels are a few words; 200 characters (as for the feature list's search) bound the CPU one
# uncached query costs the embedding model.
MAX_SEARCH_CHARS = 200
SearchQuery = Annotated[
    str,
    Query(
        min_length=1,
        max_length=MAX_SEARCH_CHARS,
        description="What to look for, e.g. 'French cities'.",
    ),
]
SearchLimit = Annotated[int, Query(ge=1, le=MAX_SEARCH_RESULTS)]


SEARCH_ERRORS = {
    503: {"description": "Semantic search's queue is full (see Retry-After)"},
    504: {"description": "The query was not embedded within search_timeout_s"},
}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start semantic search's query embedder where the embedding model is installed, and load
    its model at once where the store has label vectors to search."""
    embedder = None
    if embeddings.embedder_available():
        embedder = QueryEmbedder(settings=app.state.settings)
        if has_label_vectors(app.state.engine):
            embedder.warm()
    app.state.query_embedder = embedder
    try:
        yield
    finally:
        if embedder is not None:
            embedder.close()


@router.put(
    "/api/v1/saes/{sae}/features/{index}/label", tags=["labels"], summary="Set a human label"
)
def put_label(
    sae: str,
    index: FeatureIndex,
    edit: LabelEdit,
    session: SessionDep,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header()] = None,
) -> LabelRecordPublic:
    require_write_token(settings=settings, authorization=authorization)
    return service.save_human_label(
        session=session, sae_name=sae, index=index, label=edit.label, author=edit.author
    )


@router.get(
    "/api/v1/saes/{sae}/features/{index}/labels",
    tags=["labels"],
    summary="Every label the feature was given",
)
def read_label_history(sae: str, index: FeatureIndex, session: SessionDep) -> LabelHistoryPublic:
    return service.get_label_history(session=session, sae_name=sae, index=index)


@router.get(
    "/api/v1/saes/{sae}/search",
    tags=["labels"],
    responses=SEARCH_ERRORS,
    summary="Find features by what their labels mean",
)
def read_label_search(
    sae: str,
    session: SessionDep,
    embedder: QueryEmbedderDep,
    q: SearchQuery,
    mode: SearchMode = "semantic",
    sort: SearchSort = "relevance",
    limit: SearchLimit = 20,
) -> LabelSearchPublic:
    return service.search_labels(
        session=session, sae_name=sae, query=q, mode=mode, sort=sort, limit=limit, embedder=embedder
    )


@router.get(
    "/api/v1/releases/{name}/search",
    tags=["labels"],
    responses={
        **SEARCH_ERRORS,
        404: {"description": "Unknown release", "content": {"application/json": {}}},
    },
    summary="Find features of every SAE of a release by what their labels mean",
)
def read_release_label_search(
    name: str,
    session: SessionDep,
    embedder: QueryEmbedderDep,
    q: SearchQuery,
    mode: SearchMode = "semantic",
    sort: SearchSort = "relevance",
    limit: SearchLimit = 20,
) -> ReleaseLabelSearchPublic:
    """One query embedding (the same queue, cache, 503 and 504 as one SAE's search), then every
    SAE's nearest labels, merged; each hit names its SAE. SAEs without label embeddings yet are
    searched by label words, and ``note`` names them."""
    return service.search_release_labels(
        session=session,
        release_name=name,
        query=q,
        mode=mode,
        sort=sort,
        limit=limit,
        embedder=embedder,
    )


@router.get("/releases/{name}/search", include_in_schema=False, response_class=HTMLResponse)
def release_search_page(
    request: Request,
    name: str,
    session: SessionDep,
    embedder: QueryEmbedderDep,
    q: Annotated[str, Query(max_length=MAX_SEARCH_CHARS)] = "",
    mode: SearchMode = "semantic",
    sort: SearchSort = "relevance",
    limit: SearchLimit = 20,
) -> Response:
    """The release's label search in the browser: a form, and the merged hits of every SAE. A
    busy or slow embedder answers on the page itself (its status, and Retry-After)."""
    find_release(session, name)  # 404 before any search
    context = {"release": name, "q": q, "mode": mode, "sort": sort, "limit": limit}
    params = {"q": q, "mode": mode, "sort": sort, "limit": limit}
    status, headers = 200, {}
    if q.strip():
        try:
            context["results"] = service.search_release_labels(
                session=session,
                release_name=name,
                query=q,
                mode=mode,
                sort=sort,
                limit=limit,
                embedder=embedder,
            )
        except Refused as err:
            status, context["problem"], headers = error_answer(err)
    twin = f"/api/v1/releases/{url_segment(name)}/search?{urlencode(params)}" if q.strip() else None
    response = render(request, "release_search.html", context, alternate=twin)
    response.status_code = status
    response.headers.update(headers)
    return response


@router.put(
    "/saes/{sae}/-/fragments/features/{index}/label",
    include_in_schema=False,
    response_class=HTMLResponse,
)
def put_label_fragment(
    request: Request,
    sae: str,
    index: FeatureIndex,
    session: SessionDep,
    settings: SettingsDep,
    label: Annotated[StoreText, Form()],
    author: Annotated[StoreText, Form()],
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    """The edit form's target: the partial again, with what happened; reloads the page on success."""
    edit_view = {"sae": sae, "index": index, "label": label, "author": author}
    context = {"editable": bool(settings.write_token)}
    try:
        require_write_token(settings=settings, authorization=authorization)
        service.save_human_label(
            session=session, sae_name=sae, index=index, label=label, author=author
        )
    except (Refused, SaescopeError) as err:
        status, message, _ = error_answer(err)
        context["label_edit"] = edit_view | {"message": message, "ok": False}
        response = render(request, "_partials/label_edit.html", context)
        response.status_code = status
        return response
    context["label_edit"] = edit_view | {"message": "saved", "ok": True}
    response = render(request, "_partials/label_edit.html", context)
    response.headers["HX-Refresh"] = "true"  # the page header shows the new label and its source
    return response
