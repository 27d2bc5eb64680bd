"""The body of an image request: its pydantic schema under the server's limits (``ServeLimits``), for ours
(``request_model``) and OpenAI's (``openai_request_model``), and ``parse_body``, which reads any bytes into one or
raises an ``ApiError`` whose one sentence names the field, the bad value and what was expected.
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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ldm_runtime.config import CACHE_SCHEDULES, MAX_CACHE_INTERVAL
from ldm_runtime.noise import MAX_SEED
from ldm_runtime.pipeline import DEFAULT_SAMPLER, DEFAULT_STEPS, GenerationRequest
from ldm_runtime.schedulers import SAMPLER_NAMES
from ldm_serve.errors import ApiError, printable, shortened, shown_value

MAX_GUIDANCE_SCALE = 100.0
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
    default_sampler: str = DEFAULT_SAMPLER
    default_guidance_interval: tuple[float, float] | None = None  # None: guidance at every UNet call
    default_cache_interval: int = 1
    default_cache_schedule: str = CACHE_SCHEDULES[0]
    max_cache_interval: int = MAX_CACHE_INTERVAL  # 1 where the engine cannot cache the UNet's features


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
                                                 "allOf": [eta_only_for_ddim(limits.default_sampler),
                                                           only_when_streamed("previews")]}),
        prompt=(str, Field(min_length=1, max_length=limits.max_prompt_chars,
                           json_schema_extra={"pattern": NOT_BLANK_PATTERN},  # checked in parse_body
                           description="What to draw, not only spaces. Longer than the model's token limit is "
                                       "truncated.")),
        negative_prompt=(str, Field(defaults["negative_prompt"], max_length=limits.max_prompt_chars,
                                    description="What to steer away from; empty for none.")),
        n=(int, Field(1, ge=1, le=limits.max_n, description="Number of images; image i uses seed + i (mod 2**63).")),
        sampler=(Literal[SAMPLER_NAMES], Field(limits.default_sampler,
                                               description="The sampler: ddim (with the model's own DDIM settings) "
                                                           "or another, which takes eta 0 only.")),
        steps=(int, Field(limits.default_steps, ge=1, le=limits.max_steps,
                          description="Sampler steps; the default is the default sampler's, and a request that names "
                                      "another sampler and no steps gets that sampler's default.")),
        guidance_scale=(float, Field(defaults["guidance_scale"], ge=0, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False,
                                     description="Classifier-free guidance scale; 1 means no guidance.")),
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
                          description="DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like; 0 with any other "
                                      "sampler.")),
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
    )


def only_when_streamed(field: str) -> dict[str, Any]:
    """The JSON Schema rule "``field`` above 0 needs stream true" (``parse_body`` enforces it)."""
    return {"if": {"properties": {field: {"exclusiveMinimum": 0}}, "required": [field]},
            "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]}}


def _interval_json(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [float(end) for end in interval]


def _interval_text(interval: tuple[float, float] | None) -> str:
    """A guidance interval as a request's error or description shows it."""
    return "guidance at every UNet call" if interval is None else f"[{float(interval[0])!r}, {float(interval[1])!r}]"


def eta_only_for_ddim(default_sampler: str) -> dict[str, Any]:
    """The JSON Schema rule "eta is 0 unless the sampler is ddim", where a body without ``sampler`` gets
    ``default_sampler`` (``Pipeline.validate`` enforces it; the schema says it, so that schema-valid bodies pass)."""
    others = [name for name in SAMPLER_NAMES if name != "ddim"]
    sampler_is_not_ddim: dict[str, Any] = {"properties": {"sampler": {"enum": others}}}
    if default_sampler == "ddim":
        sampler_is_not_ddim["required"] = ["sampler"]
    return {"if": sampler_is_not_ddim, "then": {"properties": {"eta": {"const": 0}}}}


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
                                                 "allOf": [eta_only_for_ddim(limits.default_sampler),
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
                                                                  "seed")},
    )


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
        return ApiError(422, "invalid_request", f"{shortened(field)} is not a field of this request; expected some "
                                                f"of {known}", field)
    if first["type"] == "missing":
        return ApiError(422, "invalid_request", f"{field} is missing; expected {expected_text(field, limits)}", field)
    # an error inside an array names an item; the sentence shows the whole value the field was given
    value = body[field] if len(location) > 1 and isinstance(body, dict) and field in body else first.get("input")
    if first["type"] == "string_too_long" and isinstance(value, str):
        return ApiError(422, "invalid_request", f"{field} has {len(value)} characters; expected at most "
                                                f"{first['ctx']['max_length']}", field)
    return ApiError(422, "invalid_request", f"{field} is {shown_value(value)}; expected {expected_text(field, limits)}",
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
    """The request body as a validated model; ``ApiError`` naming the field otherwise, whatever the bytes (415
    unless ``content_type`` is JSON)."""
    media_type = content_type.split(";")[0].strip().lower()
    # a page of another site can send a body without a Content-Type or as text/plain with no CORS preflight
    if media_type != "application/json" and not media_type.endswith("+json"):
        given = f"content type {shown_value(media_type)}" if media_type else "a body without a Content-Type"
        raise ApiError(415, "unsupported_media_type", f"{given} is not supported; expected application/json",
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
    return parsed
