"""What routes receive through ``Annotated`` dependencies: a session on the app's one engine, the
settings ``create_app`` was given, and the live service (None when live is off)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.live.service import LiveService
from app.settings import Settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as session:
        yield session


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_live(request: Request) -> LiveService | None:
    return request.app.state.live


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
LiveDep = Annotated[LiveService | None, Depends(get_live)]
