"""Streamed answers of ``ldm-serve``: server-sent events (``text/event-stream``) as a request waits, runs and
finishes, in our shape on ``POST /v1/images`` and in OpenAI's on ``POST /v1/images/generations``.

Ours, each event's data a JSON object with the request's ``id``:

    event: queued      data: {"id", "position"}            first; again whenever the jobs ahead of it change
    event: progress    data: {"id", "step", "steps"}       step 0 when it starts, then after each step
    event: preview     data: {"id", "image", "index", "step", "steps", "b64_png"}   with ``previews``
    event: completed   data: {"id", "images", "seeds", "width", "height", "timings"}   the unstreamed JSON answer
    event: error       data: {"error": {"type", "field", "message"}}                 instead of completed

OpenAI's (its images API's streaming): ``image_generation.partial_image`` events (``partial_images`` of each image,
``partial_image_index`` from 0), then one ``image_generation.completed`` per image (on ``/v1/images/edits``,
``image_edit.partial_image`` and ``image_edit.completed``), each with ``b64_json``,
``size``, ``output_format``, ``background``, ``quality`` and ``created_at``, and ours beside them (``image_index``,
``seed``); a failure is an ``error`` event with OpenAI's error object, which OpenAI's clients raise.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any, AsyncIterator, Callable

import numpy as np
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ldm_runtime.images import png_bytes
from ldm_serve.batcher import Job

OPENAI_PARTIAL = "image_generation.partial_image"
OPENAI_COMPLETED = "image_generation.completed"
OPENAI_EDIT_PARTIAL = "image_edit.partial_image"  # the same events of POST /v1/images/edits
OPENAI_EDIT_COMPLETED = "image_edit.completed"


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event: its name and its data as one line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode("utf-8")


class EventStream(StreamingResponse):
    """A ``text/event-stream`` answer of ``events``; ``on_close`` runs once it ends, however it ends (its last
    event sent, or the client gone, when Starlette stops iterating ``events``)."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None], headers: dict[str, str]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def job_events(job: Job, deadline: float) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """``job``'s events (``ldm_serve.batcher``) as they arrive, then ``("done", {})`` once its future is done
    (every event the worker sent before answering comes first), or ``("late", {})`` if ``deadline``
    (``time.monotonic()``) passes first."""
    assert job.events is not None
    while True:
        if not job.events.empty():
            yield job.events.get_nowait()
            continue
        if job.future.done():
            yield "done", {}
            return
        getter = asyncio.ensure_future(job.events.get())
        try:
            done, _ = await asyncio.wait({getter, job.future}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter in done:
            yield getter.result()
        elif not done:
            yield "late", {}
            return


async def preview_png(pixels: np.ndarray, seed: int, step: int, steps: int) -> str:
    """A preview as a base64 PNG whose text chunk says what it is."""
    data = await asyncio.to_thread(png_bytes, pixels, {"preview_of_seed": seed, "step": step, "steps": steps})
    return base64.b64encode(data).decode("ascii")


def openai_image_event(event: str, b64_png: str, width: int, height: int, **ours: Any) -> bytes:
    """An ``image_generation.*`` or ``image_edit.*`` event (``event``) in OpenAI's shape, with
    ``ours`` (``image_index``, ``seed``, ``partial_image_index``) beside its fields."""
    return sse(event, {"type": event, "b64_json": b64_png, "created_at": int(time.time()),
                       "size": f"{width}x{height}", "output_format": "png", "background": "opaque",
                       "quality": "auto", **ours})
