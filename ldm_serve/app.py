"""The HTTP layer of ``ldm-serve``: the request schema, validation, auth, content negotiation and metrics.

Routes: ``POST /v1/images`` (text to image), ``POST /v1/images/generations`` (the same in the OpenAI images
API's shapes, so that OpenAI's clients work unchanged), ``GET /`` (a page to try it, ``page.html``),
``GET /healthz`` (the process answers), ``GET /readyz`` (engine warmed up and not draining), ``GET /metrics``
(Prometheus text format), ``GET /openapi.json`` and ``/docs``.

Every error is JSON, ``{"error": {"type": ..., "field": ..., "message": ...}}``, where ``message`` is one
sentence naming the bad value and what was expected; on ``/v1/images/generations`` it is OpenAI's shape,
``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``, with 400 where ``/v1/images`` says 422.
Nothing a client sends reaches a file path or picks an engine; no response ever carries a traceback or a path
(unexpected errors go to the server's log only, and even they leave the keep-alive connection usable).

With an API key, every route but the page and the health probes needs ``Authorization: Bearer <key>``: inference,
and the metadata and statistics (``/openapi.json``, ``/docs``, ``/metrics``), as Triton Inference Server can
restrict its inference, metadata and statistics APIs with ``--http-restricted-api``; ``/healthz`` and ``/readyz``
stay open for orchestrators' probes, which carry no credentials (Triton's health and Ray Serve's ``/-/healthz``
likewise), and so does the page, which holds no data (a browser cannot send the header when it opens it; the page
has a field for the key and sends it with its own requests).
The key is compared byte for byte with the header's value, both as UTF-8 (header values are bytes: decoding them
one way and encoding the key another made a non-ASCII key unmatchable).


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
import logging
import math
import re
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from typing import Any, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from ldm_runtime.errors import RequestError
from ldm_runtime.images import png_bytes
from ldm_runtime.noise import MAX_SEED
from ldm_runtime.pipeline import DEFAULT_STEPS, GenerationRequest, Pipeline
from ldm_serve.batcher import Batcher, Job, JobResult, JobTimeout, NotAccepting, QueueFull

MAX_GUIDANCE_SCALE = 100.0
DEFAULT_PROMPT_CHARS = 1000
MAX_NESTING = 16  # arrays or objects in a field's value: a valid request has none; past this, only the depth is shown
# Characters that do not make a prompt: Python's str.isspace() and ECMA-262's \s together, spelled out so that the
# schema's "pattern" (ECMA-262) and the server (Python re) mean the same characters.
BLANK_CHARACTERS = (r"\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
                    r"\ufeff")
NOT_BLANK_PATTERN = f"[^{BLANK_CHARACTERS}]"
HEALTH_PATHS = ("/healthz", "/readyz")
PAGE_PATH = "/"
OPEN_PATHS = (PAGE_PATH, *HEALTH_PATHS)  # what needs no API key
OPENAI_IMAGES_PATH = "/v1/images/generations"
logger = logging.getLogger("uvicorn.error")
ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["type", "field", "message"],
    "properties": {"type": {"type": "string"}, "field": {"type": ["string", "null"]}, "message": {"type": "string"}}}}}
OPENAI_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
                   "code": {"type": ["string", "null"]}}}}}
OUTCOMES = ("ok", "invalid", "unauthorized", "queue_full", "not_ready", "draining", "timeout", "disconnected",
            "error")
STUCK_STEP_GRACE_S = 1.0  # the worker drops an expired job at its next step boundary; this covers a stuck step


def largest_request_bytes(max_prompt_chars: int) -> int:
    """The bytes of the longest valid ``POST /v1/images`` body, so that the default body limit refuses none: both
    prompts at 12 bytes a character (an escaped surrogate pair, as JSON encoders write astral characters), and
    1 KiB for the other fields."""
    return 2 * 12 * max_prompt_chars + 1024


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; ``ldm-serve``'s flags set them (the engine's range bounds the sizes)."""

    max_n: int = 4
    max_steps: int = 50
    max_prompt_chars: int = DEFAULT_PROMPT_CHARS
    max_body_bytes: int = largest_request_bytes(DEFAULT_PROMPT_CHARS)
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
                           json_schema_extra={"pattern": NOT_BLANK_PATTERN},  # checked in parse_body
                           description="What to draw, not only spaces. Longer than the model's token limit is "
                                       "truncated.")),
        negative_prompt=(str, Field(defaults["negative_prompt"], max_length=limits.max_prompt_chars,
                                    description="What to steer away from; empty for none.")),
        n=(int, Field(1, ge=1, le=limits.max_n, description="Number of images; image i uses seed + i (mod 2**63).")),
        steps=(int, Field(limits.default_steps, ge=1, le=limits.max_steps, description="DDIM steps.")),
        guidance_scale=(float, Field(defaults["guidance_scale"], ge=0, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False,
                                     description="Classifier-free guidance scale; 1 means no guidance.")),
        eta=(float, Field(defaults["eta"], ge=0, le=1, allow_inf_nan=False,
                          description="DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like.")),
        seed=(int | None, Field(None, ge=0, le=MAX_SEED - 1,
                                description="Seed of the first image; image i uses (seed + i) mod 2**63; null "
                                            "picks one (returned in the answer). The same request and seed give "
                                            "the same image whatever else runs.")),
        height=(int | None, Field(None, **size, description=size_text.format("height"))),
        width=(int | None, Field(None, **size, description=size_text.format("width"))),
    )


def image_sizes(limits: ServeLimits) -> list[str]:
    """Every "WxH" the server makes, as OpenAI's ``size`` spells it (width first)."""
    sides = [side for side in range(limits.min_size, limits.max_size + 1) if side % limits.size_multiple == 0]
    return [f"{width}x{height}" for width in sides for height in sides]


@functools.lru_cache(maxsize=8)
def openai_request_model(limits: ServeLimits) -> type[BaseModel]:
    """The pydantic model of a ``POST /v1/images/generations`` body: OpenAI's fields (``model`` and ``user`` are
    taken and not used; ``response_format`` can only be ``b64_json``, as the server keeps no images to link to)
    and ours (``negative_prompt``, ``steps``, ``guidance_scale``, ``eta``, ``seed``), under the same limits as
    ``request_model``."""
    ours = request_model(limits).model_fields
    sizes = image_sizes(limits)
    default_size = f"{limits.default_size}x{limits.default_size}"
    return create_model(
        "OpenAIImageRequest",
        __config__=ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"prompt": "a red circle on a blue background",
                                                               "size": default_size, "seed": 7}]}),
        prompt=(str, ours["prompt"]),
        n=(int, ours["n"]),
        size=(Literal[tuple(sizes)] | None, Field(None, description=f'Image size "WxH" in pixels, width first; '
                                                                     f'null for the model\'s "{default_size}".')),
        response_format=(Literal["b64_json"] | None, Field(None, description='"b64_json" (or null, the same): the '
                                                                             'images as base64 PNGs in the answer. '
                                                                             'The server keeps no images, so it '
                                                                             'cannot answer with a "url".')),
        model=(str | None, Field(None, max_length=256, description="Taken and not used: the server serves one "
                                                                   "model.")),
        user=(str | None, Field(None, max_length=256, description="Taken and not used.")),
        **{name: (ours[name].annotation, ours[name]) for name in ("negative_prompt", "steps", "guidance_scale",
                                                                  "eta", "seed")},
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
        "size": f'"WxH" with each side a multiple of {limits.size_multiple} from {limits.min_size} to '
                f'{limits.max_size} (such as "{limits.default_size}x{limits.default_size}"), or null',
        "response_format": '"b64_json" or null (the server keeps no images, so it cannot answer with a "url")',
        "model": "a string of at most 256 characters, or null (the server serves one model)",
        "user": "a string of at most 256 characters, or null",
    }.get(field, "")


class ApiError(Exception):
    """An error answered as JSON: ``status``, a ``type`` word, the ``field`` at fault (or None), one sentence."""

    def __init__(self, status: int, type_: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field, self.headers = status, type_, message, field, headers


def error_status(error: ApiError, path: str | None = None) -> int:
    """The HTTP status of ``error`` on ``path``: OpenAI's API answers 400 where ours answers 422."""
    return 400 if path == OPENAI_IMAGES_PATH and error.status == 422 else error.status


def error_body(error: ApiError, path: str | None = None) -> bytes:
    r"""The JSON body of ``error`` on ``path`` in UTF-8, whatever the client put into its message (a lone surrogate
    is shown as ``\ud800``): OpenAI's error shape on ``OPENAI_IMAGES_PATH``, with our ``type`` word as its
    ``code``, and ours everywhere else."""
    field = None if error.field is None else printable(error.field)
    if path == OPENAI_IMAGES_PATH:
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


def _shortened(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


def _shown(value: Any) -> str:
    """A client's value as JSON (numbers as the client wrote them), shortened to 60 characters."""
    if isinstance(value, Decimal):
        text = str(value)
    else:
        text = json.dumps(value, ensure_ascii=False, allow_nan=True,
                          default=lambda item: str(item) if isinstance(item, Decimal) else repr(item))
    return _shortened(printable(text))


def validation_error(error: ValidationError, body: Any, limits: ServeLimits, model: type[BaseModel]) -> ApiError:
    """The first pydantic error of ``model`` as one sentence naming the field."""
    first = error.errors()[0]
    location = [str(part) for part in first["loc"]]
    if not location:
        return ApiError(422, "invalid_request", f"the body is {_shown(body)}; expected a JSON object", "body")
    field = location[0]
    if first["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields)
        return ApiError(422, "invalid_request", f"{_shortened(field)} is not a field of this request; expected some "
                                                f"of {known}", field)
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


def json_number(number: Decimal) -> int | float | Decimal:
    """A JSON number as Python sees it: a whole number is an int whatever its spelling (2, 2.0, 2e0), as JSON
    Schema's "integer" says; any other a float; one that no float holds (1e400) stays a Decimal, which every
    field refuses, showing it as the client wrote it."""
    if number.is_finite() and number.adjusted() < 64 and number == number.to_integral_value():
        return int(number)
    as_float = float(number)
    return as_float if math.isfinite(as_float) else number


def _plain(value: Any) -> Any:
    """``value`` with its JSON numbers as ``json_number`` makes them (``value`` nests at most MAX_NESTING deep)."""
    if isinstance(value, Decimal):
        return json_number(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _nesting(value: Any) -> int:
    """How many arrays or objects deep ``value`` goes (0 for a string, number, bool or null), without recursion."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_body(raw: bytes, content_type: str, limits: ServeLimits, model: type[BaseModel]) -> BaseModel:
    """The request body as a validated model; ``ApiError`` naming the field otherwise, whatever the bytes."""
    media_type = content_type.split(";")[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type",
                       f"content type {_shown(media_type)} is not supported; expected application/json",
                       "content-type")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, "malformed_json", f"the body is not UTF-8 (byte {error.start}); expected a JSON object "
                                              f"in UTF-8", "body") from None
    try:
        body = json.loads(text, parse_float=Decimal, parse_int=Decimal, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "malformed_json", "the body nests arrays or objects too deeply to read; expected a JSON "
                                              "object of strings, numbers and null", "body") from None
    except json.JSONDecodeError as error:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON (at line {error.lineno} column "
                                              f"{error.colno}); expected a JSON object", "body") from None
    except ValueError as error:  # NaN, Infinity
        raise ApiError(400, "malformed_json", f"the body is not valid JSON ({error}); expected a JSON object",
                       "body") from None
    if not isinstance(body, dict):
        depth = _nesting(body)
        shown = f"an array nested {depth} deep" if depth > MAX_NESTING else _shown(_plain(body))
        raise ApiError(422, "invalid_request", f"the body is {shown}; expected a JSON object", "body")
    fields = {}
    for key, value in body.items():
        if printable(key) != key:
            known = ", ".join(model.model_fields)
            raise ApiError(422, "invalid_request", f"the field name {_shown(key)} is not valid Unicode (it holds a "
                                                   f"lone surrogate); expected some of {known}", key)
        if isinstance(value, str) and printable(value) != value:
            raise ApiError(422, "invalid_request", f"{key} is {_shown(value)}, which is not valid Unicode (it holds a "
                                                   f"lone surrogate); expected {expected_text(key, limits)}", key)
        depth = _nesting(value)
        if depth > MAX_NESTING:
            raise ApiError(422, "invalid_request", f"{_shortened(key)} is an array or object nested {depth} deep; "
                                                   f"expected {expected_text(key, limits) or 'no such field'}", key)
        fields[key] = _plain(value)
    try:
        parsed = model.model_validate(fields)
    except ValidationError as error:
        raise validation_error(error, fields, limits, model) from None
    if not re.search(NOT_BLANK_PATTERN, parsed.prompt):
        raise ApiError(422, "invalid_request", f"prompt is {_shown(parsed.prompt)}; expected "
                                               f"{expected_text('prompt', limits)} (not only spaces)", "prompt")
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
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, on_refused=metrics.requests.labels("unauthorized").inc)
    app.add_middleware(ErrorSafetyMiddleware, on_error=metrics.requests.labels("error").inc)
    _add_error_handlers(app, metrics)
    route = ImagesRoute(pipeline, batcher, limits, metrics)
    app.post("/v1/images", summary="Generate images from a prompt",
             openapi_extra=images_openapi(route.model, limits))(route.create_images)
    app.post(OPENAI_IMAGES_PATH, summary="Generate images from a prompt, in the OpenAI images API's shapes",
             openapi_extra=openai_images_openapi(route.openai_model, limits))(route.create_openai_images)
    _add_status_routes(app, batcher, metrics)
    page = resources.files("ldm_serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get(PAGE_PATH, include_in_schema=False)
    async def try_it_page() -> Response:
        return HTMLResponse(page)

    exact_openapi(app, {"/v1/images": route.model.model_json_schema(),
                        OPENAI_IMAGES_PATH: route.openai_model.model_json_schema()}, bearer=api_key is not None)
    return app


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


OPENAI_ERROR_CONTENT = {"application/json": {"schema": OPENAI_ERROR_SCHEMA}}
OPENAI_ANSWER_SCHEMA = {"type": "object", "required": ["created", "data"], "properties": {
    "created": {"type": "integer"},
    "data": {"type": "array", "items": {"type": "object", "required": ["b64_json"], "properties": {
        "b64_json": {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png"},
        "seed": {"type": "integer"}}}},
    "size": {"type": "string"}, "output_format": {"type": "string"},
    "timings": ANSWER_SCHEMA["properties"]["timings"]}}


def openai_images_openapi(model: type[BaseModel], limits: ServeLimits) -> dict[str, Any]:
    """The OpenAPI entry of ``POST /v1/images/generations``: the body's schema and every answer it can get, the
    errors in OpenAI's shape."""
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}},
        "responses": {
            "200": {"description": "The images as base64 PNGs, each with its seed; the size and the timings",
                    "content": {"application/json": {"schema": OPENAI_ANSWER_SCHEMA}}},
            "400": {"description": "Malformed JSON, or a field is invalid (named in error.param)",
                    "content": OPENAI_ERROR_CONTENT},
            "401": {"description": "Missing or wrong API key", "content": OPENAI_ERROR_CONTENT},
            "413": {"description": f"Body over {limits.max_body_bytes} bytes", "content": OPENAI_ERROR_CONTENT},
            "415": {"description": "Body not JSON", "content": OPENAI_ERROR_CONTENT},
            "429": {"description": "Queue full; see Retry-After", "content": OPENAI_ERROR_CONTENT},
            "503": {"description": "Warming up, draining, or timed out; see Retry-After",
                    "content": OPENAI_ERROR_CONTENT},
        }}


def _add_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    """Every error as the JSON error object: ours, Starlette's (404, 405) and FastAPI's validation; the unexpected
    ones (500, counted; the details stay in the log) are ``ErrorSafetyMiddleware``'s."""

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> Response:
        return error_response(error, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> Response:
        message = {404: f"path {_shown(request.url.path)} does not exist; expected /v1/images, "
                        f"{OPENAI_IMAGES_PATH}, /, /healthz, /readyz or /metrics",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(error.status_code,
                                                                                            str(error.detail))
        return error_response(ApiError(error.status_code, "http_error", message, None, dict(error.headers or {})),
                              request.url.path)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> Response:
        return error_response(ApiError(422, "invalid_request", "the request is not valid", None), request.url.path)



def readiness(batcher: Batcher) -> ApiError | None:
    """Why the server cannot take requests now (draining, warming up, its worker thread gone), or None when it can:
    what ``/readyz`` answers, and what Ray Serve's health check of a replica asks (``serve.replicas``)."""
    if batcher.draining:
        return ApiError(503, "draining", "the server is draining before it exits", None, {"Retry-After": "5"})
    if not batcher.alive:
        return ApiError(503, "worker_stopped", "the engine's worker thread has stopped", None, {"Retry-After": "5"})
    if not batcher.ready:
        return ApiError(503, "warming_up", "the engine is warming up", None, {"Retry-After": "1"})
    return None


def _add_status_routes(app: FastAPI, batcher: Batcher, metrics: ServeMetrics) -> None:
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
        pngs = await _encode_pngs(parsed, seeds, result)
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
        pngs = await _encode_pngs(parsed, seeds, result)
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

    def _generation_requests(self, parsed: BaseModel, seeds: list[int], height: int | None,
                             width: int | None) -> list[GenerationRequest]:
        """One request per seed, each checked by the pipeline (``ApiError`` 422 naming the field)."""
        requests = [GenerationRequest(prompt=parsed.prompt, negative_prompt=parsed.negative_prompt, seed=one_seed,
                                      steps=parsed.steps, guidance_scale=parsed.guidance_scale, eta=parsed.eta,
                                      height=height, width=width) for one_seed in seeds]
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


async def _encode_pngs(parsed: BaseModel, seeds: list[int], result: JobResult) -> list[bytes]:
    """The images as PNG bytes, each with its generation parameters in a text chunk."""
    height, width = result.images[0].shape[:2]
    parameters = [{"prompt": parsed.prompt, "negative_prompt": parsed.negative_prompt, "seed": one_seed,
                   "steps": parsed.steps, "guidance_scale": parsed.guidance_scale, "eta": parsed.eta,
                   "height": height, "width": width, "sampler": "ddim"} for one_seed in seeds]
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
            await error_response(too_large, scope["path"])(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
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


def exact_openapi(app: FastAPI, request_schemas: dict[str, dict], bearer: bool) -> None:
    """Make ``app``'s OpenAPI schema say what the server does: each POST route's request body schema as pydantic
    wrote it (FastAPI's OpenAPI models turn integer bounds into floats, 2**63 - 1 into 9.223372036854776e+18, a
    seed the server refuses), and with ``bearer`` the API key as HTTP bearer on every route but the health probes,
    each of those routes documenting its 401."""
    make_schema = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = make_schema()
            for path, request_schema in request_schemas.items():
                schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"] = request_schema
            if bearer:
                schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                    "type": "http", "scheme": "bearer", "description": "The API key ldm-serve was started with."}
                for path, operations in schema["paths"].items():
                    for operation in operations.values():
                        operation["security"] = [] if path in HEALTH_PATHS else [{"bearer": []}]
                        if path not in HEALTH_PATHS:
                            operation["responses"].setdefault("401", {
                                "description": "Missing or wrong API key",
                                "content": {"application/json": {"schema": ERROR_SCHEMA}}})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


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
        given = "no API key" if not values else "a wrong API key"
        refused = ApiError(401, "unauthorized", f"the request has {given}; expected the header Authorization: Bearer "
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
