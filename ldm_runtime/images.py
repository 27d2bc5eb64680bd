"""Images for people to look at: PNG files that carry the settings that made them, and grids of images.

A generated PNG keeps its prompt, seed and settings as JSON in a PNG text chunk named "parameters" (the
convention of the Stable Diffusion web UIs), whether ``ldm-sample`` wrote it or ``ldm-serve`` sent it.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

PARAMETERS_KEY = "parameters"
GRID_PADDING = 2  # px of white between tiles and around them
WHITE = 255


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
