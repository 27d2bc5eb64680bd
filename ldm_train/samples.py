"""Getting images out of a data set and writing image grids a person can look at."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from ldm_runtime.images import image_grid


def fetch_images(dataset, indices: Iterable[int]) -> torch.Tensor:
    """(B, 3, H, W) float32 in [-1, 1] for the given item indices."""
    return torch.stack([dataset[int(index)][0] for index in indices])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    scaled = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(path: Path, rows: list[torch.Tensor], upscale: int = 1) -> None:
    """Write rows of (N, 3, H, W) images in [-1, 1] (rows of equal N) as one PNG, nearest-upscaled for small
    images."""
    grid = image_grid(np.concatenate([to_uint8(row) for row in rows]), columns=rows[0].shape[0])
    if upscale > 1:
        grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def save_reconstruction_grid(path: Path, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
    """Top row: inputs; bottom row: the autoencoder's reconstructions."""
    save_grid(path, [originals, reconstructions], upscale=max(1, 128 // originals.shape[-1]))
