"""The routes of ``ldm-serve``: the images routes (``ImagesRoute``: parse, queue one job, wait, answer, or stream
it as it goes; and cancel) and the status routes ``/healthz``, ``/readyz`` and ``/metrics``. An edit (an init image,
with a mask or not) is a request like any other: its job shares the step-level batch with text to image.

Nothing a client sends reaches a file path or picks an engine. A full queue is 429 and a server warming up,
draining or past the request's timeout 503, each with ``Retry-After``; a client that disconnects withdraws its
job from the batch, and so does ``DELETE /v1/images/{id}`` (the id is in every answer's ``X-Request-Id`` and in a
stream's first event). A streamed request (``stream: true``) is answered with server-sent events
(``ldm_serve.events``) as it waits, runs and finishes; its images are byte for byte those it gets unstreamed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import secrets
import time
from typing import Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from ldm_runtime.errors import RequestError
from ldm_runtime.images import png_bytes
from ldm_runtime.noise import MAX_SEED
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from ldm_serve.batcher import Batcher, Job, JobCancelled, JobResult, JobTimeout, NotAccepting, QueueFull
from ldm_serve.errors import (ERROR_CONTENT, OPENAI_EDITS_PATH, OPENAI_IMAGES_PATH, ApiError, error_body,
                              error_response, shown_value)
from ldm_serve.events import (OPENAI_COMPLETED, OPENAI_EDIT_COMPLETED, OPENAI_EDIT_PARTIAL, OPENAI_PARTIAL,
                              EventStream, job_events, openai_image_event, preview_png, sse)
from ldm_serve.metrics import ServeMetrics
from ldm_serve.request_schema import (ServeLimits, lora_of, openai_edit_model, openai_request_model, parse_body,
                                      request_model)
from ldm_serve.uploads import json_images, read_edit_form

STUCK_STEP_GRACE_S = 1.0  # the worker drops an expired job at its next step boundary; this covers a stuck step
REQUEST_ID_HEADER = "X-Request-Id"
# a request id a client (or Ray Serve's proxy) gives in REQUEST_ID_HEADER: what a DELETE's path can name
REQUEST_ID = re.compile(r"[A-Za-z0-9._~:-]{1,200}")
REQUEST_ID_TEXT = "1 to 200 letters, digits, '.', '_', '~', ':' or '-'"


class ImagesRoute:
    """``POST /v1/images``, ``POST /v1/images/generations`` and ``POST /v1/images/edits`` (the API key is
    ``ApiKeyMiddleware``'s): parse, queue one job of ``n`` images, wait for it, answer: PNG or our JSON on the
    first, OpenAI's JSON on the others; with ``stream`` true, events as it goes in each route's shape. All share the
    limits, the queue, the batcher, the metrics and the jobs ``DELETE /v1/images/{id}`` (``cancel_images``) finds
    by id."""

    def __init__(self, pipeline: Pipeline, batcher: Batcher, limits: ServeLimits, metrics: ServeMetrics,
                 cors_origins: tuple[str, ...] = ()):
        self.pipeline = pipeline
        self.cors_origins = cors_origins
        self.batcher = batcher
        self.limits = limits
        self.metrics = metrics
        self.model = request_model(limits)
        self.openai_model = openai_request_model(limits)
        self.edit_model = openai_edit_model(limits)
        self.jobs: dict[str, Job] = {}  # queued or running, by id
        # the other servers behind the same address (Ray Serve's replicas: ``ldm_serve.replicas.CancelPeers``),
        # which a DELETE for a request this one does not hold is passed to; None: none
        self.peers = None

    async def create_images(self, request: Request) -> Response:
        return await self._counted(request, self._answer)

    async def create_openai_images(self, request: Request) -> Response:
        return await self._counted(request, self._answer_openai)

    async def create_openai_edits(self, request: Request) -> Response:
        return await self._counted(request, self._answer_openai_edit)

    async def cancel_images(self, request_id: str) -> Response:
        """``DELETE /v1/images/{id}``: the queued or running request ``id`` is answered as cancelled, and its images
        leave the batch at the next step boundary."""
        if self.cancel_held(request_id):
            return JSONResponse({"id": request_id, "status": "cancelled"})
        if self.peers is None or not await self.peers.cancel(request_id):
            raise ApiError(404, "not_found", f"no queued or running request has id {shown_value(request_id)}; "
                                             f"expected the id of one (its {REQUEST_ID_HEADER} header, or its "
                                             f"stream's first event)", "id")
        return JSONResponse({"id": request_id, "status": "cancelled"})

    def _request_id(self, request: Request) -> str:
        """A new request's id: the client's ``X-Request-Id``, so that it can cancel a request it is not streamed
        (behind Ray Serve's proxy, the proxy's, which is the client's own when it sent one), else one made here;
        ``ApiError`` for an id a DELETE cannot name or one a request in flight here has."""
        request_id = request.headers.get(REQUEST_ID_HEADER)
        if request_id is None:
            return secrets.token_hex(12)
        if not REQUEST_ID.fullmatch(request_id):
            raise ApiError(400, "invalid_request", f"the {REQUEST_ID_HEADER} header is {shown_value(request_id)}; "
                                                   f"expected {REQUEST_ID_TEXT}, or no header (the server makes an "
                                                   f"id)", REQUEST_ID_HEADER)
        if request_id in self.jobs:
            raise ApiError(409, "conflict", f"the {REQUEST_ID_HEADER} header is {shown_value(request_id)}, the id of "
                                            f"a request still in flight; expected a new id, or no header (the "
                                            f"server makes one)", REQUEST_ID_HEADER)
        return request_id

    def cancel_held(self, request_id: str) -> bool:
        """Cancel the request ``request_id`` if this server holds it, queued or running (not already cancelled or
        answered); whether it did."""
        job = self.jobs.get(request_id)
        if job is None or job.cancelled or job.future.done():
            return False
        self.batcher.cancel(job)
        return True

    def _hold(self, job: Job) -> None:
        self.jobs[job.id] = job
        if self.peers is not None:
            self.peers.held(job.id)

    def _let_go(self, job: Job) -> None:
        if self.jobs.pop(job.id, None) is not None and self.peers is not None:
            self.peers.let_go(job.id)

    async def _counted(self, request: Request, answer: Callable) -> Response:
        """``answer``'s response, the request counted in flight until it has been answered (a stream: until it
        ends) and counted by outcome where it fails before it is answered."""
        arrived = time.monotonic()
        self.metrics.in_flight.inc()
        streaming = False
        try:
            encoding = request.headers.get("content-encoding", "identity")
            if encoding.strip().lower() != "identity":
                raise ApiError(415, "unsupported_media_type", f"content encoding {shown_value(encoding)} is not "
                                                              f"supported; expected a body sent as it is (no "
                                                              f"Content-Encoding)", "content-encoding")
            response = await answer(request, arrived)
            streaming = isinstance(response, EventStream)  # its end does the rest
            return response
        except ApiError as error:
            self.metrics.requests.labels(outcome_of(error)).inc()
            raise
        finally:
            if not streaming:
                self.metrics.in_flight.dec()

    async def _answer(self, request: Request, arrived: float) -> Response:
        raw = await request.body()
        parsed = parse_body(raw, request.headers.get("content-type", ""), self.limits, self.model)
        images = await json_images(parsed, self.limits)
        accepted = _accepts(request.headers.get("accept", "application/json"))
        if parsed.stream:
            if not accepted & {"text/event-stream", "text/*", "*/*"}:
                raise ApiError(406, "not_acceptable", "stream is true but the client does not accept "
                                                      "text/event-stream; expected stream: false or Accept: "
                                                      "text/event-stream", "stream")
            seeds, requests, job = self._queue_job(request, parsed, parsed.height, parsed.width, arrived,
                                                   parsed.previews, images)
            return self._event_stream(job, lambda answered: self._our_events(job, requests, seeds, arrived,
                                                                             answered))
        png = "image/png" in accepted and not accepted & {"application/json", "application/*"}
        if png and parsed.n > 1:
            raise ApiError(406, "not_acceptable", f"n is {parsed.n} but the client accepts only image/png; expected "
                                                  f"n = 1 or Accept: application/json", "n")
        seeds, requests, job = self._queue_job(request, parsed, parsed.height, parsed.width, arrived, images=images)
        result, total_s = await self._wait(job, request, arrived)
        pngs = await encode_pngs(requests, result)
        timings = timings_of(result, total_s)
        if png:
            server_timing = ", ".join(f"{name[:-3]};dur={value}" for name, value in timings.items())
            return Response(pngs[0], media_type="image/png",
                            headers={"X-Seed": str(seeds[0]), "Server-Timing": server_timing,
                                     REQUEST_ID_HEADER: job.id})
        return JSONResponse(our_answer(pngs, seeds, result, timings), headers={REQUEST_ID_HEADER: job.id})

    async def _answer_openai(self, request: Request, arrived: float) -> Response:
        raw = await request.body()
        parsed = parse_body(raw, request.headers.get("content-type", ""), self.limits, self.openai_model)
        width, height = (None, None) if parsed.size is None else map(int, parsed.size.split("x"))
        return await self._openai_answer(request, arrived, parsed, height, width, OPENAI_IMAGES_PATH)

    async def _answer_openai_edit(self, request: Request, arrived: float) -> Response:
        # a page of another site can post a form without asking first (JSON it cannot): only its own origin and
        # --cors-origin's may; clients that are not browsers send no Origin
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
        if origin is not None and origin.lower() not in (own, *self.cors_origins):
            raise ApiError(403, "cross_origin", f"the form comes from a page of another origin, "
                                                f"{shown_value(origin)}; expected a client that is not a browser, "
                                                f"this server's page or an origin ldm-serve --cors-origin names",
                           "origin")
        parsed, image, mask = await read_edit_form(request, self.limits, self.edit_model)
        height, width = image.shape[:2]
        multiple, low, high = self.limits.size_multiple, self.limits.min_size, self.limits.max_size
        if not all(low <= side <= high and side % multiple == 0 for side in (width, height)):
            raise ApiError(422, "invalid_request", f"image is {width}x{height} pixels; expected sides that are "
                                                   f"multiples of {multiple} from {low} to {high}", "image")
        if parsed.size is not None and parsed.size != f"{width}x{height}":
            raise ApiError(422, "invalid_request", f"size is {shown_value(parsed.size)} but the image is "
                                                   f"{width}x{height} pixels; expected the image's size, "
                                                   f"\"{width}x{height}\", or no size", "size")
        if mask is not None and mask.shape != image.shape[:2]:
            raise ApiError(422, "invalid_request", f"mask is {mask.shape[1]}x{mask.shape[0]} pixels but the image "
                                                   f"is {width}x{height}; expected a mask of the image's size",
                           "mask")
        return await self._openai_answer(request, arrived, parsed, None, None, OPENAI_EDITS_PATH, (image, mask))

    async def _openai_answer(self, request: Request, arrived: float, parsed: BaseModel, height: int | None,
                             width: int | None, path: str,
                             images: tuple[np.ndarray | None, np.ndarray | None] = (None, None)) -> Response:
        """Queue the job and answer it in OpenAI's shape on ``path``: its JSON, or with ``stream`` its events."""
        if parsed.stream:
            seeds, requests, job = self._queue_job(request, parsed, height, width, arrived, parsed.partial_images,
                                                   images)
            return self._event_stream(job, lambda answered: self._openai_events(job, requests, seeds, arrived,
                                                                                answered, path))
        seeds, requests, job = self._queue_job(request, parsed, height, width, arrived, images=images)
        result, total_s = await self._wait(job, request, arrived)
        pngs = await encode_pngs(requests, result)
        height, width = result.images[0].shape[:2]
        return JSONResponse({"created": int(time.time()),
                             "data": [{"b64_json": base64.b64encode(data).decode("ascii"), "seed": one_seed}
                                      for data, one_seed in zip(pngs, seeds)],
                             "size": f"{width}x{height}", "output_format": "png",
                             "timings": timings_of(result, total_s)}, headers={REQUEST_ID_HEADER: job.id})

    def _queue_job(self, request: Request, parsed: BaseModel, height: int | None, width: int | None, arrived: float,
                   previews: int | None = None, images: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
                   ) -> tuple[list[int], list[GenerationRequest], Job]:
        """Queue the ``parsed.n`` images as one job: their seeds, their requests as sampled, and the job, which
        ``cancel_images`` finds by its id until it is answered. ``previews`` not None: the job is streamed, with
        that many previews of each image. ``images``: the init image and the mask of an edit, or None."""
        request_id = self._request_id(request)
        seed = secrets.randbelow(MAX_SEED) if parsed.seed is None else parsed.seed
        seeds = [(seed + index) % MAX_SEED for index in range(parsed.n)]
        requests = self._generation_requests(parsed, seeds, height, width, images)
        loop = asyncio.get_running_loop()
        job = Job(requests=requests, deadline=arrived + self.limits.request_timeout_s, loop=loop,
                  future=loop.create_future(), enqueued_at=arrived,
                  events=None if previews is None else asyncio.Queue(), previews=previews or 0, id=request_id)
        self._submit(job)
        self.metrics.count_adapters(requests[0].lora)
        self._hold(job)
        return seeds, requests, job

    async def _wait(self, job: Job, request: Request, arrived: float) -> tuple[JobResult, float]:
        """The job's result and the seconds since the request arrived (observed as its latency, and counted as ok);
        ``await_job``'s errors."""
        try:
            result = await await_job(self.batcher, job, request, self.limits)
        finally:
            self._let_go(job)
        return result, self.finished(arrived)

    def finished(self, arrived: float) -> float:
        """A request answered with its images: its latency observed and counted as ok; returns the seconds."""
        total_s = time.monotonic() - arrived
        self.metrics.latency.observe(total_s)
        self.metrics.requests.labels("ok").inc()
        return total_s

    def _event_stream(self, job: Job, events_of: Callable) -> EventStream:
        """The streamed answer of ``job``: ``events_of(answered)`` gives its events and calls ``answered()`` once the
        job has its outcome. When the stream ends, however it ends, the job leaves the registry and the request stops
        counting in flight; a job left without an outcome (its client gone) is withdrawn from the batch and
        counted as disconnected."""
        reached_the_end = False

        def answered() -> None:
            nonlocal reached_the_end
            reached_the_end = True

        def on_close() -> None:
            self._let_go(job)
            self.metrics.in_flight.dec()
            if not reached_the_end:
                self.batcher.withdraw(job)
                self.metrics.requests.labels("disconnected").inc()

        return EventStream(events_of(answered), on_close, headers={REQUEST_ID_HEADER: job.id})

    async def _outcome_events(self, job: Job, arrived: float, answered: Callable[[], None]):
        """``job_events`` with the job's end made an outcome: ``("preview", ...)`` and the others as they come,
        then ``("result", {"result": JobResult, "total_s": seconds})``, counted as ok, or ``("failed", {"error":
        ApiError})``, counted by its outcome; ``answered()`` before either."""
        async for kind, values in job_events(job, job.deadline + STUCK_STEP_GRACE_S):
            if kind == "late":
                self.batcher.withdraw(job)
                error = timeout_error(self.limits)
            elif kind == "done":
                try:
                    result = job_result(job, self.limits)
                except ApiError as failure:
                    error = failure
                else:
                    answered()
                    yield "result", {"result": result, "total_s": self.finished(arrived)}
                    return
            else:
                yield kind, values
                continue
            self.metrics.requests.labels(outcome_of(error)).inc()
            answered()
            yield "failed", {"error": error}
            return

    async def _our_events(self, job: Job, requests: list[GenerationRequest], seeds: list[int], arrived: float,
                          answered: Callable[[], None]):
        """``POST /v1/images``' events (``ldm_serve.events``)."""
        async for kind, values in self._outcome_events(job, arrived, answered):
            if kind == "preview":
                b64_png = await preview_png(values["pixels"], seeds[values["image"]], values["step"], values["steps"])
                yield sse("preview", {"id": job.id, **{name: values[name] for name in ("image", "index", "step",
                                                                                      "steps")}, "b64_png": b64_png})
            elif kind == "result":
                result, total_s = values["result"], values["total_s"]
                pngs = await encode_pngs(requests, result)
                yield sse("completed", {"id": job.id, **our_answer(pngs, seeds, result, timings_of(result, total_s))})
            elif kind == "failed":
                yield sse("error", json.loads(error_body(values["error"])))
            else:
                yield sse(kind, {"id": job.id, **values})

    async def _openai_events(self, job: Job, requests: list[GenerationRequest], seeds: list[int], arrived: float,
                             answered: Callable[[], None], path: str):
        """``POST /v1/images/generations``' or ``/v1/images/edits``' (``path``) events in OpenAI's shape
        (``ldm_serve.events``)."""
        partial, completed = ((OPENAI_PARTIAL, OPENAI_COMPLETED) if path == OPENAI_IMAGES_PATH
                              else (OPENAI_EDIT_PARTIAL, OPENAI_EDIT_COMPLETED))
        height, width = self.pipeline.image_shape(requests[0])
        async for kind, values in self._outcome_events(job, arrived, answered):
            if kind == "preview":
                image = values["image"]
                b64_png = await preview_png(values["pixels"], seeds[image], values["step"], values["steps"])
                yield openai_image_event(partial, b64_png, width, height, partial_image_index=values["index"],
                                         image_index=image, seed=seeds[image])
            elif kind == "result":
                result, total_s = values["result"], values["total_s"]
                pngs = await encode_pngs(requests, result)
                timings = timings_of(result, total_s)
                for image, (png, seed) in enumerate(zip(pngs, seeds)):
                    yield openai_image_event(completed, base64.b64encode(png).decode("ascii"), width, height,
                                             image_index=image, seed=seed, timings=timings)
            elif kind == "failed":
                yield sse("error", {"type": "error", **json.loads(error_body(values["error"], path))})

    def _steps(self, parsed: BaseModel) -> int:
        """The request's steps: those it names, else the server's default steps for the server's default sampler
        (the body's default), else the pipeline's default for the sampler it names, at most ``--max-steps``."""
        if "steps" in parsed.model_fields_set or parsed.sampler == self.limits.default_sampler:
            return parsed.steps
        return min(self.pipeline.default_steps_for(parsed.sampler), self.limits.max_steps)

    def _generation_requests(self, parsed: BaseModel, seeds: list[int], height: int | None, width: int | None,
                             images: tuple[np.ndarray | None, np.ndarray | None]) -> list[GenerationRequest]:
        """One request per seed, each checked by the pipeline (``ApiError`` 422 naming the field) and resolved
        (``Pipeline.resolve``) into what it is sampled with; a null ``guidance_interval`` is the server's default.
        ``images``: the init image and mask of an edit (None where absent)."""
        init_image, mask = images
        lora = lora_of(parsed)
        interval = parsed.guidance_interval
        interval = self.limits.default_guidance_interval if interval is None else tuple(interval)
        requests = [GenerationRequest(prompt=parsed.prompt, negative_prompt=parsed.negative_prompt, seed=one_seed,
                                      sampler=parsed.sampler, steps=self._steps(parsed),
                                      guidance_scale=parsed.guidance_scale, guidance_interval=interval,
                                      cache_interval=parsed.cache_interval, cache_schedule=parsed.cache_schedule,
                                      eta=parsed.eta, height=height, width=width, init_image=init_image,
                                      strength=getattr(parsed, "strength", None), mask=mask, lora=lora)
                    for one_seed in seeds]
        for generation in requests:
            try:
                self.pipeline.validate(generation)
            except RequestError as error:
                raise ApiError(422, "invalid_request", str(error), error.field) from None
        return [self.pipeline.resolve(generation) for generation in requests]

    def _submit(self, job: Job) -> None:
        """Queue ``job``; a full queue is 429, a server warming up or draining 503, both with Retry-After."""
        try:
            self.batcher.submit(job)
        except QueueFull as error:
            raise ApiError(429, "queue_full", f"the queue holds {self.batcher.config.max_queue} requests already; "
                                              f"expected a retry after {error.retry_after_s} s", None,
                           {"Retry-After": str(error.retry_after_s)}) from None
        except NotAccepting as error:
            raise _not_accepting_error(error) from None


def _accepts(accept: str) -> set[str]:
    """The media types an Accept header lists with a non-zero quality."""
    types = set()
    for part in accept.split(","):
        media, *params = [piece.strip() for piece in part.split(";")]
        quality = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            if float(quality) > 0:
                types.add(media.lower())
        except ValueError:
            types.add(media.lower())
    return types


def our_answer(pngs: list[bytes], seeds: list[int], result: JobResult, timings: dict[str, float]) -> dict:
    """The JSON answer of ``POST /v1/images``: base64 PNGs, seeds, size, timings."""
    height, width = result.images[0].shape[:2]
    return {"images": [base64.b64encode(data).decode("ascii") for data in pngs], "seeds": seeds, "width": width,
            "height": height, "timings": timings}


async def encode_pngs(requests: list[GenerationRequest], result: JobResult) -> list[bytes]:
    """The images as PNG bytes, each with the settings it was sampled with (its resolved request) in a text
    chunk."""
    height, width = result.images[0].shape[:2]
    parameters = [{"prompt": one.prompt, "negative_prompt": one.negative_prompt, "seed": one.seed,
                   "steps": one.steps, "guidance_scale": one.guidance_scale,
                   "guidance_interval": None if one.guidance_interval is None else list(one.guidance_interval),
                   "cache_interval": one.cache_interval, "cache_schedule": one.cache_schedule, "eta": one.eta,
                   "height": height, "width": width, "sampler": one.sampler,
                   **({} if one.init_image is None else {"strength": one.strength, "masked": one.mask is not None}),
                   **({"lora": [list(pair) for pair in one.lora]} if one.lora else {})}
                  for one in requests]
    return await asyncio.to_thread(lambda: [png_bytes(image, settings)
                                            for image, settings in zip(result.images, parameters)])


def timings_of(result: JobResult, total_s: float) -> dict[str, float]:
    return {"queue_ms": round(result.queue_s * 1e3, 3), "compute_ms": round(result.compute_s * 1e3, 3),
            "total_ms": round(total_s * 1e3, 3)}


async def await_job(batcher: Batcher, job: Job, request: Request, limits: ServeLimits) -> JobResult:
    """The job's result; withdraws it when the client disconnects or the deadline passes (``ApiError`` 499 or
    503), and turns the job's own failure into 422 (a request error) or 500 (anything else)."""
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({job.future, disconnected}, return_when=asyncio.FIRST_COMPLETED,
                                     timeout=max(0.0, job.deadline - time.monotonic()) + STUCK_STEP_GRACE_S)
    finally:
        disconnected.cancel()
    if job.future not in done:
        batcher.withdraw(job)
        if disconnected in done:  # nobody reads this answer; it only ends the handler and counts the outcome
            raise ApiError(499, "disconnected", "the client disconnected before its images were ready")
        raise timeout_error(limits)
    return job_result(job, limits)


def job_result(job: Job, limits: ServeLimits) -> JobResult:
    """The result of a job whose future is done; its failure as an ``ApiError``: 422 (a request error), 409
    (cancelled), 503 (timed out, or the drain time ran out) or 500 (anything else)."""
    error = job.future.exception()
    if isinstance(error, JobTimeout):
        raise timeout_error(limits)
    if isinstance(error, JobCancelled):
        raise ApiError(409, "cancelled", f"the request was cancelled (DELETE /v1/images/{job.id}) before its images "
                                         f"were ready")
    if isinstance(error, RequestError):
        raise ApiError(422, "invalid_request", str(error), error.field)
    if isinstance(error, NotAccepting):  # the drain time ran out before this request finished
        raise _not_accepting_error(error)
    if error is not None:
        raise ApiError(500, "internal", "the engine failed on this request; the server log has the details")
    return job.future.result()


def _not_accepting_error(error: NotAccepting) -> ApiError:
    if error.reason == "engine_failed":
        return _engine_failed_error(None)
    what = "is warming up" if error.reason == "warming_up" else "is draining before it exits"
    return ApiError(503, error.reason, f"the server {what}; expected a retry later", None,
                    {"Retry-After": "1" if error.reason == "warming_up" else "5"})


def timeout_error(limits: ServeLimits) -> ApiError:
    return ApiError(503, "timeout", f"the request did not finish within the server's {limits.request_timeout_s:g} s "
                                    f"limit; expected a retry when the server is less busy", None,
                    {"Retry-After": str(max(1, math.ceil(limits.request_timeout_s / 10)))})


def outcome_of(error: ApiError) -> str:
    return {429: "queue_full", 499: "disconnected", 500: "error"}.get(
        error.status, {"warming_up": "not_ready", "draining": "draining", "timeout": "timeout",
                       "cancelled": "cancelled"}.get(error.type, "invalid"))


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body has been read, so receive() only reports a disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _engine_failed_error(cause: str | None) -> ApiError:
    """The answer while the engine has failed its warm-up (``Batcher.failure``: ``cause``, where known here)."""
    said = f" ({cause})" if cause else ""
    return ApiError(503, "engine_failed", f"the engine failed its warm-up{said}, so the server takes no requests; "
                                          f"expected a restart once the cause is fixed (the server log has the "
                                          f"details)", None, {"Retry-After": "5"})


def readiness(batcher: Batcher) -> ApiError | None:
    """Why the server cannot take requests now (draining, warming up, its worker thread gone), or None when it can:
    what ``/readyz`` answers, and what Ray Serve's health check of a replica asks (``ldm_serve.replicas``)."""
    if batcher.draining:
        return ApiError(503, "draining", "the server is draining before it exits", None, {"Retry-After": "5"})
    if not batcher.alive:
        return ApiError(503, "worker_stopped", "the engine's worker thread has stopped", None, {"Retry-After": "5"})
    if batcher.failure is not None:
        return _engine_failed_error(batcher.failure)
    if not batcher.ready:
        return ApiError(503, "warming_up", "the engine is warming up", None, {"Retry-After": "1"})
    return None


def add_status_routes(app: FastAPI, batcher: Batcher, metrics: ServeMetrics) -> None:
    """``/healthz``, ``/readyz`` and ``/metrics``."""

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", summary="The engine is loaded and warmed up, and the server is not draining",
             responses={503: {"description": "Warming up or draining", "content": ERROR_CONTENT}})
    async def readyz() -> Response:
        problem = readiness(batcher)
        if problem is not None:
            return error_response(problem)
        return JSONResponse({"status": "ready", "batching": batcher.config.mode,
                             "max_batch": batcher.config.max_batch, "queue_depth": batcher.queue_depth})

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
