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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ldm_runtime.noise import MAX_SEED
from ldm_runtime.pipeline import DEFAULT_SAMPLER, DEFAULT_STEPS, GenerationRequest
from ldm_runtime.schedulers import SAMPLER_NAMES
from ldm_serve.errors import ApiError, printable, shortened, shown_value

MAX_GUIDANCE_SCALE = 100.0
DEFAULT_PROMPT_CHARS = 1000
MAX_OPENAI_NAME_CHARS = 256  # OpenAI's limit on model and user
MAX_NESTING = 16  # arrays or objects in a field's value: a valid request has none; past this, only the depth is shown
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
                                                 "allOf": [eta_only_for_ddim(limits.default_sampler)]}),
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
        eta=(float, Field(defaults["eta"], ge=0, le=1, allow_inf_nan=False,
                          description="DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like; 0 with any other "
                                      "sampler.")),
        seed=(int | None, Field(None, ge=0, le=MAX_SEED - 1,
                                description="Seed of the first image; image i uses (seed + i) mod 2**63; null "
                                            "picks one (returned in the answer). The same request and seed give "
                                            "the same image whatever else runs.")),
        height=(int | None, Field(None, **size, description=size_text.format("height"))),
        width=(int | None, Field(None, **size, description=size_text.format("width"))),
    )


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
    and ours (``negative_prompt``, ``sampler``, ``steps``, ``guidance_scale``, ``eta``, ``seed``), under the same
    limits as ``request_model``."""
    ours = request_model(limits).model_fields
    sizes = image_sizes(limits)
    default_size = f"{limits.default_size}x{limits.default_size}"
    return create_model(
        "OpenAIImageRequest",
        __config__=ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"prompt": "a red circle on a blue background",
                                                               "size": default_size, "seed": 7}],
                                                 "allOf": [eta_only_for_ddim(limits.default_sampler)]}),
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
        **{name: (ours[name].annotation, ours[name]) for name in ("negative_prompt", "sampler", "steps",
                                                                  "guidance_scale", "eta", "seed")},
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
        "eta": "a number from 0 to 1",
        "seed": "an integer from 0 to 2**63 - 1, or null",
        "height": sizes,
        "width": sizes,
        "size": f'"WxH" with each side a multiple of {limits.size_multiple} from {limits.min_size} to '
                f'{limits.max_size} (such as "{limits.default_size}x{limits.default_size}"), or null',
        "response_format": '"b64_json" or null (the server keeps no images, so it cannot answer with a "url")',
        "model": f"a string of at most {MAX_OPENAI_NAME_CHARS} characters, or null (the server serves one model)",
        "user": f"a string of at most {MAX_OPENAI_NAME_CHARS} characters, or null",
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
    value = first.get("input")
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
    return parsed
