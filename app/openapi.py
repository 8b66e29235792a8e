"""The OpenAPI document, completed with what every operation may answer.

Routes declare their own answers; the answers that come from ``app.guards`` and ``app.errors``
for any route are added here, once: 404, 413 and 422 everywhere, 400 where there is a body,
401/403 and the bearer scheme on writes. Every error answer has ``ErrorPublic``'s body, and
every text query parameter says it takes no NUL.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.errors import ErrorPublic
from app.guards import WRITES
from app.params import NO_NUL

COMMON_ERRORS = {
    "404": "Unknown SAE or feature, or a NUL character in the path",
    "413": "The request body is over max_body_bytes (or a live prompt over max_prompt_tokens)",
    "422": "Invalid parameters or body: out of range, wrong type, NUL in the query string ...",
}
BODY_ERRORS = {"400": "The body cannot be parsed (not JSON, not UTF-8)"}
WRITE_ERRORS = {
    "401": "No write token, or the wrong one (see WWW-Authenticate)",
    "403": "Editing is off on this server (no SAESCOPE_WRITE_TOKEN)",
}
WRITE_TOKEN = {
    "type": "http",
    "scheme": "bearer",
    "description": "The server's SAESCOPE_WRITE_TOKEN; label edits need it.",
}
ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorPublic"}}}


def _text_schemas(schema: dict) -> list[dict]:
    """The string branches of a parameter's schema (``str`` or ``str | None``)."""
    branches = schema.get("anyOf", [schema])
    return [branch for branch in branches if branch.get("type") == "string"]


def _complete(operation: dict, method: str) -> None:
    errors = dict(COMMON_ERRORS)
    if "requestBody" in operation:
        errors |= BODY_ERRORS
    if method.upper() in WRITES:
        errors |= WRITE_ERRORS
        operation["security"] = [{"writeToken": []}]
    responses = operation["responses"]
    for status, description in errors.items():
        responses.setdefault(status, {"description": description})
    for status, response in responses.items():
        if int(status) >= 400:
            response["content"] = ERROR_BODY
    for parameter in operation.get("parameters", ()):
        if parameter["in"] == "query":
            for branch in _text_schemas(parameter["schema"]):
                branch["pattern"] = NO_NUL


def install_openapi(app: FastAPI) -> None:
    """``app.openapi`` builds the completed document once."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            components = schema.setdefault("components", {})
            components["securitySchemes"] = {"writeToken": WRITE_TOKEN}
            schemas = components.setdefault("schemas", {})
            schemas["ErrorPublic"] = ErrorPublic.model_json_schema()
            for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's, never answered
                schemas.pop(name, None)
            for path in schema["paths"].values():
                for method, operation in path.items():
                    _complete(operation, method)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
