"""The body of an image request: its pydantic schema under the server's limits (``ServeLimits``), for ours
(``request_model``) and OpenAI's (``openai_request_model``, ``openai_edit_model``), and ``parse_body``, which reads
any bytes into one or raises an ``ApiError`` whose one sentence names the field, the bad value and what was expected.
Each route's largest body (``body_limits``) admits its longest valid request, images included, and no more.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from ldm_runtime.adapters import MAX_REQUEST_ADAPTERS
from ldm_runtime.config import (
    ADAPTER_SCALES, CACHE_SCHEDULES, DEFAULT_GUIDANCE_SCALE, ETA_SAMPLERS, MAX_CACHE_INTERVAL, MAX_GUIDANCE_SCALE,
)
from ldm_runtime.images import MAX_UPLOAD_BYTES, UPLOAD_FORMAT_NAMES
from ldm_runtime.noise import MAX_SEED
from ldm_runtime.pipeline import DEFAULT_SAMPLER, DEFAULT_STEPS, GenerationRequest
from ldm_runtime.schedulers import SAMPLER_NAMES
from ldm_serve.errors import OPENAI_EDITS_PATH, OPENAI_IMAGES_PATH, ApiError, printable, shortened, shown_value

DEFAULT_PROMPT_CHARS = 1000
MAX_OPENAI_NAME_CHARS = 256  # OpenAI's limit on model and user
MAX_NESTING = 16  # arrays or objects in a field's value: a valid request has none; past this, only the depth is shown
MAX_PARTIAL_IMAGES = 3  # OpenAI's limit on partial_images
# Characters that do not make a prompt: Python's str.isspace() and ECMA-262's \s together, spelled out so that the
# schema's "pattern" (ECMA-262) and the server (Python re) mean the same characters.
BLANK_CHARACTERS = (r"\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
                    r"\ufeff")
NOT_BLANK_PATTERN = f"[^{BLANK_CHARACTERS}]"
REQUEST_DEFAULTS = {field.name: field.default for field in dataclasses.fields(GenerationRequest)}
UPLOAD_METADATA_BYTES = 64 * 2**10  # an upload's PNG framing, zlib blocks and metadata (EXIF, ICC profile)
IMAGE_FIELDS = ("init_image", "mask")  # our JSON's base64 images
# strict base64 (RFC 4648, padded, no line breaks), as base64.b64decode(validate=True) reads it; the same in
# ECMA-262 and Python re
BASE64_PATTERN = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
MAX_FORM_PARTS = 40  # a multipart edit request's parts: every field once, arrays as repeated parts, two files
FORM_PART_HEADER_BYTES = 512  # a multipart part's boundary line and headers (its name, a file's name and type)


def largest_request_bytes(max_prompt_chars: int) -> int:
    """The bytes of the longest valid body without images, so that the default body limit refuses none: both
    prompts and OpenAI's ``model`` and ``user`` at 12 bytes a character (an escaped surrogate pair, as JSON
    encoders write astral characters), and 2 KiB for the other fields (adapters' names among them)."""
    return 12 * (2 * max_prompt_chars + 2 * MAX_OPENAI_NAME_CHARS) + 2048


def largest_upload_bytes(max_side: int) -> int:
    """The bytes of the largest image a request may hand in when images have at most ``max_side`` pixels a side:
    an uncompressed 16-bit RGBA PNG's rows at that size and ``UPLOAD_METADATA_BYTES`` (at most MAX_UPLOAD_BYTES)."""
    return min(MAX_UPLOAD_BYTES, max_side * (8 * max_side + 1) + UPLOAD_METADATA_BYTES)


def base64_chars(size: int) -> int:
    """The length of ``size`` bytes in padded base64."""
    return 4 * math.ceil(size / 3)


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
    default_sampler: str = DEFAULT_SAMPLER
    default_guidance_scale: float = DEFAULT_GUIDANCE_SCALE  # the model's default_sampler.guidance_scale, if set
    default_guidance_interval: tuple[float, float] | None = None  # None: guidance at every UNet call
    default_cache_interval: int = 1
    default_cache_schedule: str = CACHE_SCHEDULES[0]
    max_cache_interval: int = MAX_CACHE_INTERVAL  # 1 where the engine cannot cache the UNet's features
    max_upload_bytes: int = largest_upload_bytes(64)  # an init image or mask, as a file (base64 in JSON: 4/3 of it)
    adapter_names: tuple[str, ...] = ()  # the LoRA adapters a request may name (ldm-serve --lora)


def body_limits(limits: ServeLimits) -> dict[str, int]:
    """Each POST route's largest body in bytes: ``max_body_bytes`` for a request without images, and on the routes
    that take them, that and two images of ``max_upload_bytes`` (base64 in a JSON string on ``/v1/images``; raw
    bytes on ``/v1/images/edits``, with every multipart part's header)."""
    base64_images = 2 * (base64_chars(limits.max_upload_bytes) + 32)  # each with its name, quotes and comma
    form_images = 2 * limits.max_upload_bytes + MAX_FORM_PARTS * FORM_PART_HEADER_BYTES
    return {"/v1/images": limits.max_body_bytes + base64_images, OPENAI_IMAGES_PATH: limits.max_body_bytes,
            OPENAI_EDITS_PATH: limits.max_body_bytes + form_images}


@functools.lru_cache(maxsize=8)
def request_model(limits: ServeLimits) -> type[BaseModel]:
    """The pydantic model of a ``POST /v1/images`` body under ``limits``: strict types, unknown fields refused."""
    defaults = REQUEST_DEFAULTS
    size = dict(ge=limits.min_size, le=limits.max_size, multiple_of=limits.size_multiple)
    size_text = (f"Image {{}} in pixels: a multiple of {limits.size_multiple} from {limits.min_size} to "
                 f"{limits.max_size}; null for the model's {limits.default_size}.")
    return create_model(
        "ImageRequest",
        __config__=ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"prompt": "a red circle on a blue background",
                                                               "seed": 7, "steps": 25}],
                                                 "allOf": [eta_only_for_eta_samplers(limits.default_sampler),
                                                           only_when_streamed("previews"),
                                                           only_with_init_image("mask", "string"),
                                                           only_with_init_image("strength", "number")]}),
        prompt=(str, Field(min_length=1, max_length=limits.max_prompt_chars,
                           json_schema_extra={"pattern": NOT_BLANK_PATTERN},  # checked in parse_body
                           description="What to draw, not only spaces. Longer than the model's token limit is "
                                       "truncated.")),
        negative_prompt=(str, Field(defaults["negative_prompt"], max_length=limits.max_prompt_chars,
                                    description="What to steer away from; empty for none.")),
        n=(int, Field(1, ge=1, le=limits.max_n, description="Number of images; image i uses seed + i (mod 2**63).")),
        sampler=(Literal[SAMPLER_NAMES], Field(limits.default_sampler,
                                               description="The sampler: ddim (with the model's own DDIM settings) "
                                                           "or another; only ddim and tcd take an eta other than "
                                                           "0.")),
        steps=(int, Field(limits.default_steps, ge=1, le=limits.max_steps,
                          description="Sampler steps; the default is the default sampler's, and a request that names "
                                      "another sampler and no steps gets that sampler's default.")),
        guidance_scale=(float, Field(limits.default_guidance_scale, ge=0, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False,
                                     description="Classifier-free guidance scale; 1 means no guidance (one UNet "
                                                 "row per image).")),
        guidance_interval=(Annotated[list[Annotated[float, Field(ge=0, allow_inf_nan=False)]],
                                     Field(min_length=2, max_length=2)] | None,
                           Field(_interval_json(limits.default_guidance_interval),
                                 description=f"[low, high] with 0 <= low < high: guidance only at the UNet calls "
                                             f"whose noise level sigma lies in (low, high], the conditional branch "
                                             f"alone at the others; null for the server's default, "
                                             f"{_interval_text(limits.default_guidance_interval)}.")),
        cache_interval=(int, Field(limits.default_cache_interval, ge=1, le=limits.max_cache_interval,
                                   description="N: the whole UNet at one step in N and, at the steps between, "
                                               "only its shallow part on the deep features kept from the last "
                                               "whole step (DeepCache); 1: the whole UNet at every step."
                                               + ("" if limits.max_cache_interval > 1 else
                                                  " Only 1 here: this server's engine cannot cache them."))),
        cache_schedule=(Literal[CACHE_SCHEDULES], Field(limits.default_cache_schedule,
                                                        description="Which steps run the whole UNet when "
                                                                    "cache_interval > 1: uniform spaces them evenly, "
                                                                    "quadratic packs them around a step part-way "
                                                                    "in.")),
        eta=(float, Field(defaults["eta"], ge=0, le=1, allow_inf_nan=False,
                          description="DDIM eta (0 is deterministic DDIM, 1 is DDPM-like) or TCD's gamma (0 is "
                                      "deterministic, 1 is LCM's walk; its authors sample with 0.3); 0 with any "
                                      "other sampler.")),
        seed=(int | None, Field(None, ge=0, le=MAX_SEED - 1,
                                description="Seed of the first image; image i uses (seed + i) mod 2**63; null "
                                            "picks one (returned in the answer). The same request and seed give "
                                            "the same image whatever else runs.")),
        height=(int | None, Field(None, **size, description=size_text.format("height"))),
        width=(int | None, Field(None, **size, description=size_text.format("width"))),
        stream=(bool, Field(False, description="true: the answer is server-sent events as the request goes: queued "
                                               "(its id, then its place in the queue), progress (each step), "
                                               "preview (with previews), then completed (the JSON answer) or "
                                               "error. DELETE /v1/images/{id} cancels it.")),
        previews=(int, Field(0, ge=0, le=limits.max_steps,
                             description="With stream: previews of each image while it is made, spread evenly over "
                                         "its steps (at most one a step, none after the last).")),
        init_image=(str | None, Field(None, max_length=base64_chars(limits.max_upload_bytes),
                                      json_schema_extra=base64_image_schema(),
                                      description=f"An image to edit: {UPLOAD_FORMAT_NAMES} of at most "
                                                  f"{limits.max_upload_bytes} bytes as base64 (no data: prefix), "
                                                  f"its sides what width and height take; the answer has its size "
                                                  f"(width and height: null or the same). Image to image (SDEdit) "
                                                  f"at strength, or inpainting with a mask.")),
        mask=(str | None, Field(None, max_length=base64_chars(limits.max_upload_bytes),
                                json_schema_extra=base64_image_schema(),
                                description="With init_image: where to repaint, an image of its size as base64, "
                                            "white (grey level 128 and up) repainted, the rest kept pixel for "
                                            "pixel.")),
        strength=(float | None, Field(None, ge=0, le=1, allow_inf_nan=False,
                                      description="With init_image: how much of it to redraw, from 0 (its "
                                                  "autoencoder reconstruction) to 1 (from pure noise); the last "
                                                  "int(steps * strength) steps run. null: the model's default "
                                                  "(another with a mask).")),
        lora=lora_field(limits),
    )


def most_adapters(limits: ServeLimits) -> int:
    """How many adapters one request may name: ``MAX_REQUEST_ADAPTERS``, at most those loaded."""
    return min(MAX_REQUEST_ADAPTERS, len(limits.adapter_names))


def lora_field(limits: ServeLimits) -> tuple[Any, Any]:
    """The ``lora`` field: a list of {"name": a loaded adapter, "scale": a number in ``ADAPTER_SCALES``, 1 when
    absent}. The schema states the items; ``validated`` checks their shape and the pipeline their names, scales and
    repeats (JSON Schema cannot say that no two items share a name)."""
    low, high = ADAPTER_SCALES
    names = limits.adapter_names
    item = {"type": "object", "additionalProperties": False, "required": ["name"],
            "properties": {"name": {"enum": list(names)} if names else {"type": "string"},
                           "scale": {"type": "number", "minimum": low, "maximum": high, "default": 1.0}}}
    served = (f"the adapters this server loaded ({', '.join(names)})" if names else
              "none here: this server loaded no adapters (ldm-serve --lora NAME=FILE loads them)")
    return (list[dict[str, Any]],
            Field(default_factory=list, max_length=most_adapters(limits),
                  json_schema_extra={"default": [], "items": item, "uniqueItems": True},
                  description=f"LoRA adapters to apply to this request's images, each once: [{{\"name\": adapter, "
                              f"\"scale\": number from {low:g} to {high:g}, 1 when absent}}], at most "
                              f"{MAX_REQUEST_ADAPTERS}; the names are {served}. Requests with different adapters, "
                              f"or none, share the batch."))


def lora_of(parsed: BaseModel) -> tuple[tuple[str, float], ...]:
    """A validated request's ``lora`` as ``GenerationRequest.lora``: (name, scale) pairs."""
    return tuple((item["name"], float(item.get("scale", 1.0))) for item in getattr(parsed, "lora", []))


def _lora_from_form(value: Any) -> Any:
    """A form's ``lora``: one part of a JSON array, or a part per adapter of a JSON object (``_form_values`` leaves
    JSON objects and arrays of them as text), read into the list the field validates; anything else as it is."""
    def read(text: Any) -> Any:
        if not isinstance(text, str):
            return text
        try:
            return _plain(read_json(text))
        except (ValueError, RecursionError):
            return text

    value = read(value)
    if isinstance(value, dict):
        return [value]
    return [read(item) for item in value] if isinstance(value, list) else value


def only_when_streamed(field: str) -> dict[str, Any]:
    """The JSON Schema rule "``field`` above 0 needs stream true" (``parse_body`` enforces it)."""
    return {"if": {"properties": {field: {"exclusiveMinimum": 0}}, "required": [field]},
            "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]}}


def only_with_init_image(field: str, json_type: str) -> dict[str, Any]:
    """The JSON Schema rule "``field``, unless null, needs an init_image" (the route enforces it)."""
    return {"if": {"properties": {field: {"type": json_type}}, "required": [field]},
            "then": {"properties": {"init_image": {"type": "string"}}, "required": ["init_image"]}}


def base64_image_schema() -> dict[str, Any]:
    """What the schema says of a base64 image field beyond its length (the route decodes it)."""
    return {"pattern": BASE64_PATTERN, "contentEncoding": "base64"}


def _interval_json(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [float(end) for end in interval]


def _interval_text(interval: tuple[float, float] | None) -> str:
    """A guidance interval as a request's error or description shows it."""
    return "guidance at every UNet call" if interval is None else f"[{float(interval[0])!r}, {float(interval[1])!r}]"


def eta_only_for_eta_samplers(default_sampler: str) -> dict[str, Any]:
    """The JSON Schema rule "eta is 0 unless the sampler is one of ``ETA_SAMPLERS``", where a body without
    ``sampler`` gets ``default_sampler`` (``Pipeline.validate`` enforces it; the schema says it, so that schema-valid
    bodies pass)."""
    others = [name for name in SAMPLER_NAMES if name not in ETA_SAMPLERS]
    sampler_takes_no_eta: dict[str, Any] = {"properties": {"sampler": {"enum": others}}}
    if default_sampler in ETA_SAMPLERS:
        sampler_takes_no_eta["required"] = ["sampler"]
    return {"if": sampler_takes_no_eta, "then": {"properties": {"eta": {"const": 0}}}}


def image_sizes(limits: ServeLimits) -> list[str]:
    """Every "WxH" the server makes, as OpenAI's ``size`` spells it (width first)."""
    sides = [side for side in range(limits.min_size, limits.max_size + 1) if side % limits.size_multiple == 0]
    return [f"{width}x{height}" for width in sides for height in sides]


@functools.lru_cache(maxsize=8)
def openai_request_model(limits: ServeLimits) -> type[BaseModel]:
    """The pydantic model of a ``POST /v1/images/generations`` body: OpenAI's fields (``model`` and ``user`` are
    taken and not used; ``response_format`` can only be ``b64_json``, as the server keeps no images to link to)
    and ours (``negative_prompt``, ``sampler``, ``steps``, ``guidance_scale``, ``guidance_interval``,
    ``cache_interval``, ``cache_schedule``, ``eta``, ``seed``), under the same limits as ``request_model``;
    ``stream`` and ``partial_images`` as OpenAI's streaming of images."""
    ours = request_model(limits).model_fields
    sizes = image_sizes(limits)
    default_size = f"{limits.default_size}x{limits.default_size}"
    return create_model(
        "OpenAIImageRequest",
        __config__=ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"prompt": "a red circle on a blue background",
                                                               "size": default_size, "seed": 7}],
                                                 "allOf": [eta_only_for_eta_samplers(limits.default_sampler),
                                                           only_when_streamed("partial_images")]}),
        prompt=(str, ours["prompt"]),
        n=(int, ours["n"]),
        size=(Literal[tuple(sizes)] | None, Field(None, description=f'Image size "WxH" in pixels, width first; '
                                                                     f'null for the model\'s "{default_size}".')),
        response_format=(Literal["b64_json"] | None, Field(None, description='"b64_json" (or null, the same): the '
                                                                             'images as base64 PNGs in the answer. '
                                                                             'The server keeps no images, so it '
                                                                             'cannot answer with a "url".')),
        model=(str | None, Field(None, max_length=MAX_OPENAI_NAME_CHARS, description="Taken and not used: the "
                                                                                 "server serves one model.")),
        user=(str | None, Field(None, max_length=MAX_OPENAI_NAME_CHARS, description="Taken and not used.")),
        stream=(bool, Field(False, description="true: the answer is server-sent events in OpenAI's shape: "
                                               "image_generation.partial_image (with partial_images), then "
                                               "image_generation.completed for each image.")),
        partial_images=(int, Field(0, ge=0, le=MAX_PARTIAL_IMAGES,
                                   description=f"With stream: partial images of each image while it is made, 0 to "
                                               f"{MAX_PARTIAL_IMAGES}, spread evenly over its steps (fewer where it "
                                               f"has fewer steps).")),
        **{name: (ours[name].annotation, ours[name]) for name in ("negative_prompt", "sampler", "steps",
                                                                  "guidance_scale", "guidance_interval",
                                                                  "cache_interval", "cache_schedule", "eta",
                                                                  "seed", "lora")},
    )


@functools.lru_cache(maxsize=8)
def openai_edit_model(limits: ServeLimits) -> type[BaseModel]:
    """The pydantic model of a ``POST /v1/images/edits`` form's text fields: those of ``openai_request_model`` and
    ``strength``; its files (``image``, ``mask``) are read beside it (``ldm_serve.uploads``). A form's absent field
    is its default, so the text fields that JSON could make null take only strings here (``edit_form_schema``)."""
    generations = openai_request_model(limits).model_fields
    ours = request_model(limits).model_fields
    default_size = f"{limits.default_size}x{limits.default_size}"
    fields: dict[str, Any] = {name: (field.annotation, field) for name, field in generations.items()}
    fields["size"] = (Literal[tuple(image_sizes(limits))] | None,
                      Field(None, description=f'Image size "WxH" in pixels, width first: the image\'s own size, as '
                                              f'when it is absent. The image\'s sides are those of a "WxH" the '
                                              f'server makes (the model\'s default is "{default_size}").'))
    fields["stream"] = (bool, Field(False, description="true: the answer is server-sent events in OpenAI's shape: "
                                                       "image_edit.partial_image (with partial_images), then "
                                                       "image_edit.completed for each image."))
    fields["strength"] = (ours["strength"].annotation,
                          Field(None, ge=0, le=1, allow_inf_nan=False,
                                description="How much of the image to redraw, from 0 (its autoencoder "
                                            "reconstruction) to 1 (from pure noise); the last int(steps * "
                                            "strength) steps run. Absent: the model's default (another with a "
                                            "mask)."))
    return create_model(
        "OpenAIImageEditRequest",
        __config__=ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"allOf": [eta_only_for_eta_samplers(limits.default_sampler),
                                                           only_when_streamed("partial_images")]}),
        __validators__={"lora_from_form": field_validator("lora", mode="before")(_lora_from_form)},
        **fields)


FORM_TEXT_FIELDS = ("prompt", "negative_prompt", "sampler", "cache_schedule", "size", "response_format", "model",
                    "user")  # taken as the part's text; every other field's part is read as JSON (7, 0.5, true, null)
FORM_ARRAY_FIELDS = ("guidance_interval", "lora")  # an array: one part of JSON, or a part per item (name or name[])


def edit_form_schema(limits: ServeLimits) -> dict[str, Any]:
    """The JSON Schema of ``POST /v1/images/edits``' multipart form: ``openai_edit_model``'s, its text fields that
    JSON could make null only strings (a form leaves them out instead), and the files ``image`` and ``mask``."""
    schema = openai_edit_model(limits).model_json_schema()
    for name in FORM_TEXT_FIELDS:
        field = schema["properties"][name]
        if "anyOf" in field:
            branch = next(option for option in field.pop("anyOf") if option.get("type") != "null")
            field.pop("default", None)
            field.update(branch)
    image_bytes = f"{UPLOAD_FORMAT_NAMES} of at most {limits.max_upload_bytes} bytes"
    files = {
        "image": {"type": "string", "format": "binary",
                  "description": f"The image to edit, a file: {image_bytes}, each side a multiple of "
                                 f"{limits.size_multiple} from {limits.min_size} to {limits.max_size}."},
        "mask": {"type": "string", "format": "binary",
                 "description": f"Where to edit, a file: a PNG (or WebP) with an alpha channel, of the image's size "
                                f"and at most {limits.max_upload_bytes} bytes, whose fully transparent pixels (alpha "
                                f"0) are repainted, the rest kept pixel for pixel (OpenAI's convention). Absent: the "
                                f"whole image is redrawn at strength."}}
    schema["properties"]["lora"]["description"] += (" In the form: one part holding the JSON array, or a part per "
                                                    "adapter holding its JSON object.")
    schema["properties"] = {**files, **schema["properties"]}
    schema["required"] = ["image", *schema.get("required", [])]
    # the same two rules as the JSON routes', spelled without if/then: schemathesis cannot judge a conditional on a
    # form that holds files
    takes_eta: dict[str, Any] = {"properties": {"sampler": {"enum": list(ETA_SAMPLERS)}}}
    if limits.default_sampler not in ETA_SAMPLERS:
        takes_eta["required"] = ["sampler"]
    schema["allOf"] = [{"anyOf": [{"properties": {"eta": {"const": 0}}}, takes_eta]},
                       {"anyOf": [{"properties": {"partial_images": {"const": 0}}},
                                  {"properties": {"stream": {"const": True}}, "required": ["stream"]}]}]
    return schema


def expected_text(field: str, limits: ServeLimits) -> str:
    """What ``field`` must be, as the end of an error sentence."""
    sizes = f"a multiple of {limits.size_multiple} from {limits.min_size} to {limits.max_size}, or null"
    return {
        "prompt": f"a non-empty string of at most {limits.max_prompt_chars} characters",
        "negative_prompt": f"a string of at most {limits.max_prompt_chars} characters",
        "n": f"an integer from 1 to {limits.max_n}",
        "sampler": f"one of {', '.join(SAMPLER_NAMES)}",
        "steps": f"an integer from 1 to {limits.max_steps}",
        "guidance_scale": f"a number from 0 to {MAX_GUIDANCE_SCALE:g}",
        "guidance_interval": f"two noise levels [low, high] with 0 <= low < high, or null for the server's "
                             f"default ({_interval_text(limits.default_guidance_interval)})",
        "cache_interval": (f"an integer from 1 to {limits.max_cache_interval}" if limits.max_cache_interval > 1 else
                           "1 (this server's engine cannot cache the UNet's features across steps)"),
        "cache_schedule": f"one of {', '.join(CACHE_SCHEDULES)}",
        "eta": "a number from 0 to 1",
        "seed": "an integer from 0 to 2**63 - 1, or null",
        "height": sizes,
        "width": sizes,
        "size": f'"WxH" with each side a multiple of {limits.size_multiple} from {limits.min_size} to '
                f'{limits.max_size} (such as "{limits.default_size}x{limits.default_size}"), or null',
        "response_format": '"b64_json" or null (the server keeps no images, so it cannot answer with a "url")',
        "model": f"a string of at most {MAX_OPENAI_NAME_CHARS} characters, or null (the server serves one model)",
        "user": f"a string of at most {MAX_OPENAI_NAME_CHARS} characters, or null",
        "stream": "true or false",
        "previews": f"an integer from 0 to {limits.max_steps}",
        "partial_images": f"an integer from 0 to {MAX_PARTIAL_IMAGES}",
        "init_image": f"{UPLOAD_FORMAT_NAMES} of at most {limits.max_upload_bytes} bytes as base64 (no data: "
                      f"prefix), or null",
        "mask": f"an image of the init_image's size as base64 (white: repaint), at most {limits.max_upload_bytes} "
                f"bytes, or null",
        "strength": "a number from 0 to 1, or null",
        "image": f"one file: {UPLOAD_FORMAT_NAMES} of at most {limits.max_upload_bytes} bytes",
        "lora": (f"a list of at most {most_adapters(limits)} objects {{\"name\": one of "
                 f"{', '.join(limits.adapter_names)}, \"scale\": a number from {ADAPTER_SCALES[0]:g} to "
                 f"{ADAPTER_SCALES[1]:g}}}, each adapter once" if limits.adapter_names else
                 "an empty list (this server loaded no LoRA adapters; ldm-serve --lora NAME=FILE loads them)"),
    }.get(field, "")


def validation_error(error: ValidationError, body: Any, limits: ServeLimits, model: type[BaseModel]) -> ApiError:
    """The first pydantic error of ``model`` as one sentence naming the field."""
    first = error.errors()[0]
    location = [str(part) for part in first["loc"]]
    if not location:
        return ApiError(422, "invalid_request", f"the body is {shown_value(body)}; expected a JSON object", "body")
    field = location[0]
    if first["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields)
        shown = shortened(printable(field)) if field.strip() else f"the field name {shown_value(field)}"
        return ApiError(422, "invalid_request", f"{shown} is not a field of this request; expected some of {known}",
                        field)
    if first["type"] == "missing":
        return ApiError(422, "invalid_request", f"{field} is missing; expected {expected_text(field, limits)}", field)
    # an error inside an array names an item; the sentence shows the whole value the field was given
    value = body[field] if len(location) > 1 and isinstance(body, dict) and field in body else first.get("input")
    if first["type"] == "string_too_long" and isinstance(value, str) and field in IMAGE_FIELDS:
        return ApiError(422, "invalid_request", f"{field} has {len(value)} characters of base64; expected at most "
                                                f"{first['ctx']['max_length']} (an image of at most "
                                                f"{limits.max_upload_bytes} bytes)", field)
    if first["type"] == "string_too_long" and isinstance(value, str):
        return ApiError(422, "invalid_request", f"{field} has {len(value)} characters; expected at most "
                                                f"{first['ctx']['max_length']}", field)
    return ApiError(422, "invalid_request", f"{field} is {shown_value(value)}; expected {expected_text(field, limits)}",
                    field)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class OutOfRangeNumber(Decimal):
    """A JSON number whose exponent is beyond what ``Decimal`` holds (about ±10**18): infinite, which every field
    refuses, and shown as the client wrote it."""

    text: str

    def __new__(cls, text: str) -> OutOfRangeNumber:
        number = super().__new__(cls, "-Infinity" if text.startswith("-") else "Infinity")
        number.text = text
        return number

    def __str__(self) -> str:
        return self.text


def _json_number_text(text: str) -> Decimal:
    try:
        return Decimal(text)
    except ArithmeticError:  # decimal.InvalidOperation: 1e1000000000000000000
        return OutOfRangeNumber(text)


def read_json(text: str) -> Any:
    """``text`` as JSON with every number a ``Decimal`` (``json_number`` makes them ints and floats); ValueError for
    text that is not JSON (NaN and Infinity included), RecursionError for nesting too deep to read."""
    return json.loads(text, parse_float=_json_number_text, parse_int=_json_number_text,
                      parse_constant=_reject_constant)


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
    """The request body as a validated model; ``ApiError`` naming the field otherwise, whatever the bytes (415
    unless ``content_type`` is JSON)."""
    media_type, *parameters = (part.strip() for part in content_type.split(";"))
    media_type = media_type.lower()
    # a page of another site can send a body without a Content-Type or as text/plain with no CORS preflight
    if media_type != "application/json" and not media_type.endswith("+json"):
        given = f"content type {shown_value(media_type)}" if media_type else "a body without a Content-Type"
        raise ApiError(415, "unsupported_media_type", f"{given} is not supported; expected application/json",
                       "content-type")
    for name, _, value in (parameter.partition("=") for parameter in parameters):
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise ApiError(415, "unsupported_media_type", f"charset {shown_value(value.strip())} is not supported; "
                                                          f"expected UTF-8 (or no charset)", "content-type")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, "malformed_json", f"the body is not UTF-8 (byte {error.start}); expected a JSON object "
                                              f"in UTF-8", "body") from None
    if text.startswith("\ufeff"):
        raise ApiError(400, "malformed_json", "the body starts with a byte order mark; expected a JSON object in "
                                              "UTF-8 without one", "body")
    try:
        body = read_json(text)
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
        shown = f"an array nested {depth} deep" if depth > MAX_NESTING else shown_value(_plain(body))
        raise ApiError(422, "invalid_request", f"the body is {shown}; expected a JSON object", "body")
    fields = {}
    for key, value in body.items():
        if printable(key) != key:
            known = ", ".join(model.model_fields)
            raise ApiError(422, "invalid_request", f"the field name {shown_value(key)} is not valid Unicode (it "
                                                   f"holds a lone surrogate); expected some of {known}", key)
        if isinstance(value, str) and printable(value) != value:
            raise ApiError(422, "invalid_request", f"{key} is {shown_value(value)}, which is not valid Unicode (it "
                                                   f"holds a lone surrogate); expected {expected_text(key, limits)}",
                           key)
        depth = _nesting(value)
        if depth > MAX_NESTING:
            raise ApiError(422, "invalid_request", f"{shortened(key)} is an array or object nested {depth} deep; "
                                                   f"expected {expected_text(key, limits) or 'no such field'}", key)
        fields[key] = _plain(value)
    return validated(fields, limits, model)


def validated(fields: dict[str, Any], limits: ServeLimits, model: type[BaseModel]) -> BaseModel:
    """``fields`` (JSON's values, as ``json_number`` makes its numbers) as a validated ``model``; ``ApiError`` naming
    the field otherwise, for the rules JSON Schema states and for those it cannot."""
    try:
        parsed = model.model_validate(fields)
    except ValidationError as error:
        raise validation_error(error, fields, limits, model) from None
    if not re.search(NOT_BLANK_PATTERN, parsed.prompt):
        raise ApiError(422, "invalid_request", f"prompt is {shown_value(parsed.prompt)}; expected "
                                               f"{expected_text('prompt', limits)} (not only spaces)", "prompt")
    interval = getattr(parsed, "guidance_interval", None)
    if interval is not None and not interval[0] < interval[1]:  # JSON Schema cannot compare two items
        raise ApiError(422, "invalid_request", f"guidance_interval is {shown_value(fields['guidance_interval'])}; "
                                               f"expected {expected_text('guidance_interval', limits)}",
                       "guidance_interval")
    for name in ("previews", "partial_images"):
        wanted = getattr(parsed, name, 0)
        if wanted and not parsed.stream:
            raise ApiError(422, "invalid_request", f"{name} is {wanted} but stream is false; expected stream: true "
                                                   f"for {name.replace('_', ' ')}, or {name} 0", name)
    for item in getattr(parsed, "lora", []):
        scale = item.get("scale", 1.0)
        if (set(item) - {"name", "scale"} or not isinstance(item.get("name"), str) or isinstance(scale, bool)
                or not isinstance(scale, (int, float))):
            raise ApiError(422, "invalid_request", f"lora is {shown_value(fields['lora'])}; expected "
                                                   f"{expected_text('lora', limits)}", "lora")
    if "init_image" in model.model_fields and parsed.init_image is None:
        for name in ("mask", "strength"):
            if getattr(parsed, name) is not None:
                raise ApiError(422, "invalid_request", f"{name} is given without an init_image; expected an "
                                                       f"init_image for it to apply to, or {name} null", name)
    return parsed
