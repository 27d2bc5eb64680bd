"""The HTTP layer of ``ldm-serve``: the request schema, validation, auth, content negotiation and metrics.

Routes: ``POST /v1/images`` (text to image), ``GET /healthz`` (the process answers), ``GET /readyz`` (engine
warmed up and not draining), ``GET /metrics`` (Prometheus text format), ``GET /openapi.json`` and ``/docs``.

Every error is JSON, ``{"error": {"type": ..., "field": ..., "message": ...}}``, where ``message`` is one
sentence naming the bad value and what was expected. Nothing a client sends reaches a file path or picks
an engine; no response ever carries a traceback or a path (unexpected errors go to the server's log only).

``create_app`` assembles the app from the parts below: the request schema (``request_model``, the OpenAPI
entry ``images_openapi``), the error handlers, the images route (``ImagesRoute``: parse, queue, wait, answer;
the wait is ``await_job``), and the status routes.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hmac
import json
import math
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from ldm_runtime.errors import RequestError
from ldm_runtime.images import png_bytes
from ldm_runtime.noise import MAX_SEED
from ldm_runtime.pipeline import DEFAULT_STEPS, GenerationRequest, Pipeline
from ldm_runtime.serve.batcher import Batcher, Job, JobResult, JobTimeout, NotAccepting, QueueFull

MAX_GUIDANCE_SCALE = 100.0
OUTCOMES = ("ok", "invalid", "unauthorized", "queue_full", "not_ready", "draining", "timeout", "disconnected",
            "error")
STUCK_STEP_GRACE_S = 1.0  # the worker drops an expired job at its next step boundary; this covers a stuck step


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; ``ldm-serve``'s flags set them (the engine's range bounds the sizes)."""

    max_n: int = 4
    max_steps: int = 50
    max_prompt_chars: int = 1000
    max_body_bytes: int = 16 * 1024
    request_timeout_s: float = 120.0
    min_size: int = 8
    max_size: int = 64
    size_multiple: int = 8
    default_size: int = 32
    default_steps: int = DEFAULT_STEPS


@functools.lru_cache(maxsize=8)
def request_model(limits: ServeLimits) -> type[BaseModel]:
    """The pydantic model of a ``POST /v1/images`` body under ``limits``: strict types, unknown fields refused."""
    defaults = {field.name: field.default for field in dataclasses.fields(GenerationRequest)}
    size = dict(ge=limits.min_size, le=limits.max_size, multiple_of=limits.size_multiple)
    size_text = (f"Image {{}} in pixels: a multiple of {limits.size_multiple} from {limits.min_size} to "
                 f"{limits.max_size}; null for the model's {limits.default_size}.")
    return create_model(
        "ImageRequest",
        __config__=ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"prompt": "a red circle on a blue background",
                                                               "seed": 7, "steps": 25}]}),
        prompt=(str, Field(min_length=1, max_length=limits.max_prompt_chars,
                           description="What to draw. Longer than the model's token limit is truncated.")),
        negative_prompt=(str, Field(defaults["negative_prompt"], max_length=limits.max_prompt_chars,
                                    description="What to steer away from; empty for none.")),
        n=(int, Field(1, ge=1, le=limits.max_n, description="Number of images; image i uses seed + i.")),
        steps=(int, Field(limits.default_steps, ge=1, le=limits.max_steps, description="DDIM steps.")),
        guidance_scale=(float, Field(defaults["guidance_scale"], ge=0, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False,
                                     description="Classifier-free guidance scale; 1 means no guidance.")),
        eta=(float, Field(defaults["eta"], ge=0, le=1, allow_inf_nan=False,
                          description="DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like.")),
        seed=(int | None, Field(None, ge=0, le=MAX_SEED - 1,
                                description="Seed of the first image; null picks one (returned in the answer). "
                                            "The same request and seed give the same image whatever else runs.")),
        height=(int | None, Field(None, **size, description=size_text.format("height"))),
        width=(int | None, Field(None, **size, description=size_text.format("width"))),
    )


def expected_text(field: str, limits: ServeLimits) -> str:
    """What ``field`` must be, as the end of an error sentence."""
    sizes = f"a multiple of {limits.size_multiple} from {limits.min_size} to {limits.max_size}, or null"
    return {
        "prompt": f"a non-empty string of at most {limits.max_prompt_chars} characters",
        "negative_prompt": f"a string of at most {limits.max_prompt_chars} characters",
        "n": f"an integer from 1 to {limits.max_n}",
        "steps": f"an integer from 1 to {limits.max_steps}",
        "guidance_scale": f"a number from 0 to {MAX_GUIDANCE_SCALE:g}",
        "eta": "a number from 0 to 1",
        "seed": "an integer from 0 to 2**63 - 1, or null",
        "height": sizes,
        "width": sizes,
    }.get(field, "")


class ApiError(Exception):
    """An error answered as JSON: ``status``, a ``type`` word, the ``field`` at fault (or None), one sentence."""

    def __init__(self, status: int, type_: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field, self.headers = status, type_, message, field, headers


def error_response(error: ApiError) -> JSONResponse:
    body = {"error": {"type": error.type, "field": error.field, "message": error.message}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _shown(value: Any) -> str:
    """A client's value as JSON, shortened to 60 characters."""
    text = json.dumps(value, ensure_ascii=False, default=str, allow_nan=True)
    return text if len(text) <= 60 else text[:57] + "..."


def validation_error(error: ValidationError, body: Any, limits: ServeLimits) -> ApiError:
    """The first pydantic error as one sentence naming the field."""
    first = error.errors()[0]
    location = [str(part) for part in first["loc"]]
    if not location:
        return ApiError(422, "invalid_request", f"the body is {_shown(body)}; expected a JSON object", "body")
    field = location[0]
    if first["type"] == "extra_forbidden":
        known = ", ".join(request_model(limits).model_fields)
        return ApiError(422, "invalid_request", f"{field} is not a field of this request; expected some of {known}",
                        field)
    if first["type"] == "missing":
        return ApiError(422, "invalid_request", f"{field} is missing; expected {expected_text(field, limits)}", field)
    value = first.get("input")
    if first["type"] == "string_too_long" and isinstance(value, str):
        return ApiError(422, "invalid_request", f"{field} has {len(value)} characters; expected at most "
                                                f"{limits.max_prompt_chars}", field)
    return ApiError(422, "invalid_request", f"{field} is {_shown(value)}; expected {expected_text(field, limits)}",
                    field)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes, content_type: str, limits: ServeLimits, model: type[BaseModel]) -> BaseModel:
    """The request body as a validated model; ``ApiError`` naming the field otherwise."""
    media_type = content_type.split(";")[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type",
                       f"content type {media_type!r} is not supported; expected application/json", "content-type")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "malformed_json", "the body is not UTF-8; expected a JSON object in UTF-8",
                       "body") from None
    except (json.JSONDecodeError, ValueError) as error:
        where = (f" (at line {error.lineno} column {error.colno})"
                 if isinstance(error, json.JSONDecodeError) else f" ({error})")
        raise ApiError(400, "malformed_json", f"the body is not valid JSON{where}; expected a JSON object",
                       "body") from None
    try:
        parsed = model.model_validate(body)
    except ValidationError as error:
        raise validation_error(error, body, limits) from None
    if not parsed.prompt.strip():
        raise ApiError(422, "invalid_request", f"prompt is {_shown(parsed.prompt)}; expected "
                                               f"{expected_text('prompt', limits)} (not only spaces)", "prompt")
    if parsed.seed is not None and parsed.seed + parsed.n > MAX_SEED:
        raise ApiError(422, "invalid_request", f"seed is {parsed.seed}; expected at most 2**63 - {parsed.n} so that "
                                               f"all {parsed.n} seeds (seed + i) stay below 2**63", "seed")
    return parsed


class ServeMetrics:
    """The Prometheus metrics of one server, in their own registry; ``observe`` is the batcher's observer.

    Rates are Prometheus's to compute from the counters: denoising steps per second over the last minute is
    ``rate(ldm_serve_sample_steps_total[1m])``, UNet calls per second ``rate(ldm_serve_unet_calls_total[1m])``.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("ldm_serve_queue_depth", "Requests waiting to start", registry=self.registry)
        self.active_images = Gauge("ldm_serve_active_images", "Images in the running batch", registry=self.registry)
        self.batch_size = Histogram("ldm_serve_batch_size", "Images per UNet call (before guidance doubles them)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.latency = Histogram("ldm_serve_request_latency_seconds", "Time from arrival to answer, per request",
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                 registry=self.registry)
        self.requests = Counter("ldm_serve_requests", "Requests by outcome", ["outcome"], registry=self.registry)
        self.in_flight = Gauge("ldm_serve_requests_in_flight", "Image requests received and not yet answered",
                               registry=self.registry)
        self.unet_calls = Counter("ldm_serve_unet_calls", "Batched UNet calls", registry=self.registry)
        self.sample_steps = Counter("ldm_serve_sample_steps", "Denoising steps taken, summed over images "
                                    "(steps per second: rate() of this counter)", registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)

    def observe(self, event: str, **values: Any) -> None:
        if event == "queue_depth":
            self.queue_depth.set(values["depth"])
        elif event == "active":
            self.active_images.set(values["rows"])
        elif event == "unet_call":
            self.batch_size.observe(values["rows"])
            self.unet_calls.inc()
            self.sample_steps.inc(values["rows"])

    def render(self) -> bytes:
        return generate_latest(self.registry)


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


def create_app(pipeline: Pipeline, batcher: Batcher, limits: ServeLimits, metrics: ServeMetrics,
               api_key: str | None = None, model_name: str = "model") -> FastAPI:
    """The FastAPI app over a started-or-not ``batcher``: the lifespan starts its worker and stops it at exit."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.drain()
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="ldm-serve", version="1", lifespan=lifespan,
                  description=f"Text-to-image with a latent diffusion model ({model_name}); "
                              f"{batcher.config.mode} batching of up to {batcher.config.max_batch} images.")
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=limits.max_body_bytes)
    _add_error_handlers(app, metrics)
    route = ImagesRoute(pipeline, batcher, limits, metrics, api_key)
    app.post("/v1/images", summary="Generate images from a prompt",
             openapi_extra=images_openapi(route.model, limits))(route.create_images)
    _add_status_routes(app, batcher, metrics)
    return app


ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "type": {"type": "string"}, "field": {"type": ["string", "null"]}, "message": {"type": "string"}}}}}
ERROR_CONTENT = {"application/json": {"schema": ERROR_SCHEMA}}
ANSWER_SCHEMA = {"type": "object", "properties": {
    "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64",
                                          "contentMediaType": "image/png"}},
    "seeds": {"type": "array", "items": {"type": "integer"}},
    "width": {"type": "integer"}, "height": {"type": "integer"},
    "timings": {"type": "object", "properties": {"queue_ms": {"type": "number"},
                                                 "compute_ms": {"type": "number"},
                                                 "total_ms": {"type": "number"}}}}}


def images_openapi(model: type[BaseModel], limits: ServeLimits) -> dict[str, Any]:
    """The OpenAPI entry of ``POST /v1/images``: the body's schema and every answer it can get."""
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}},
        "responses": {
            "200": {"description": "JSON with base64 PNGs, seeds and timings; PNG bytes for n = 1 when the client "
                                   "accepts image/png and not JSON (seed in X-Seed, timings in Server-Timing)",
                    "content": {"application/json": {"schema": ANSWER_SCHEMA},
                                "image/png": {"schema": {"type": "string", "format": "binary"}}}},
            "400": {"description": "Malformed JSON", "content": ERROR_CONTENT},
            "401": {"description": "Missing or wrong API key", "content": ERROR_CONTENT},
            "406": {"description": "image/png only, for more than one image", "content": ERROR_CONTENT},
            "413": {"description": f"Body over {limits.max_body_bytes} bytes", "content": ERROR_CONTENT},
            "415": {"description": "Body not JSON", "content": ERROR_CONTENT},
            "422": {"description": "A field is invalid (named in error.field)", "content": ERROR_CONTENT},
            "429": {"description": "Queue full; see Retry-After", "content": ERROR_CONTENT},
            "503": {"description": "Warming up, draining, or timed out; see Retry-After", "content": ERROR_CONTENT},
        }}


def _add_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    """Every error as the JSON error object: ours, Starlette's (404, 405), FastAPI's validation, and the
    unexpected ones (500, counted; the details stay in the log)."""

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = {404: f"path {request.url.path!r} does not exist; expected /v1/images, /healthz, /readyz or "
                        f"/metrics",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(error.status_code,
                                                                                            str(error.detail))
        return error_response(ApiError(error.status_code, "http_error", message, None, dict(error.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(422, "invalid_request", "the request is not valid", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        metrics.requests.labels("error").inc()
        return error_response(ApiError(500, "internal", "the server failed on this request; its log has the details"))


def _add_status_routes(app: FastAPI, batcher: Batcher, metrics: ServeMetrics) -> None:
    """``/healthz``, ``/readyz`` and ``/metrics``."""

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", summary="The engine is loaded and warmed up, and the server is not draining",
             responses={503: {"description": "Warming up or draining", "content": ERROR_CONTENT}})
    async def readyz() -> Response:
        if batcher.draining:
            return error_response(ApiError(503, "draining", "the server is draining before it exits", None,
                                           {"Retry-After": "5"}))
        if not batcher.ready:
            return error_response(ApiError(503, "warming_up", "the engine is warming up", None,
                                           {"Retry-After": "1"}))
        return JSONResponse({"status": "ready", "batching": batcher.config.mode,
                             "max_batch": batcher.config.max_batch, "queue_depth": batcher.queue_depth})

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


class ImagesRoute:
    """``POST /v1/images``: authenticate, parse, queue one job of ``n`` images, wait for it, answer PNG or JSON."""

    def __init__(self, pipeline: Pipeline, batcher: Batcher, limits: ServeLimits, metrics: ServeMetrics,
                 api_key: str | None):
        self.pipeline = pipeline
        self.batcher = batcher
        self.limits = limits
        self.metrics = metrics
        self.api_key = api_key
        self.model = request_model(limits)

    async def create_images(self, request: Request) -> Response:
        arrived = time.monotonic()
        with self.metrics.in_flight.track_inprogress():
            try:
                return await self._answer(request, arrived)
            except ApiError as error:
                self.metrics.requests.labels(_outcome(error)).inc()
                raise

    async def _answer(self, request: Request, arrived: float) -> Response:
        if self.api_key is not None:
            _check_api_key(request.headers.get("authorization", ""), self.api_key)
        raw = await request.body()
        parsed = parse_body(raw, request.headers.get("content-type", ""), self.limits, self.model)
        accepted = _accepts(request.headers.get("accept", "application/json"))
        png = "image/png" in accepted and not accepted & {"application/json", "application/*"}
        if png and parsed.n > 1:
            raise ApiError(406, "not_acceptable", f"n is {parsed.n} but the client accepts only image/png; expected "
                                                  f"n = 1 or Accept: application/json", "n")
        seed = secrets.randbelow(MAX_SEED - parsed.n + 1) if parsed.seed is None else parsed.seed
        seeds = [seed + index for index in range(parsed.n)]
        requests = self._generation_requests(parsed, seeds)

        loop = asyncio.get_running_loop()
        job = Job(requests=requests, deadline=arrived + self.limits.request_timeout_s, loop=loop,
                  future=loop.create_future(), enqueued_at=arrived)
        self._submit(job)
        result = await await_job(self.batcher, job, request, self.limits)
        total_s = time.monotonic() - arrived
        self.metrics.latency.observe(total_s)
        self.metrics.requests.labels("ok").inc()
        return await _images_response(parsed, seeds, result, total_s, png)

    def _generation_requests(self, parsed: BaseModel, seeds: list[int]) -> list[GenerationRequest]:
        """One request per seed, each checked by the pipeline (``ApiError`` 422 naming the field)."""
        requests = [GenerationRequest(prompt=parsed.prompt, negative_prompt=parsed.negative_prompt, seed=one_seed,
                                      steps=parsed.steps, guidance_scale=parsed.guidance_scale, eta=parsed.eta,
                                      height=parsed.height, width=parsed.width) for one_seed in seeds]
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
            what = "is warming up" if error.reason == "warming_up" else "is draining before it exits"
            raise ApiError(503, error.reason, f"the server {what}; expected a retry later", None,
                           {"Retry-After": "1" if error.reason == "warming_up" else "5"}) from None


async def _images_response(parsed: BaseModel, seeds: list[int], result: JobResult, total_s: float,
                           png: bool) -> Response:
    """The answer: PNG bytes of the one image (``png``), else JSON with every image as base64 PNG."""
    height, width = result.images[0].shape[:2]
    parameters = [{"prompt": parsed.prompt, "negative_prompt": parsed.negative_prompt, "seed": one_seed,
                   "steps": parsed.steps, "guidance_scale": parsed.guidance_scale, "eta": parsed.eta,
                   "height": height, "width": width, "sampler": "ddim"} for one_seed in seeds]
    pngs = await asyncio.to_thread(lambda: [png_bytes(image, settings)
                                            for image, settings in zip(result.images, parameters)])
    timings = {"queue_ms": round(result.queue_s * 1e3, 3), "compute_ms": round(result.compute_s * 1e3, 3),
               "total_ms": round(total_s * 1e3, 3)}
    if png:
        server_timing = ", ".join(f"{name[:-3]};dur={value}" for name, value in timings.items())
        return Response(pngs[0], media_type="image/png",
                        headers={"X-Seed": str(seeds[0]), "Server-Timing": server_timing})
    return JSONResponse({"images": [base64.b64encode(data).decode("ascii") for data in pngs], "seeds": seeds,
                         "width": width, "height": height, "timings": timings})


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
    if error is not None:
        raise ApiError(500, "internal", "the engine failed on this request; the server log has the details")
    return job.future.result()


def _timeout_error(limits: ServeLimits) -> ApiError:
    return ApiError(503, "timeout", f"the request did not finish within the server's {limits.request_timeout_s:g} s "
                                    f"limit; expected a retry when the server is less busy", None,
                    {"Retry-After": str(max(1, math.ceil(limits.request_timeout_s / 10)))})


def _outcome(error: ApiError) -> str:
    return {401: "unauthorized", 429: "queue_full", 499: "disconnected", 500: "error"}.get(
        error.status, {"warming_up": "not_ready", "draining": "draining", "timeout": "timeout"}.get(error.type,
                                                                                                 "invalid"))


def _check_api_key(authorization: str, api_key: str) -> None:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        given = "no API key" if not authorization else "a wrong API key"
        raise ApiError(401, "unauthorized", f"the request has {given}; expected the header Authorization: Bearer "
                                            f"<key>", "authorization", {"WWW-Authenticate": "Bearer"})


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body has been read, so receive() only reports a disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class BodyLimitMiddleware:
    """ASGI middleware: a request body over ``max_body_bytes`` gets 413 before the app reads any of it."""

    def __init__(self, app: Any, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_large = ApiError(413, "body_too_large", f"the body is over {self.max_body_bytes} bytes; expected at most "
                                                    f"{self.max_body_bytes}", "body")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await error_response(too_large)(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await error_response(too_large)(scope, receive, send)
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
