"""The HTTP/1.1 connection of ``ldm-serve``: uvicorn's h11 protocol with read timeouts, and a drain that answers
the requests it has not fully received instead of waiting for them.

uvicorn and h11 time out only idle keep-alive connections (``timeout_keep_alive``): a client that sends half a
header or half a body holds its connection, and the request's task, for ever, and keeps a draining server alive.
Triton Inference Server bounds only the drain (``--exit-timeout-secs``, 30 s by default, which ``--drain-timeout``
follows). The read timeouts follow Node.js' ``http.Server``: ``headersTimeout``, the whole header must arrive
within it, counted from when the server is ready to read one (the connection opening, or the previous response
ending); and ``requestTimeout``, here for the body alone, counted from the header's end. A request that misses
either gets 408 Request Timeout with ``Connection: close``, as nginx answers its ``client_header_timeout`` and
``client_body_timeout``; a connection that never sent a byte of its next request is just closed, as keep-alive
closes it.
"""

from __future__ import annotations

import asyncio
import http
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ldm_serve.errors import ApiError, error_body, error_status

DRAINING = ApiError(503, "draining", "the server is draining before it exits; expected a retry later", None,
                    {"Retry-After": "5"})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol; ``header_timeout_s`` and ``body_timeout_s`` bound how long a request may take to
    arrive (module docstring). Pass it to ``uvicorn.Config(http=functools.partial(GuardedH11Protocol, ...))``."""

    def __init__(self, *args: Any, header_timeout_s: float, body_timeout_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self._reading: str | None = None  # "header" or "body" while its timer runs
        self._read_timer: asyncio.TimerHandle | None = None

    # --- uvicorn's hooks -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_reading("header")

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_reading()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._start_reading("header")  # the next request's header, on a kept-alive connection
        self._follow()

    def shutdown(self) -> None:
        """Drain this connection: a request still arriving is answered 503 now (the server would refuse it once
        it had arrived); one being answered finishes, then the connection closes."""
        cycle = self.cycle if self.cycle is not None and not self.cycle.response_complete else None
        half_header = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        half_body = self.conn.their_state is h11.SEND_BODY and cycle is not None and not cycle.response_started
        if half_header or half_body:
            self._answer_and_close(DRAINING)
        else:
            super().shutdown()

    def send_400_response(self, msg: str) -> None:
        self._answer_and_close(ApiError(400, "malformed_request", "the request is not valid HTTP/1.1; expected a "
                                                                  "request line, headers and a body as RFC 9112 "
                                                                  "says", None))

    # --- the read timers ------------------------------------------------------------------------------------

    def _follow(self) -> None:
        """Move the read timer along with the request: the body's starts when the header has arrived, and none
        runs once the whole request has (the request timeout takes over)."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._reading != "body":
                self._start_reading("body")
        elif state is not h11.IDLE:
            self._stop_reading()

    def _start_reading(self, phase: str) -> None:
        self._stop_reading()
        timeout_s = self.header_timeout_s if phase == "header" else self.body_timeout_s
        self._reading = phase
        self._read_timer = self.loop.call_later(timeout_s, self._read_timed_out)

    def _stop_reading(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._reading, self._read_timer = None, None

    def _read_timed_out(self) -> None:
        phase, self._reading, self._read_timer = self._reading, None, None
        if self.transport.is_closing():
            return
        if phase == "header" and not self.conn.trailing_data[0]:
            self.transport.close()  # not a byte of a request: an idle connection
            return
        timeout_s = self.header_timeout_s if phase == "header" else self.body_timeout_s
        self._answer_and_close(ApiError(408, "request_timeout", f"the request's {phase} did not arrive within "
                                                                f"{timeout_s:g} s; expected all of it within that "
                                                                f"time", "body" if phase == "body" else None))

    def _answer_and_close(self, error: ApiError) -> None:
        """Answer ``error`` with ``Connection: close`` unless a response has begun, then close the connection;
        the app, if it is reading the body, sees a disconnect and its answer goes nowhere."""
        self._stop_reading()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None:
            unanswered = True
        elif cycle.response_complete:  # what arrives now is the next request, or the rest of an answered one
            unanswered = self.conn.their_state is not h11.SEND_BODY
        else:
            unanswered = not cycle.response_started
        if unanswered:
            # the request's own path while it is half read (its route's error shape); none once it is answered
            path = cycle.scope["path"] if cycle is not None and not cycle.response_complete else None
            self.transport.write(raw_response(error, path))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


def raw_response(error: ApiError, path: str | None = None) -> bytes:
    """``error`` as a whole HTTP/1.1 response with ``Connection: close``, for a connection h11 cannot answer on
    (no request has arrived, or the request to ``path`` is half read)."""
    body = error_body(error, path)
    status = error_status(error, path)
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close",
             *(f"{name.lower()}: {value}" for name, value in (error.headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
