"""How ``ldm-serve`` answers an error: ``ApiError`` and its JSON body, and the handlers that give every error
the app meets that body.

Every error is JSON, ``{"error": {"type": ..., "field": ..., "message": ...}}``, where ``message`` is one
sentence naming the bad value and what was expected; on ``/v1/images/generations`` and ``/v1/images/edits`` it is
OpenAI's shape, ``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``, with 400 where
``/v1/images`` says 422.
No response ever carries a traceback or a path.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

OPENAI_IMAGES_PATH = "/v1/images/generations"
OPENAI_EDITS_PATH = "/v1/images/edits"
OPENAI_PATHS = (OPENAI_IMAGES_PATH, OPENAI_EDITS_PATH)  # answered in OpenAI's error shape
ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["type", "field", "message"],
    "properties": {"type": {"type": "string"}, "field": {"type": ["string", "null"]}, "message": {"type": "string"}}}}}
OPENAI_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
                   "code": {"type": ["string", "null"]}}}}}
ERROR_CONTENT = {"application/json": {"schema": ERROR_SCHEMA}}
OPENAI_ERROR_CONTENT = {"application/json": {"schema": OPENAI_ERROR_SCHEMA}}


class ApiError(Exception):
    """An error answered as JSON: ``status``, a ``type`` word, the ``field`` at fault (or None), one sentence."""

    def __init__(self, status: int, type_: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field, self.headers = status, type_, message, field, headers


def error_status(error: ApiError, path: str | None = None) -> int:
    """The HTTP status of ``error`` on ``path``: OpenAI's API answers 400 where ours answers 422."""
    return 400 if path in OPENAI_PATHS and error.status == 422 else error.status


def error_body(error: ApiError, path: str | None = None) -> bytes:
    r"""The JSON body of ``error`` on ``path`` in UTF-8, whatever the client put into its message (a lone surrogate
    is shown as ``\ud800``): OpenAI's error shape on ``OPENAI_PATHS``, with our ``type`` word as its ``code``, and
    ours everywhere else."""
    field = None if error.field is None else printable(error.field)
    if path in OPENAI_PATHS:
        kind = "server_error" if error.status >= 500 else ("rate_limit_error" if error.status == 429
                                                           else "invalid_request_error")
        fields = {"message": printable(error.message), "type": kind, "param": field, "code": error.type}
    else:
        fields = {"type": error.type, "field": field, "message": printable(error.message)}
    return json.dumps({"error": fields}, ensure_ascii=False).encode("utf-8")


def error_response(error: ApiError, path: str | None = None) -> Response:
    """``error`` answered on ``path`` (``error_body``)."""
    return Response(error_body(error, path), status_code=error_status(error, path), headers=error.headers,
                    media_type="application/json")


def printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (a lone surrogate from a JSON escape) as a backslash escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def shortened(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


def shown_value(value: Any) -> str:
    """A client's value as JSON (numbers as the client wrote them), shortened to 60 characters."""
    if isinstance(value, Decimal):
        text = str(value)
    else:
        text = json.dumps(value, ensure_ascii=False, allow_nan=True,
                          default=lambda item: str(item) if isinstance(item, Decimal) else repr(item))
    return shortened(printable(text))


def add_error_handlers(app: FastAPI) -> None:
    """Every error as the JSON error object: ours, Starlette's (404, 405) and FastAPI's validation; the unexpected
    ones (500, counted; the details stay in the log) are ``ErrorSafetyMiddleware``'s."""

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> Response:
        return error_response(error, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> Response:
        message = {404: f"path {shown_value(request.url.path)} does not exist; expected /v1/images, "
                        f"{OPENAI_IMAGES_PATH}, {OPENAI_EDITS_PATH}, /, /healthz, /readyz or /metrics",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(error.status_code,
                                                                                            str(error.detail))
        return error_response(ApiError(error.status_code, "http_error", message, None, dict(error.headers or {})),
                              request.url.path)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> Response:
        return error_response(ApiError(422, "invalid_request", "the request is not valid", None), request.url.path)
