"""Images for people to look at: PNG files that carry the settings that made them, and grids of images; and
images people hand in (an init image, a mask), read as untrusted bytes.

A generated PNG keeps its prompt, seed and settings as JSON in a PNG text chunk named "parameters" (the
convention of the Stable Diffusion web UIs), whether ``ldm-sample`` wrote it or ``ldm-serve`` sent it.
``read_upload`` decodes an image only after its byte count, its format (``UPLOAD_FORMATS``) and the pixel size its
header states have passed, so a decompression bomb is refused before any pixel is decoded.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from ldm_runtime.errors import RequestError

PARAMETERS_KEY = "parameters"
GRID_PADDING = 2  # px of white between tiles and around them
WHITE = 255
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")  # PIL's names of the formats read_upload decodes
UPLOAD_FORMAT_NAMES = "a PNG, JPEG or WebP image"
MAX_UPLOAD_BYTES = 64 * 2**20  # an uncompressed 4096x4096 RGB PNG (48 MiB) fits


def read_upload(data: bytes, what: str, *, max_side: int, mask: bool = False,
                max_bytes: int = MAX_UPLOAD_BYTES) -> np.ndarray:
    """Untrusted image bytes -> ``(H, W, 3) uint8`` RGB, or with ``mask`` ``(H, W) uint8`` grey levels, turned
    upright as its EXIF orientation says. ``RequestError`` whose message names ``what`` (a request field such as
    "init_image", or a flag and its path), which is also its ``field``, for: more than ``max_bytes`` bytes, a format
    not in ``UPLOAD_FORMATS``, a side past ``max_side`` pixels (checked on the header, before decoding: e.g. the
    model's ``max_image_size``, or ``config.LARGEST_IMAGE_SIDE`` before a model is loaded), or data that does not
    decode."""
    if len(data) > max_bytes:
        raise RequestError(f"{what} is {len(data)} bytes; expected {UPLOAD_FORMAT_NAMES} of at most {max_bytes} "
                           f"bytes", what)
    if not data:
        raise RequestError(f"{what} is empty; expected {UPLOAD_FORMAT_NAMES}", what)
    try:
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)  # reads the header only
    except Image.DecompressionBombError:  # PIL's own limit, twice Image.MAX_IMAGE_PIXELS, past max_side's
        raise RequestError(f"{what} states a size of over {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels in its header "
                           f"(a decompression bomb); expected at most {max_side} pixels a side", what) from None
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(f"{what} is not {UPLOAD_FORMAT_NAMES}", what) from None
    width, height = image.size
    kind = image.format  # exif_transpose's copy has none
    if not (0 < width <= max_side and 0 < height <= max_side):
        raise RequestError(f"{what} is {width}x{height} pixels; expected at most {max_side} pixels a side", what)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        pixels = np.array(image.convert("L" if mask else "RGB"), dtype=np.uint8)
    except Exception as error:  # PIL raises many kinds of error on damaged data: each is the file's fault
        reason = " ".join(str(error).split()) or type(error).__name__
        raise RequestError(f"{what} cannot be decoded as {kind} ({reason}); expected a whole "
                           f"{UPLOAD_FORMAT_NAMES.removeprefix('a ')}", what) from None
    return pixels


def png_bytes(image: np.ndarray | Image.Image, parameters: dict[str, Any] | list[dict[str, Any]]) -> bytes:
    """An image (``(H, W, 3) uint8`` or a PIL image) as PNG bytes, ``parameters`` as JSON (sorted keys) in the
    text chunk "parameters"."""
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, json.dumps(parameters, sort_keys=True))
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def image_grid(images: Sequence[np.ndarray], columns: int | None = None, padding: int = GRID_PADDING) -> Image.Image:
    """Images ``(H, W, 3) uint8`` of one size, left to right and top to bottom, ``columns`` per row (default: a
    near-square grid), with ``padding`` px of white between and around them."""
    height, width, _ = images[0].shape
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    canvas = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, 3), WHITE,
                     dtype=np.uint8)
    for index, image in enumerate(images):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        canvas[top:top + height, left:left + width] = image
    return Image.fromarray(canvas)
