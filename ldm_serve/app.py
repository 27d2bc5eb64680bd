"""The FastAPI app of ``ldm-serve`` (``create_app``) and its OpenAPI schema.

Routes: ``POST /v1/images`` (text to image, or an edit of an init image, masked or not), ``POST
/v1/images/generations`` and ``POST /v1/images/edits`` (the same in the OpenAI images API's shapes, so that OpenAI's
clients work unchanged), each streamed as it goes with ``stream: true``
(``ldm_serve.events``), ``DELETE /v1/images/{id}`` (cancel one), ``GET /`` (a page to try it, ``page.html``),
``GET /healthz`` (the process answers), ``GET /readyz`` (engine warmed up and not draining), ``GET /metrics``
(Prometheus text format), ``GET /openapi.json`` and ``/docs`` (Swagger UI). The schema says what the server does:
each request body exactly as the server validates it, every answer a route can give, and the API key where one is
required. What a browser may do with the server (Host names, CORS, security headers) is ``ldm_serve.browser``'s.
"""

from __future__ import annotations

import asyncio
import html
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel

from ldm_runtime.pipeline import Pipeline
from ldm_runtime.schedulers import SAMPLER_NAMES
from ldm_serve.batcher import Batcher
from ldm_serve.browser import (LOOPBACK_HOSTS, HostCheckMiddleware, JsonCorsMiddleware, SecurityHeadersMiddleware,
                               cors_options, page_policy)
from ldm_serve.errors import (ERROR_CONTENT, ERROR_SCHEMA, OPENAI_ERROR_CONTENT, OPENAI_ERROR_SCHEMA,
                              OPENAI_EDITS_PATH, OPENAI_IMAGES_PATH, add_error_handlers)
from ldm_serve.metrics import ServeMetrics
from ldm_serve.middleware import (HEALTH_PATHS, PAGE_PATH, AmbiguousLengthMiddleware, ApiKeyMiddleware,
                                   BodyLimitMiddleware, ErrorSafetyMiddleware, HeadAsGetMiddleware)
from ldm_serve.request_schema import ServeLimits, body_limits, edit_form_schema
from ldm_serve.routes import REQUEST_ID, ImagesRoute, add_status_routes


def create_app(pipeline: Pipeline, batcher: Batcher, limits: ServeLimits, metrics: ServeMetrics,
               api_key: str | None = None, model_name: str = "model",
               allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS, cors_origins: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app over a started-or-not ``batcher``: the lifespan starts its worker and stops it at exit. It
    answers the Host names ``allowed_hosts`` (None: any) and shares its answers with ``cors_origins``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.drain()
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="ldm-serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  redirect_slashes=False,  # a path with a slash too many is a 404 naming it, not a redirect
                  description=f"Text-to-image and image editing with a latent diffusion model ({model_name}); "
                              f"{batcher.config.mode} batching of up to {batcher.config.max_batch} images.")
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=limits.max_body_bytes, path_limits=body_limits(limits))
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, on_refused=metrics.requests.labels("unauthorized").inc)
    if cors_origins:
        app.add_middleware(JsonCorsMiddleware, **cors_options(cors_origins))
    if allowed_hosts is not None:
        app.add_middleware(HostCheckMiddleware, allowed_hosts=allowed_hosts, open_paths=HEALTH_PATHS)
    app.add_middleware(ErrorSafetyMiddleware, on_error=metrics.requests.labels("error").inc)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(HeadAsGetMiddleware, paths=(PAGE_PATH, DOCS_PATH, "/openapi.json", *HEALTH_PATHS, "/metrics"))
    app.add_middleware(AmbiguousLengthMiddleware)
    add_error_handlers(app)
    route = app.state.images_route = ImagesRoute(pipeline, batcher, limits, metrics, cors_origins)
    app.post("/v1/images", summary="Generate images from a prompt",
             openapi_extra=images_openapi(route.model, limits))(route.create_images)
    app.post(OPENAI_IMAGES_PATH, summary="Generate images from a prompt, in the OpenAI images API's shapes",
             openapi_extra=openai_images_openapi(route.openai_model, limits))(route.create_openai_images)
    app.post(OPENAI_EDITS_PATH, summary="Edit an image (masked or not) from a prompt, in the OpenAI images API's "
                                        "shapes", openapi_extra=openai_edits_openapi(limits))(route.create_openai_edits)
    app.delete("/v1/images/{request_id}", summary="Cancel a queued or running request",
               openapi_extra=CANCEL_OPENAPI)(route.cancel_images)
    add_status_routes(app, batcher, metrics)
    page = page_with_samplers(limits.default_sampler)
    page_headers = {"Content-Security-Policy": page_policy(page)}

    @app.get(PAGE_PATH, include_in_schema=False)
    async def try_it_page() -> Response:
        return HTMLResponse(page, headers=page_headers)

    docs = get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - Swagger UI").body.decode()
    docs_headers = {"Content-Security-Policy": page_policy(docs, SWAGGER_UI_SOURCES)}

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui() -> Response:
        return HTMLResponse(docs, headers=docs_headers)

    exact_openapi(app, {"/v1/images": ("application/json", route.model.model_json_schema()),
                        OPENAI_IMAGES_PATH: ("application/json", route.openai_model.model_json_schema()),
                        OPENAI_EDITS_PATH: (FORM_MEDIA_TYPE, edit_form_schema(limits))}, bearer=api_key is not None)
    return app


DOCS_PATH = "/docs"
FORM_MEDIA_TYPE = "multipart/form-data"
SAMPLER_SELECT = '<select id="sampler"></select>'  # in page.html, filled in by page_with_samplers
# FastAPI's Swagger UI page loads its script, style and icon from these hosts; its style uses inline attributes
SWAGGER_UI_SOURCES = {"script-src": "https://cdn.jsdelivr.net",
                      "style-src": "https://cdn.jsdelivr.net 'unsafe-inline'",
                      "img-src": "https://cdn.jsdelivr.net https://fastapi.tiangolo.com"}
ANSWER_SCHEMA = {"type": "object", "properties": {
    "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64",
                                          "contentMediaType": "image/png"}},
    "seeds": {"type": "array", "items": {"type": "integer"}},
    "width": {"type": "integer"}, "height": {"type": "integer"},
    "timings": {"type": "object", "properties": {"queue_ms": {"type": "number"},
                                                 "compute_ms": {"type": "number"},
                                                 "total_ms": {"type": "number"}}}}}


def page_with_samplers(default_sampler: str) -> str:
    """``page.html`` with its sampler choice filled in: every one of ``SAMPLER_NAMES``, ``default_sampler`` (what a
    request that names none gets) selected. The options are markup, not script, so the page's CSP is unchanged."""
    page = resources.files("ldm_serve").joinpath("page.html").read_text(encoding="utf-8")
    assert page.count(SAMPLER_SELECT) == 1, "page.html has lost its sampler select"
    options = "".join(f'<option{" selected" if name == default_sampler else ""}>{html.escape(name)}</option>'
                      for name in SAMPLER_NAMES)
    return page.replace(SAMPLER_SELECT, f'<select id="sampler">{options}</select>')


def images_openapi(model: type[BaseModel], limits: ServeLimits) -> dict[str, Any]:
    """The OpenAPI entry of ``POST /v1/images``: the body's schema and every answer it can get."""
    return {
        "parameters": [REQUEST_ID_PARAMETER],
        "requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}},
        "responses": {
            "200": {"description": "JSON with base64 PNGs, seeds and timings; PNG bytes for n = 1 when the client "
                                   "accepts image/png and not JSON (seed in X-Seed, timings in Server-Timing); "
                                   "server-sent events with stream true (queued, progress, preview, then completed "
                                   "with the JSON answer, or error). The request's id is in X-Request-Id.",
                    "headers": {"X-Request-Id": REQUEST_ID_HEADER_SCHEMA},
                    "content": {"application/json": {"schema": ANSWER_SCHEMA},
                                "image/png": {"schema": {"type": "string", "format": "binary"}},
                                "text/event-stream": {"schema": OUR_EVENT_SCHEMA}}},
            "400": {"description": "Malformed JSON, or a Host header the server does not answer",
                    "content": ERROR_CONTENT},
            "401": {"description": "Missing or wrong API key", "content": ERROR_CONTENT},
            "406": {"description": "image/png only, for more than one image; a stream for a client that does not "
                                   "accept text/event-stream", "content": ERROR_CONTENT},
            "409": {"description": "Cancelled (DELETE /v1/images/{id}) before it finished, or X-Request-Id names a "
                                   "request in flight", "content": ERROR_CONTENT},
            "413": {"description": f"Body over {body_limits(limits)['/v1/images']} bytes",
                    "content": ERROR_CONTENT},
            "415": {"description": "No Content-Type: application/json", "content": ERROR_CONTENT},
            "422": {"description": "A field is invalid (named in error.field)", "content": ERROR_CONTENT},
            "429": {"description": "Queue full; see Retry-After", "content": ERROR_CONTENT},
            "503": {"description": "Warming up, draining, or timed out; see Retry-After", "content": ERROR_CONTENT},
        }}


OPENAI_ANSWER_SCHEMA = {"type": "object", "required": ["created", "data"], "properties": {
    "created": {"type": "integer"},
    "data": {"type": "array", "items": {"type": "object", "required": ["b64_json"], "properties": {
        "b64_json": {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png"},
        "seed": {"type": "integer"}}}},
    "size": {"type": "string"}, "output_format": {"type": "string"},
    "timings": ANSWER_SCHEMA["properties"]["timings"]}}


def event_schema(events: dict[str, dict]) -> dict:
    """The schema of one server-sent event of a stream (OpenAPI 3.1 has a ``text/event-stream`` schema describe
    each event): its name, and its data, JSON of the schema ``events`` gives for that name."""
    return {"oneOf": [{"type": "object", "required": ["event", "data"], "properties": {
        "event": {"const": name},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}}}
        for name, schema in events.items()]}


def _object(required: dict[str, dict], **optional: dict) -> dict:
    return {"type": "object", "required": list(required), "properties": {**required, **optional}}


COUNT = {"type": "integer", "minimum": 0}
ID = {"type": "string"}
PNG = {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png"}
OUR_EVENT_SCHEMA = event_schema({
    "queued": _object({"id": ID, "position": COUNT}),
    "progress": _object({"id": ID, "step": COUNT, "steps": COUNT}),
    "preview": _object({"id": ID, "image": COUNT, "index": COUNT, "step": COUNT, "steps": COUNT, "b64_png": PNG}),
    "completed": {**ANSWER_SCHEMA, "required": ["id", "images", "seeds", "width", "height", "timings"],
                  "properties": {"id": ID, **ANSWER_SCHEMA["properties"]}},
    "error": ERROR_SCHEMA})
OPENAI_IMAGE_EVENT = {"b64_json": PNG, "created_at": {"type": "integer"}, "size": {"type": "string"},
                      "output_format": {"const": "png"}, "background": {"type": "string"},
                      "quality": {"type": "string"}, "image_index": COUNT, "seed": {"type": "integer"}}
OPENAI_EVENT_SCHEMA = event_schema({
    "image_generation.partial_image": _object({"type": {"const": "image_generation.partial_image"},
                                               "partial_image_index": COUNT, **OPENAI_IMAGE_EVENT}),
    "image_generation.completed": _object({"type": {"const": "image_generation.completed"}, **OPENAI_IMAGE_EVENT},
                                          timings=ANSWER_SCHEMA["properties"]["timings"]),
    "error": _object({"type": {"const": "error"}, "error": OPENAI_ERROR_SCHEMA["properties"]["error"]})})
REQUEST_ID_HEADER_SCHEMA = {"description": "The request's id, for DELETE /v1/images/{id}",
                            "schema": {"type": "string"}}
REQUEST_ID_PARAMETER = {"name": "X-Request-Id", "in": "header", "required": False,
                        "description": "The request's id, for DELETE /v1/images/{id} (a request not streamed learns "
                                       "it only in its answer); the server makes one where absent",
                        "schema": {"type": "string", "pattern": f"^{REQUEST_ID.pattern}$"}}
CANCEL_OPENAPI = {"responses": {
    "200": {"description": "Cancelled: its images leave the batch at the next step; the request itself is answered "
                           "409 (a stream: an error event) with type cancelled",
            "content": {"application/json": {"schema": {"type": "object", "properties": {
                "id": {"type": "string"}, "status": {"const": "cancelled"}}}}}},
    "401": {"description": "Missing or wrong API key", "content": ERROR_CONTENT},
    "404": {"description": "No queued or running request has this id", "content": ERROR_CONTENT}}}


# the answers both OpenAI routes can give besides their own: refused (no key), cancelled, busy
OPENAI_REFUSED_ANSWERS = {
    "401": {"description": "Missing or wrong API key", "content": OPENAI_ERROR_CONTENT},
    "409": {"description": "Cancelled (DELETE /v1/images/{id}) before it finished, or X-Request-Id names a request "
                           "in flight", "content": OPENAI_ERROR_CONTENT},
}
OPENAI_BUSY_ANSWERS = {
    "429": {"description": "Queue full; see Retry-After", "content": OPENAI_ERROR_CONTENT},
    "503": {"description": "Warming up, draining, or timed out; see Retry-After", "content": OPENAI_ERROR_CONTENT},
}


def openai_images_openapi(model: type[BaseModel], limits: ServeLimits) -> dict[str, Any]:
    """The OpenAPI entry of ``POST /v1/images/generations``: the body's schema and every answer it can get, the
    errors in OpenAI's shape."""
    return {
        "parameters": [REQUEST_ID_PARAMETER],
        "requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}},
        "responses": {
            "200": {"description": "The images as base64 PNGs, each with its seed; the size and the timings. With "
                                   "stream true, OpenAI's server-sent events: image_generation.partial_image, then "
                                   "image_generation.completed for each image. The request's id is in "
                                   "X-Request-Id.",
                    "headers": {"X-Request-Id": REQUEST_ID_HEADER_SCHEMA},
                    "content": {"application/json": {"schema": OPENAI_ANSWER_SCHEMA},
                                "text/event-stream": {"schema": OPENAI_EVENT_SCHEMA}}},
            "400": {"description": "Malformed JSON, a Host header the server does not answer, or a field is invalid "
                                   "(named in error.param)",
                    "content": OPENAI_ERROR_CONTENT},
            **OPENAI_REFUSED_ANSWERS,
            "413": {"description": f"Body over {body_limits(limits)[OPENAI_IMAGES_PATH]} bytes",
                    "content": OPENAI_ERROR_CONTENT},
            "415": {"description": "No Content-Type: application/json", "content": OPENAI_ERROR_CONTENT},
            **OPENAI_BUSY_ANSWERS,
        }}


OPENAI_EDIT_EVENT_SCHEMA = event_schema({
    "image_edit.partial_image": _object({"type": {"const": "image_edit.partial_image"}, "partial_image_index": COUNT,
                                         **OPENAI_IMAGE_EVENT}),
    "image_edit.completed": _object({"type": {"const": "image_edit.completed"}, **OPENAI_IMAGE_EVENT},
                                    timings=ANSWER_SCHEMA["properties"]["timings"]),
    "error": _object({"type": {"const": "error"}, "error": OPENAI_ERROR_SCHEMA["properties"]["error"]})})


def openai_edits_openapi(limits: ServeLimits) -> dict[str, Any]:
    """The OpenAPI entry of ``POST /v1/images/edits``: the form's schema and every answer it can get, the errors
    in OpenAI's shape."""
    return {
        "parameters": [REQUEST_ID_PARAMETER],
        "requestBody": {"required": True, "content": {FORM_MEDIA_TYPE: {"schema": edit_form_schema(limits)}}},
        "responses": {
            "200": {"description": "The edited images as base64 PNGs, each with its seed; the size and the timings. "
                                   "With stream true, OpenAI's server-sent events: image_edit.partial_image, then "
                                   "image_edit.completed for each image. The request's id is in X-Request-Id.",
                    "headers": {"X-Request-Id": REQUEST_ID_HEADER_SCHEMA},
                    "content": {"application/json": {"schema": OPENAI_ANSWER_SCHEMA},
                                "text/event-stream": {"schema": OPENAI_EDIT_EVENT_SCHEMA}}},
            "400": {"description": "A malformed form, a Host header the server does not answer, or a field or file "
                                   "is invalid (named in error.param)", "content": OPENAI_ERROR_CONTENT},
            **OPENAI_REFUSED_ANSWERS,
            "403": {"description": "Sent by a page of another origin than the server's and --cors-origin's",
                    "content": OPENAI_ERROR_CONTENT},
            "413": {"description": f"Body over {body_limits(limits)[OPENAI_EDITS_PATH]} bytes",
                    "content": OPENAI_ERROR_CONTENT},
            "415": {"description": "No Content-Type: multipart/form-data", "content": OPENAI_ERROR_CONTENT},
            **OPENAI_BUSY_ANSWERS,
        }}


def exact_openapi(app: FastAPI, request_schemas: dict[str, tuple[str, dict]], bearer: bool) -> None:
    """Make ``app``'s OpenAPI schema say what the server does: each POST route's request body schema as pydantic
    wrote it (FastAPI's OpenAPI models turn integer bounds into floats, 2**63 - 1 into 9.223372036854776e+18, a
    seed the server refuses), and with ``bearer`` the API key as HTTP bearer on every route but the health probes,
    each of those routes documenting its 401."""
    make_schema = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = make_schema()
            for path, (media_type, request_schema) in request_schemas.items():
                schema["paths"][path]["post"]["requestBody"]["content"][media_type]["schema"] = request_schema
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
