"""Label edits, label history and semantic search.

Editing needs the server's write token (``Settings.write_token``): with none configured editing
is off and every edit answers 403; a request without the right ``Authorization: Bearer <token>``
answers 401 and changes nothing. An edit names its author; the store keeps every label with who
and when (``labels`` table), and the newest human label becomes the feature's label.

The feature page's edit form (``_partials/label_edit.html``) PUTs to a fragment URL that answers
the same partial; ``static/labels.js`` moves the token typed in the form into the header.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Form, Header, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from app.deps import SessionDep, SettingsDep
from app.errors import NotFoundError, UnknownFeatureError
from app.guards import require_write_token
from app.params import FeatureIndex, StoreText
from app.queries import get_sae_row
from app.rendering import render
from sae_core.errors import SaescopeError
from sae_core.labels import embeddings
from sae_core.labels.run import (
    MAX_AUTHOR_CHARS,
    MAX_LABEL_CHARS,
    label_history,
    set_human_label,
)
from sae_core.labels.search import SearchMode, SearchSort, search_labels
from sae_core.store.db import FeatureEmbeddingRow, FeatureRow, LabelRow, SaeRow

router = APIRouter()

MAX_SEARCH_RESULTS = 100  # one page of hits; semantic search ranks all features anyway


class LabelEdit(BaseModel):
    label: StoreText = Field(min_length=1, max_length=MAX_LABEL_CHARS, description="The new label.")
    author: StoreText = Field(
        min_length=1,
        max_length=MAX_AUTHOR_CHARS,
        description="Who is editing (kept in the history).",
    )


class LabelRecordPublic(BaseModel):
    label: str
    source: str = Field(description="auto | llm:<model> | human:<who>")
    author: str
    created_at: datetime
    precision: float | None = Field(
        description="Held-out precision of the label's rule; none for free text."
    )
    recall: float | None
    f1: float | None
    rule: dict | None = Field(
        description="The machine-applicable rule and the held-out contexts it was scored on."
    )


class LabelHistoryPublic(BaseModel):
    data: list[LabelRecordPublic] = Field(
        description="Newest first; the feature's current label is in its own record."
    )
    count: int


class SearchHitPublic(BaseModel):
    index: int
    label: str | None
    label_source: str | None
    label_f1: float | None
    score: float = Field(
        description="Cosine similarity of query and label (semantic) or full-text rank."
    )
    matched: str = Field(
        description="Which label matched: auto | llm | human, or label for full text."
    )


class LabelSearchPublic(BaseModel):
    mode: SearchMode = Field(description="The mode that answered (semantic falls back to text).")
    note: str | None = Field(description="Why semantic search fell back, if it did.")
    data: list[SearchHitPublic]
    count: int


def _record(row: LabelRow) -> LabelRecordPublic:
    return LabelRecordPublic(
        label=row.label,
        source=row.source,
        author=row.author,
        created_at=row.created_at,
        precision=row.precision,
        recall=row.recall,
        f1=row.f1,
        rule=row.rule,
    )


def _feature_sae(session: Session, sae: str, index: int) -> SaeRow:
    row = get_sae_row(session=session, sae_name=sae)
    if session.get(FeatureRow, (row.id, index)) is None:
        raise UnknownFeatureError(sae, index, row.d_sae)
    return row


def save_human_label(
    session: Session, sae: str, index: int, *, label: str, author: str
) -> LabelRow:
    """Write the edit (and its embedding, when the SAE has embeddings to search)."""
    sae_row = _feature_sae(session, sae, index)
    row = set_human_label(session, sae=sae_row, idx=index, label=label, author=author)
    has_vectors = session.scalar(
        sa.select(FeatureEmbeddingRow.feature_idx)
        .where(FeatureEmbeddingRow.sae_id == sae_row.id)
        .limit(1)
    )
    if has_vectors is not None and embeddings.embedder_available():
        embeddings.embed_one(session, sae_row.id, index, row.source, row.label)
    session.commit()
    return row


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
    require_write_token(settings, authorization)
    return _record(save_human_label(session, sae, index, label=edit.label, author=edit.author))


@router.get(
    "/api/v1/saes/{sae}/features/{index}/labels",
    tags=["labels"],
    summary="Every label the feature was given",
)
def read_label_history(sae: str, index: FeatureIndex, session: SessionDep) -> LabelHistoryPublic:
    rows = label_history(session, sae=_feature_sae(session, sae, index), idx=index)
    return LabelHistoryPublic(data=[_record(r) for r in rows], count=len(rows))


@router.get(
    "/api/v1/saes/{sae}/search", tags=["labels"], summary="Find features by what their labels mean"
)
def read_label_search(
    sae: str,
    session: SessionDep,
    q: Annotated[
        str,
        Query(min_length=1, max_length=500, description="What to look for, e.g. 'French cities'."),
    ],
    mode: SearchMode = "semantic",
    sort: SearchSort = "relevance",
    limit: Annotated[int, Query(ge=1, le=MAX_SEARCH_RESULTS)] = 20,
) -> LabelSearchPublic:
    sae_row = get_sae_row(session=session, sae_name=sae)
    result = search_labels(session, sae_id=sae_row.id, query=q, mode=mode, sort=sort, limit=limit)
    hits = [
        SearchHitPublic(
            index=h.idx,
            label=h.label,
            label_source=h.label_source,
            label_f1=h.label_f1,
            score=h.score,
            matched=h.matched,
        )
        for h in result.hits
    ]
    return LabelSearchPublic(mode=result.mode, note=result.note, data=hits, count=len(hits))


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
    try:
        require_write_token(settings, authorization)
        save_human_label(session, sae, index, label=label, author=author)
    except (HTTPException, SaescopeError) as err:
        status = (
            err.status_code
            if isinstance(err, HTTPException)
            else 404
            if isinstance(err, NotFoundError)
            else 422
        )
        message = err.detail if isinstance(err, HTTPException) else str(err)
        response = render(
            request,
            "_partials/label_edit.html",
            {"label_edit": edit_view | {"message": message, "ok": False}},
        )
        response.status_code = status
        return response
    response = render(
        request,
        "_partials/label_edit.html",
        {"label_edit": edit_view | {"message": "saved", "ok": True}},
    )
    response.headers["HX-Refresh"] = "true"  # the page header shows the new label and its source
    return response
