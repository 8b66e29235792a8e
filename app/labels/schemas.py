"""Pydantic models of the label endpoints: an edit, a label's record and history, search hits."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app.params import StoreText
from sae_core.labels.history import MAX_AUTHOR_CHARS, MAX_LABEL_CHARS
from sae_core.labels.search import SearchMode


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


class ReleaseSearchHitPublic(SearchHitPublic):
    sae: str = Field(description="The SAE the feature is in.")
    layer: int
    d_sae: int


class ReleaseLabelSearchPublic(BaseModel):
    release: str
    mode: SearchMode = Field(
        description="semantic when any SAE was searched by meaning; text when none could be."
    )
    note: str | None = Field(
        description="Which SAEs were searched by words instead (no embeddings yet), and why."
    )
    data: list[ReleaseSearchHitPublic] = Field(
        description="Every SAE's matches merged: by cosine (word matches after), or by F1."
    )
    count: int
