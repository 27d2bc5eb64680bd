"""The images a request hands in, read as untrusted bytes: ``init_image`` and ``mask``, base64 in our JSON
(``json_images``), and ``POST /v1/images/edits``' multipart form (``read_edit_form``): its files ``image`` and
``mask`` (OpenAI's convention: the mask's fully transparent pixels are repainted) and its text fields as the values
the edit model validates. Each image passes ``ldm_runtime.images.read_upload`` (byte count, format, the size its
header states, then decoding) on a worker thread; every failure is an ``ApiError`` naming the field.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from decimal import Decimal
from typing import Any

import numpy as np
from fastapi import Request
from PIL import Image, ImageOps
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ldm_runtime.errors import RequestError
from ldm_runtime.images import UPLOAD_FORMATS, read_upload
from ldm_serve.errors import ApiError, printable, shortened, shown_value
from ldm_serve.request_schema import (FORM_ARRAY_FIELDS, FORM_TEXT_FIELDS, MAX_FORM_PARTS, ServeLimits,
                                      expected_text, json_number, read_json, validated)

FORM_FILES = ("image", "mask")
REPAINT = 255  # a mask's grey level that repaints (ldm_runtime.pipeline.REPAINT_THRESHOLD and up)


def _request_error(error: RequestError) -> ApiError:
    return ApiError(422, "invalid_request", str(error), error.field)


async def json_images(parsed: BaseModel, limits: ServeLimits) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Our request's ``init_image`` ``(H, W, 3) uint8`` and ``mask`` ``(H, W) uint8`` (None where absent), from
    base64; ``ApiError`` 422 naming the field that is not base64 of an image the server takes."""
    decoded = []
    for field in ("init_image", "mask"):
        text = getattr(parsed, field)
        if text is None:
            decoded.append(None)
            continue
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "invalid_request", f"{field} is {shown_value(text)}, which is not base64; expected "
                                                   f"{expected_text(field, limits)}", field) from None
        decoded.append(data)
    image, mask = decoded
    try:
        return await asyncio.to_thread(
            lambda: (None if image is None else read_upload(image, "init_image", max_side=limits.max_size,
                                                            max_bytes=limits.max_upload_bytes),
                     None if mask is None else read_upload(mask, "mask", max_side=limits.max_size, mask=True,
                                                           max_bytes=limits.max_upload_bytes)))
    except RequestError as error:
        raise _request_error(error) from None


def transparent_pixels(data: bytes, limits: ServeLimits) -> np.ndarray:
    """An OpenAI edit mask -> ``(H, W) uint8``, ``REPAINT`` where its alpha is 0 and 0 elsewhere; ``RequestError``
    naming ``mask`` for what ``read_upload`` refuses and for an image without an alpha channel."""
    read_upload(data, "mask", max_side=limits.max_size, mask=True, max_bytes=limits.max_upload_bytes)
    opened = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    image = ImageOps.exif_transpose(opened)  # decodes: checked above; the copy it makes has no format
    if "A" not in image.getbands() and "transparency" not in image.info:
        raise RequestError(f"mask is a {opened.format} image without an alpha channel (mode {image.mode}); expected "
                           f"a PNG whose fully transparent pixels (alpha 0) mark where to edit", "mask")
    alpha = np.asarray(image.convert("RGBA").getchannel("A"))
    return np.where(alpha == 0, REPAINT, 0).astype(np.uint8)


async def read_edit_form(request: Request, limits: ServeLimits,
                         model: type[BaseModel]) -> tuple[BaseModel, np.ndarray, np.ndarray | None]:
    """``POST /v1/images/edits``' body (its size already bounded): the validated text fields, the image
    ``(H, W, 3) uint8`` and the mask ``(H, W) uint8`` (``REPAINT`` where transparent; None where absent).
    ``ApiError`` 415 for a body that is not multipart/form-data, 400 for a malformed one or one of more than
    ``MAX_FORM_PARTS`` parts, 422 naming the field otherwise."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        given = f"content type {shown_value(media_type)}" if media_type else "a body without a Content-Type"
        raise ApiError(415, "unsupported_media_type", f"{given} is not supported; expected multipart/form-data (a "
                                                      f"file named image, a field named prompt)", "content-type")
    parser = MultiPartParser(request.headers, request.stream(), max_files=len(FORM_FILES) + 1,
                             max_fields=MAX_FORM_PARTS, max_part_size=4 * limits.max_prompt_chars + 1024)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        if error.message.startswith("Part exceeded maximum size"):
            raise ApiError(422, "invalid_request", f"a text field of the form is over {parser.max_part_size} bytes; "
                                                   f"expected prompt and negative_prompt of at most "
                                                   f"{limits.max_prompt_chars} characters and short values for the "
                                                   f"others", "body") from None
        reason = error.message.rstrip(".").replace(". ", ": ")
        raise ApiError(400, "malformed_multipart", f"the body is not multipart/form-data this server reads "
                                                   f"({reason}); expected at most {len(FORM_FILES)} files and "
                                                   f"{MAX_FORM_PARTS} fields in all", "body") from None
    try:
        files, parts = await _form_parts(form.multi_items())
    finally:
        await form.close()
    parsed = validated(_form_values(parts, model), limits, model)
    if "image" not in files:
        raise ApiError(422, "invalid_request", f"image is missing; expected {expected_text('image', limits)}",
                       "image")
    try:
        image, mask = await asyncio.to_thread(
            lambda: (read_upload(files["image"], "image", max_side=limits.max_size, max_bytes=limits.max_upload_bytes),
                     None if "mask" not in files else transparent_pixels(files["mask"], limits)))
    except RequestError as error:
        raise _request_error(error) from None
    return parsed, image, mask


async def _form_parts(items: list[tuple[str, Any]]) -> tuple[dict[str, bytes], dict[str, list[str]]]:
    """A form's files by name (``image[]``, as clients name a list of files, is ``image``) and its text parts by
    name (``name[]`` is ``name``, each array item a part); ``ApiError`` 422 for a file where text belongs, text
    where a file belongs, or a second file of one name."""
    files: dict[str, bytes] = {}
    parts: dict[str, list[str]] = {}
    for name, value in items:
        key = name[:-2] if name.endswith("[]") else name
        if key in FORM_FILES:
            if not isinstance(value, UploadFile):
                raise ApiError(422, "invalid_request", f"{key} is a text field; expected a file part (one with a "
                                                       f"filename, such as curl's -F {key}=@picture.png)", key)
            if key in files:
                raise ApiError(422, "invalid_request", f"{key} is given more than once; expected one file (this "
                                                       f"server edits one image a request)", key)
            files[key] = await value.read()
        elif isinstance(value, UploadFile):
            raise ApiError(422, "invalid_request", f"{shortened(printable(key))} is a file; expected a text field",
                           key)
        else:
            parts.setdefault(key, []).append(value)
    return files, parts


def _form_values(parts: dict[str, list[str]], model: type[BaseModel]) -> dict[str, Any]:
    """The form's text parts as the values of ``model``'s fields: the text of ``FORM_TEXT_FIELDS``, JSON (7, 0.5,
    true, null) for every other field (a part that is not JSON stays text, which the model refuses, naming it),
    an array from repeated parts; ``ApiError`` 422 for a field given more than once that takes one value."""
    values: dict[str, Any] = {}
    for key, texts in parts.items():
        if len(texts) > 1 and key not in FORM_ARRAY_FIELDS:
            raise ApiError(422, "invalid_request", f"{shortened(printable(key))} is given {len(texts)} times; "
                                                   f"expected one value", key)
        if key in FORM_TEXT_FIELDS:
            values[key] = texts[0]
        elif len(texts) > 1:
            values[key] = [_json_value(text) for text in texts]
        else:
            values[key] = _json_value(texts[0])
    return values


def _json_value(text: str) -> Any:
    """A form part's text read as one JSON value, numbers as ``json_number`` makes them; the text itself where it
    is not JSON, nests, or is a string (a form's text is already one)."""
    try:
        value = read_json(text)
    except (ValueError, RecursionError):
        return text
    if isinstance(value, Decimal):
        return json_number(value)
    if isinstance(value, list) and all(isinstance(item, Decimal) for item in value):
        return [json_number(item) for item in value]
    return value if isinstance(value, (bool, type(None))) else text
