"""What every request passes before a route sees it (``RequestGuard``, an ASGI middleware), and the
write-token check.

In order, each answered at once without reading further:
- a NUL in the URL's path is a 404 (no route names one), in its query string a 422 (PostgreSQL
  text cannot hold it, and no parameter needs it);
- an API write (PUT, PATCH, DELETE under ``/api/``) without the server's write token is a 401
  (403 when editing is off) before its body is read;
- a body over ``Settings.max_body_bytes`` is a 413, as soon as its Content-Length or its bytes so
  far say so; a body within the limit is read here and handed on whole.

Pages' write forms (``/-/fragments/...``) send small forms, answered in place by their route so
the form keeps what was typed; the body limit bounds them like every request.
"""

from __future__ import annotations

import secrets
from urllib.parse import unquote_to_bytes

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import Refused, error_answer, respond
from app.settings import Settings

UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="saescope labels"'}
WRITES = frozenset({"PUT", "PATCH", "DELETE"})
WITHOUT_BODY = frozenset({"GET", "HEAD", "OPTIONS"})


def require_write_token(*, settings: Settings, authorization: str | None) -> None:
    """Raise Refused when editing is off (403) or ``authorization`` lacks the write token (401)."""
    if not settings.write_token:
        raise Refused(
            403, "label editing is off on this server; start it with SAESCOPE_WRITE_TOKEN set"
        )
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        token.strip().encode(), settings.write_token.encode()
    ):
        raise Refused(
            401,
            "send the server's write token as 'Authorization: Bearer <token>'",
            headers=UNAUTHORIZED,
        )


class RequestGuard:
    """The checks of the module docstring, before routing; refusals answer as ``app.errors`` does."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        settings: Settings = scope["app"].state.settings
        try:
            self._check_url(scope)
            if scope["method"] in WRITES and scope["path"].startswith("/api/"):
                require_write_token(settings=settings, authorization=request.headers.get("authorization"))
            if scope["method"] not in WITHOUT_BODY:
                receive = await _read_body(request, receive, settings.max_body_bytes)
        except (HTTPException, Refused) as err:
            status, message, headers = error_answer(err)
            response = respond(request, status, message)
            response.headers.update(headers)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _check_url(scope: Scope) -> None:
        if "\x00" in scope["path"]:
            raise HTTPException(404, "no page has a NUL character in its address")
        query = scope["query_string"]
        if b"\x00" in unquote_to_bytes(query) if b"%" in query else b"\x00" in query:
            raise HTTPException(422, "query parameters must not contain NUL characters")


async def _read_body(request: Request, receive: Receive, limit: int) -> Receive:
    """The whole body (at most ``limit`` bytes), as a ``receive`` that hands it on."""
    too_large = HTTPException(
        413, f"the request body is over the server's limit of {limit:,} bytes (max_body_bytes)"
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away: let the app see it
            return _replay([message], receive)
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise too_large
        if not message.get("more_body", False):
            break
    return _replay(
        [{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive
    )


def _replay(messages: list[Message], receive: Receive) -> Receive:
    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return replay
