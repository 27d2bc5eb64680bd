"""Getting images out of a data set and writing image grids a person can look at."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image


def fetch_images(dataset, indices: Iterable[int]) -> torch.Tensor:
    """(B, 3, H, W) float32 in [-1, 1] for the given item indices."""
    return torch.stack([dataset[int(index)][0] for index in indices])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    scaled = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(rows: list[np.ndarray], padding: int = 2) -> Image.Image:
    """Each row: (N, H, W, 3) uint8; rows of equal N. White padding between tiles."""
    count, height, width, _ = rows[0].shape
    canvas = np.full(
        (len(rows) * (height + padding) + padding, count * (width + padding) + padding, 3), 255, dtype=np.uint8
    )
    for row_index, row in enumerate(rows):
        for column, tile in enumerate(row):
            top = padding + row_index * (height + padding)
            left = padding + column * (width + padding)
            canvas[top:top + height, left:left + width] = tile
    return Image.fromarray(canvas)


def save_grid(path: Path, rows: list[torch.Tensor], upscale: int = 1) -> None:
    """Write rows of (N, 3, H, W) images in [-1, 1] as one PNG, nearest-upscaled for small images."""
    grid = image_grid([to_uint8(row) for row in rows])
    if upscale > 1:
        grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def save_reconstruction_grid(path: Path, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
    """Top row: inputs; bottom row: the autoencoder's reconstructions."""
    save_grid(path, [originals, reconstructions], upscale=max(1, 128 // originals.shape[-1]))
