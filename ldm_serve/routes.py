"""The routes of ``ldm-serve``: the images routes (``ImagesRoute``: parse, queue one job, wait, answer) and the
status routes ``/healthz``, ``/readyz`` and ``/metrics``.

Nothing a client sends reaches a file path or picks an engine. A full queue is 429 and a server warming up,
draining or past the request's timeout 503, each with ``Retry-After``; a client that disconnects withdraws its
job from the batch.
"""

from __future__ import annotations

import asyncio
import base64
import math
import secrets
import time
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from ldm_runtime.errors import RequestError
from ldm_runtime.images import png_bytes
from ldm_runtime.noise import MAX_SEED
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from ldm_serve.batcher import Batcher, Job, JobResult, JobTimeout, NotAccepting, QueueFull
from ldm_serve.errors import ERROR_CONTENT, ApiError, error_response
from ldm_serve.metrics import ServeMetrics
from ldm_serve.request_schema import ServeLimits, openai_request_model, parse_body, request_model

STUCK_STEP_GRACE_S = 1.0  # the worker drops an expired job at its next step boundary; this covers a stuck step


class ImagesRoute:
    """``POST /v1/images`` and ``POST /v1/images/generations`` (the API key is ``ApiKeyMiddleware``'s): parse,
    queue one job of ``n`` images, wait for it, answer: PNG or our JSON on the first, OpenAI's JSON on the second.
    Both share the limits, the queue, the batcher and the metrics."""

    def __init__(self, pipeline: Pipeline, batcher: Batcher, limits: ServeLimits, metrics: ServeMetrics):
        self.pipeline = pipeline
        self.batcher = batcher
        self.limits = limits
        self.metrics = metrics
        self.model = request_model(limits)
        self.openai_model = openai_request_model(limits)

    async def create_images(self, request: Request) -> Response:
        return await self._counted(request, self._answer)

    async def create_openai_images(self, request: Request) -> Response:
        return await self._counted(request, self._answer_openai)

    async def _counted(self, request: Request, answer: Callable) -> Response:
        arrived = time.monotonic()
        with self.metrics.in_flight.track_inprogress():
            try:
                return await answer(request, arrived)
            except ApiError as error:
                self.metrics.requests.labels(_outcome(error)).inc()
                raise

    async def _answer(self, request: Request, arrived: float) -> Response:
        raw = await request.body()
        parsed = parse_body(raw, request.headers.get("content-type", ""), self.limits, self.model)
        accepted = _accepts(request.headers.get("accept", "application/json"))
        png = "image/png" in accepted and not accepted & {"application/json", "application/*"}
        if png and parsed.n > 1:
            raise ApiError(406, "not_acceptable", f"n is {parsed.n} but the client accepts only image/png; expected "
                                                  f"n = 1 or Accept: application/json", "n")
        seeds, result, total_s = await self._generate(request, parsed, parsed.height, parsed.width, arrived)
        pngs = await _encode_pngs(parsed, self._steps(parsed), seeds, result)
        height, width = result.images[0].shape[:2]
        timings = _timings(result, total_s)
        if png:
            server_timing = ", ".join(f"{name[:-3]};dur={value}" for name, value in timings.items())
            return Response(pngs[0], media_type="image/png",
                            headers={"X-Seed": str(seeds[0]), "Server-Timing": server_timing})
        return JSONResponse({"images": [base64.b64encode(data).decode("ascii") for data in pngs], "seeds": seeds,
                             "width": width, "height": height, "timings": timings})

    async def _answer_openai(self, request: Request, arrived: float) -> Response:
        raw = await request.body()
        parsed = parse_body(raw, request.headers.get("content-type", ""), self.limits, self.openai_model)
        width, height = (None, None) if parsed.size is None else map(int, parsed.size.split("x"))
        seeds, result, total_s = await self._generate(request, parsed, height, width, arrived)
        pngs = await _encode_pngs(parsed, self._steps(parsed), seeds, result)
        height, width = result.images[0].shape[:2]
        return JSONResponse({"created": int(time.time()),
                             "data": [{"b64_json": base64.b64encode(data).decode("ascii"), "seed": one_seed}
                                      for data, one_seed in zip(pngs, seeds)],
                             "size": f"{width}x{height}", "output_format": "png",
                             "timings": _timings(result, total_s)})

    async def _generate(self, request: Request, parsed: BaseModel, height: int | None, width: int | None,
                        arrived: float) -> tuple[list[int], JobResult, float]:
        """Queue the ``parsed.n`` images and wait for them: their seeds, the job's result and the seconds since
        the request arrived (observed as its latency, and counted as ok)."""
        seed = secrets.randbelow(MAX_SEED) if parsed.seed is None else parsed.seed
        seeds = [(seed + index) % MAX_SEED for index in range(parsed.n)]
        requests = self._generation_requests(parsed, seeds, height, width)
        loop = asyncio.get_running_loop()
        job = Job(requests=requests, deadline=arrived + self.limits.request_timeout_s, loop=loop,
                  future=loop.create_future(), enqueued_at=arrived)
        self._submit(job)
        result = await await_job(self.batcher, job, request, self.limits)
        total_s = time.monotonic() - arrived
        self.metrics.latency.observe(total_s)
        self.metrics.requests.labels("ok").inc()
        return seeds, result, total_s

    def _steps(self, parsed: BaseModel) -> int:
        """The request's steps: those it names, else the server's default steps for the server's default sampler
        (the body's default), else the pipeline's default for the sampler it names, at most ``--max-steps``."""
        if "steps" in parsed.model_fields_set or parsed.sampler == self.limits.default_sampler:
            return parsed.steps
        return min(self.pipeline.default_steps_for(parsed.sampler), self.limits.max_steps)

    def _generation_requests(self, parsed: BaseModel, seeds: list[int], height: int | None,
                             width: int | None) -> list[GenerationRequest]:
        """One request per seed, each checked by the pipeline (``ApiError`` 422 naming the field)."""
        requests = [GenerationRequest(prompt=parsed.prompt, negative_prompt=parsed.negative_prompt, seed=one_seed,
                                      sampler=parsed.sampler, steps=self._steps(parsed),
                                      guidance_scale=parsed.guidance_scale, eta=parsed.eta, height=height,
                                      width=width) for one_seed in seeds]
        for generation in requests:
            try:
                self.pipeline.validate(generation)
            except RequestError as error:
                raise ApiError(422, "invalid_request", str(error), error.field) from None
        return requests

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


async def _encode_pngs(parsed: BaseModel, steps: int, seeds: list[int], result: JobResult) -> list[bytes]:
    """The images as PNG bytes, each with its generation parameters (``steps``: those it was sampled with) in a
    text chunk."""
    height, width = result.images[0].shape[:2]
    parameters = [{"prompt": parsed.prompt, "negative_prompt": parsed.negative_prompt, "seed": one_seed,
                   "steps": steps, "guidance_scale": parsed.guidance_scale, "eta": parsed.eta,
                   "height": height, "width": width, "sampler": parsed.sampler} for one_seed in seeds]
    return await asyncio.to_thread(lambda: [png_bytes(image, settings)
                                            for image, settings in zip(result.images, parameters)])


def _timings(result: JobResult, total_s: float) -> dict[str, float]:
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
        raise _timeout_error(limits)
    error = job.future.exception()
    if isinstance(error, JobTimeout):
        raise _timeout_error(limits)
    if isinstance(error, RequestError):
        raise ApiError(422, "invalid_request", str(error), error.field)
    if isinstance(error, NotAccepting):  # the drain time ran out before this request finished
        raise _not_accepting_error(error)
    if error is not None:
        raise ApiError(500, "internal", "the engine failed on this request; the server log has the details")
    return job.future.result()


def _not_accepting_error(error: NotAccepting) -> ApiError:
    what = "is warming up" if error.reason == "warming_up" else "is draining before it exits"
    return ApiError(503, error.reason, f"the server {what}; expected a retry later", None,
                    {"Retry-After": "1" if error.reason == "warming_up" else "5"})


def _timeout_error(limits: ServeLimits) -> ApiError:
    return ApiError(503, "timeout", f"the request did not finish within the server's {limits.request_timeout_s:g} s "
                                    f"limit; expected a retry when the server is less busy", None,
                    {"Retry-After": str(max(1, math.ceil(limits.request_timeout_s / 10)))})


def _outcome(error: ApiError) -> str:
    return {429: "queue_full", 499: "disconnected", 500: "error"}.get(
        error.status, {"warming_up": "not_ready", "draining": "draining", "timeout": "timeout"}.get(error.type,
                                                                                                 "invalid"))


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body has been read, so receive() only reports a disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def readiness(batcher: Batcher) -> ApiError | None:
    """Why the server cannot take requests now (draining, warming up, its worker thread gone), or None when it can:
    what ``/readyz`` answers, and what Ray Serve's health check of a replica asks (``ldm_serve.replicas``)."""
    if batcher.draining:
        return ApiError(503, "draining", "the server is draining before it exits", None, {"Retry-After": "5"})
    if not batcher.alive:
        return ApiError(503, "worker_stopped", "the engine's worker thread has stopped", None, {"Retry-After": "5"})
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
