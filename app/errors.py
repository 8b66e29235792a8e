"""Errors the browser answers, and the handlers that turn every failure into one clear message.

``/api/...`` answers JSON ``{"detail": "..."}``; pages answer a small HTML error page. Neither
ever shows a traceback: unexpected errors are logged and answered with a generic 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sae_core.errors import SaescopeError

log = logging.getLogger("saescope.app")


class NotFoundError(SaescopeError):
    """Something the URL names does not exist in the store."""


class UnknownSaeError(NotFoundError):
    def __init__(self, name: str):
        super().__init__(f"no SAE named {name!r} in this store; see /api/v1/saes for the list")


class UnknownReleaseError(NotFoundError):
    def __init__(self, name: str):
        super().__init__(f"no release named {name!r} in this store; see /api/v1/releases for the list")


class UnknownFeatureError(NotFoundError):
    def __init__(self, sae: str, index: int, d_sae: int):
        super().__init__(f"SAE {sae!r} has no feature {index}; its features are 0..{d_sae - 1}")


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _respond(request: Request, status: int, message: str) -> Response:
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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotFoundError)
    def _not_found(request: Request, exc: NotFoundError) -> Response:
        return _respond(request, 404, str(exc))

    @app.exception_handler(SaescopeError)
    def _user_error(request: Request, exc: SaescopeError) -> Response:
        return _respond(request, 422, str(exc))

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return _respond(request, 422, _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    def _http(request: Request, exc: StarletteHTTPException) -> Response:
        response = _respond(request, exc.status_code, str(exc.detail))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _respond(request, 500, "internal error; the server log has the details")
