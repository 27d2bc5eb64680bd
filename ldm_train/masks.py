"""Random inpainting masks for training an inpainting UNet: boxes and brush strokes, as the LDM paper's inpainting
model and Stable Diffusion's inpainting checkpoints were trained with (LaMa-style masks), and now and then the
whole image, so that the model still draws from the prompt alone.

A mask is ``(H, W) float32``, 1 where the model repaints. Everything random comes from the ``torch.Generator``
given, so a training step's masks are a pure function of (seed, step, rank) like the rest of the step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

WHOLE_IMAGE_SHARE = 0.25  # of masks that cover everything (Stable Diffusion's inpainting training: 25%)
MAX_BOXES = 3
MAX_STROKES = 3


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _integer(generator: torch.Generator, low: int, high: int) -> int:
    """A whole number from ``low`` to ``high`` inclusive."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def random_mask(height: int, width: int, generator: torch.Generator) -> np.ndarray:
    """One mask: the whole image (``WHOLE_IMAGE_SHARE`` of the time), else one to ``MAX_BOXES`` boxes of 15% to 60%
    of each side and up to ``MAX_STROKES`` brush strokes (a few joined segments, 6% to 15% of the side thick)."""
    if float(torch.rand((), generator=generator)) < WHOLE_IMAGE_SHARE:
        return np.ones((height, width), dtype=np.float32)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(_integer(generator, 1, MAX_BOXES)):
        box_w = max(1, round(width * _uniform(generator, 0.15, 0.6)))
        box_h = max(1, round(height * _uniform(generator, 0.15, 0.6)))
        left, top = _integer(generator, 0, width - box_w), _integer(generator, 0, height - box_h)
        draw.rectangle((left, top, left + box_w - 1, top + box_h - 1), fill=255)
    side = min(height, width)
    for _ in range(_integer(generator, 0, MAX_STROKES)):
        thickness = max(1, round(side * _uniform(generator, 0.06, 0.15)))
        x, y = _uniform(generator, 0, width - 1), _uniform(generator, 0, height - 1)
        points = [(x, y)]
        for _ in range(_integer(generator, 1, 4)):
            angle, length = _uniform(generator, 0, 2 * math.pi), side * _uniform(generator, 0.1, 0.4)
            x = min(max(x + length * math.cos(angle), 0), width - 1)
            y = min(max(y + length * math.sin(angle), 0), height - 1)
            points.append((x, y))
        draw.line(points, fill=255, width=thickness, joint="curve")
    return (np.asarray(canvas) >= 128).astype(np.float32)


def random_masks(count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """``(count, 1, H, W) float32`` masks (``random_mask``)."""
    return torch.from_numpy(np.stack([random_mask(height, width, generator) for _ in range(count)]))[:, None]
