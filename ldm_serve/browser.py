"""What ``ldm-serve`` lets a browser do: answer only the Host names it serves, share answers with no other origin
unless told to, and keep its pages out of other sites' frames.

- ``HostCheckMiddleware``: a request whose Host is not in the allow-list (loopback names, the bound address and
  ``--allowed-hosts``; ``*`` for any) gets a JSON 400, so that a web page cannot reach a server without a key by
  DNS rebinding. The health probes are exempt: orchestrators probe with the pod's address, and they hold no data.
- ``JsonCorsMiddleware``: CORS answers only for the ``--cors-origin`` origins (none by default).
- ``SecurityHeadersMiddleware``: every answer gets ``SECURITY_HEADERS`` (nosniff, no frames, no referrer, and the
  strictest Content-Security-Policy, ``default-src 'none'``, unless the route set its own: ``page_policy`` for an
  HTML page).
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp

from ldm_serve.errors import ApiError, error_response, shown_value

ANY_HOST = "*"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
NO_CONTENT_POLICY = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"), (b"content-security-policy", NO_CONTENT_POLICY.encode())]
CORS_EXPOSED_HEADERS = ["Retry-After", "X-Seed", "Server-Timing", "X-Ldm-Replica", "X-Request-Id"]
INLINE_ELEMENT = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def host_name(host: str) -> str:
    """The name in a Host header's value or a ``--host``, without its port or IPv6 brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


class HostCheckMiddleware:
    """ASGI middleware: a request whose Host header names none of ``allowed_hosts`` gets 400 (the health probes
    and a request without a Host header, which no browser sends, pass)."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...], open_paths: tuple[str, ...]):
        self.app = app
        self.allowed = {host_name(host) for host in allowed_hosts}
        self.shown = ", ".join(allowed_hosts)
        self.open_paths = open_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        hosts = [value.decode("latin-1") for name, value in scope["headers"] if name == b"host"]
        if not hosts or (len(hosts) == 1 and host_name(hosts[0]) in self.allowed):
            await self.app(scope, receive, send)
            return
        refused = ApiError(400, "host_not_allowed", f"the Host header is {shown_value(', '.join(hosts))}; expected "
                                                    f"one of {self.shown} (ldm-serve --allowed-hosts adds names)",
                           "host")
        await error_response(refused, scope["path"])(scope, receive, send)


class JsonCorsMiddleware(CORSMiddleware):
    """Starlette's CORS middleware, with its refused preflight (plain text) answered as the JSON error."""

    def preflight_response(self, request_headers: Any) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = ApiError(response.status_code, "cors_refused", f"the preflight request is refused "
                                                                 f"({response.body.decode()}); expected an origin, "
                                                                 f"method and headers ldm-serve --cors-origin allows")
        return error_response(refused)


def cors_options(origins: tuple[str, ...]) -> dict[str, Any]:
    """``JsonCorsMiddleware``'s options for ``origins``: the methods, headers and answer headers the routes use."""
    return {"allow_origins": list(origins), "allow_methods": ["GET", "POST", "DELETE"],
            "allow_headers": ["Authorization", "Content-Type", "Accept"], "expose_headers": CORS_EXPOSED_HEADERS,
            "max_age": 600}


class SecurityHeadersMiddleware:
    """ASGI middleware: each of ``SECURITY_HEADERS`` on every answer that does not set that header itself."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                message = {**message, "headers": headers + [(name, value) for name, value in SECURITY_HEADERS
                                                             if name not in present]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def page_policy(html: str, sources: dict[str, str] | None = None) -> str:
    """The Content-Security-Policy of an HTML page: its inline scripts and styles by their sha256, images from
    data: URLs, requests to its own origin only, and no frame around it; ``sources`` adds to a directive."""
    sources = sources or {}
    hashes = {"script": [], "style": []}
    for element, text in INLINE_ELEMENT.findall(html):
        digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
        hashes[element].append(f"'sha256-{digest}'")
    directives = {"default-src": "'none'", "script-src": " ".join(hashes["script"]) or "'none'",
                  "style-src": " ".join(hashes["style"]) or "'none'", "img-src": "data:", "connect-src": "'self'",
                  "base-uri": "'none'", "form-action": "'none'", "frame-ancestors": "'none'"}
    for directive, source in sources.items():
        directives[directive] = f"{directives.get(directive, '')} {source}".replace("'none' ", "").strip()
    return "; ".join(f"{directive} {value}" for directive, value in directives.items())
