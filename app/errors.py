"""Errors the browser answers, and the handlers that turn every failure into one clear message.

``/api/...`` answers JSON ``{"detail": "..."}``; pages answer a small HTML error page. Neither
ever shows a traceback: unexpected errors are logged and answered with a generic 500.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from sae_core.errors import NotFoundError, SaescopeError

log = logging.getLogger("saescope.app")


class Refused(Exception):
    """A request the server will not serve as asked, for a reason that is not bad input: no
    right to write (401, 403), live off or busy (503, with Retry-After), too slow (504)."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class ErrorAnswer(NamedTuple):
    status: int
    message: str  # one line, for the user
    headers: dict[str, str]


def error_answer(exc: Exception) -> ErrorAnswer:
    """The HTTP answer to an error a request ended in: the one place an error type becomes a
    status code, for the handlers below and for fragments that answer errors as a partial."""
    if isinstance(exc, StarletteHTTPException):
        return ErrorAnswer(exc.status_code, str(exc.detail), dict(exc.headers or {}))
    if isinstance(exc, Refused):
        return ErrorAnswer(exc.status, exc.message, dict(exc.headers))
    if isinstance(exc, RequestValidationError):
        return ErrorAnswer(422, _describe_validation(exc), {})
    if isinstance(exc, NotFoundError):
        return ErrorAnswer(404, str(exc), {})
    if isinstance(exc, SaescopeError):
        return ErrorAnswer(422, str(exc), {})
    raise TypeError(f"no HTTP answer for {type(exc).__name__}") from exc


class ErrorPublic(BaseModel):
    """The body of every error answer of ``/api``."""

    detail: str = Field(description="What was wrong and what to do, in one line.")


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def respond(request: Request, status: int, message: str) -> Response:
    """``message`` as the answer ``request`` expects: JSON for the API, the error page otherwise."""
    if _wants_json(request):
        return JSONResponse({"detail": message}, status_code=status)
    templates = request.app.state.templates
    return templates.TemplateResponse(
        request, "error.html", {"status": status, "message": message}, status_code=status
    )


def _describe_validation(exc: RequestValidationError) -> str:
    """Pydantic's error list -> one line: 'limit: Input should be ...; sort: ...'."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "path", "body"))
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "invalid request"


async def _answer(request: Request, exc: Exception) -> Response:
    """Async, so a refusal is answered on the event loop: Starlette runs a sync handler on a
    worker thread, which under load means waiting for one (live admission, issue 19)."""
    status, message, headers = error_answer(exc)
    response = respond(request, status, message)
    response.headers.update(headers)
    return response


def install_error_handlers(app: FastAPI) -> None:
    for handled in (Refused, SaescopeError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(handled, _answer)

    @app.exception_handler(Exception)
    def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return respond(request, 500, "internal error; the server log has the details")
