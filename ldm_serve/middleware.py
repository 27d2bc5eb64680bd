"""The ASGI middlewares of ``ldm-serve``: the body limit (413 before the app reads the body), the API key (401),
and the last resort that answers an unexpected exception with a JSON 500 on a connection that stays usable.

With an API key, every route but the page and the health probes needs ``Authorization: Bearer <key>``: inference,
and the metadata and statistics (``/openapi.json``, ``/docs``, ``/metrics``), as Triton Inference Server can
restrict its inference, metadata and statistics APIs with ``--http-restricted-api``; ``/healthz`` and ``/readyz``
stay open for orchestrators' probes, which carry no credentials, and so does the page, which holds no data (it
has a field for the key and sends it with its own requests). The key is compared byte for byte with the header's
value, both as UTF-8.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Callable

from ldm_serve.errors import ApiError, error_response, printable

HEALTH_PATHS = ("/healthz", "/readyz")
PAGE_PATH = "/"
OPEN_PATHS = (PAGE_PATH, *HEALTH_PATHS)  # what needs no API key
logger = logging.getLogger("uvicorn.error")


class BodyLimitMiddleware:
    """ASGI middleware: a request body over ``max_body_bytes`` (on a path of ``path_limits``, its own limit) gets
    413 before the app reads any of it."""

    def __init__(self, app: Any, max_body_bytes: int, path_limits: dict[str, int] | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.path_limits = path_limits or {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope["path"], self.max_body_bytes)
        too_large = ApiError(413, "body_too_large", f"the body is over {limit} bytes; expected at most {limit}",
                             "body")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await error_response(too_large, scope["path"])(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await error_response(too_large, scope["path"])(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ApiKeyMiddleware:
    """ASGI middleware: every route but the page and the health probes needs ``Authorization: Bearer <api_key>``,
    else 401."""

    def __init__(self, app: Any, api_key: str, on_refused: Callable[[], None] = lambda: None):
        self.app = app
        # The key's UTF-8 bytes (an environment variable's undecodable bytes come back as they were).
        self.key = api_key.encode("utf-8", "surrogateescape")
        self.on_refused = on_refused

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        values = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(values) == 1 and self._matches(values[0]):
            await self.app(scope, receive, send)
            return
        self.on_refused()
        given = {0: "no API key", 1: "a wrong API key"}.get(len(values), f"{len(values)} Authorization headers")
        expected = "the header" if len(values) < 2 else "one header,"
        refused = ApiError(401, "unauthorized", f"the request has {given}; expected {expected} Authorization: Bearer "
                                                f"<key>", "authorization", {"WWW-Authenticate": "Bearer"})
        await error_response(refused, scope["path"])(scope, receive, send)

    def _matches(self, authorization: bytes) -> bool:
        scheme, _, token = authorization.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(b" \t"), self.key)


class ErrorSafetyMiddleware:
    """ASGI middleware: an exception that escapes the app is logged with its traceback and answered with a JSON
    500 on a connection that stays usable (Starlette's own handler re-raises it, and uvicorn then drops the
    keep-alive connection without saying so). After the response has started nothing can be said: the
    connection closes mid-response, which the client sees."""

    def __init__(self, app: Any, on_error: Callable[[], None] = lambda: None):
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_note(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            logger.exception("ldm-serve: %s %s failed", scope["method"], printable(scope["path"]))
            self.on_error()
            if started:
                raise
            failed = ApiError(500, "internal", "the server failed on this request; expected a retry, and the "
                                               "server log has the details")
            await error_response(failed, scope["path"])(scope, receive, send)


class HeadAsGetMiddleware:
    """ASGI middleware: ``HEAD`` on one of ``paths`` (the routes that answer ``GET``) is answered as ``GET`` is,
    without the body, as HTTP asks of every resource that answers GET (``curl -I`` and some health checkers send
    it); elsewhere ``HEAD`` goes on as it is (a 405 naming it)."""

    def __init__(self, app: Any, paths: tuple[str, ...]):
        self.app = app
        self.paths = paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return

        async def without_body(message: dict) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)


class AmbiguousLengthMiddleware:
    """ASGI middleware: a request with both ``Transfer-Encoding`` and ``Content-Length``, whose body a proxy in
    front may delimit one way and this server the other (request smuggling), is answered 400 and its connection
    closed, as RFC 9112 section 6.1 asks of a server that does not refuse such a request outright."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            names = {name.lower() for name, _ in scope["headers"]}
            if b"transfer-encoding" in names and b"content-length" in names:
                refused = ApiError(400, "malformed_request", "the request has both Transfer-Encoding and "
                                                             "Content-Length; expected one of them",
                                   "content-length", {"Connection": "close"})
                await error_response(refused, scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)
