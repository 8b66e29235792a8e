"""What routes receive through ``Annotated`` dependencies: a session on the app's one engine, the
settings ``create_app`` was given, the live service (None when live is off) and semantic search's
query embedder (None without the embedding model)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.labels.query_embeddings import QueryEmbedder
from app.live.service import LiveService
from app.settings import Settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as session:
        yield session


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_live(request: Request) -> LiveService | None:
    """Async, so a route that needs nothing else answers on the event loop (live admission)."""
    return request.app.state.live


def get_query_embedder(request: Request) -> QueryEmbedder | None:
    return request.app.state.query_embedder


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
LiveDep = Annotated[LiveService | None, Depends(get_live)]
QueryEmbedderDep = Annotated[QueryEmbedder | None, Depends(get_query_embedder)]
