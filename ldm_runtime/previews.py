"""Previews of images part-way through sampling: a linear map from latents to RGB where one fits the model, else
the decoder itself.

``LatentPreview`` holds a ``(C + 1, 3)`` matrix: each latent channel's weight on red, green and blue and a bias
row, mapping scaled latents (what the UNet sees, ``(1, C, h, w)``) to RGB in [-1, 1], one pixel per latent pixel,
shown at the image's size; cheap enough for every step. ``fit_latent_preview`` fits it by least squares against
the decoder's own output, average-pooled to the latent grid, on latents the encoder makes of a few synthetic
images (flat colour blocks, so that every colour and edge the map must follow is there), and scores it (R², on
other such images). A model folder may carry the map as ``PREVIEW_FILE``; ``load_latent_preview`` reads it,
``save_latent_preview`` writes it. As the Stable Diffusion web UIs' "latent to RGB" previews, it is an
approximation: its colours follow the decoder's, its detail is the latent grid's. Where the decoder is far from
linear per pixel (small models trained on few images), ``DecoderPreview`` decodes the latents instead: one decoder
call per preview. ``preview_for`` picks one for a model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldm_runtime.errors import ConfigError
from ldm_runtime.files import read_description, write_text_atomic

PREVIEW_FILE = "latent_preview.json"
PREVIEW_FORMAT = 1
FIT_IMAGES = 8  # synthetic images the map is fitted on, and as many more it is scored on
FIT_BLOCKS = 4  # each a FIT_BLOCKS x FIT_BLOCKS grid of flat colours
MIN_FIT_R2 = 0.5  # a fitted map that explains less of the decoder's colours than this is not used
log = logging.getLogger(__name__)


def unit_scale(latents: np.ndarray) -> np.ndarray:
    """Latents still carrying a sampler's sigma-scaled noise (a root mean square above 1) brought to unit scale, as
    the UNet's input scaling does; others as they are."""
    return latents / np.float32(max(1.0, float(np.sqrt(np.mean(np.square(latents, dtype=np.float64))))))


@dataclass(frozen=True, eq=False)
class LatentPreview:
    """``weights`` ``(C + 1, 3) float32``: scaled latents (and a 1) to RGB in [-1, 1]; ``factor`` is the image side
    over the latent side; ``source`` says where the map came from, for the server's log."""

    weights: np.ndarray
    factor: int
    source: str = "fitted"

    @property
    def latent_channels(self) -> int:
        return self.weights.shape[0] - 1

    def images(self, engine: Any, latents: list[Any]) -> list[np.ndarray]:
        """Each ``(1, C, h, w)`` scaled latents on ``engine`` -> ``(h*f, w*f, 3) uint8``."""
        return [self.rgb(engine.to_host(one)) for one in latents]

    def rgb(self, latents: np.ndarray) -> np.ndarray:
        """``(C, h, w)`` or ``(1, C, h, w)`` scaled latents on the host -> ``(h*f, w*f, 3) uint8``, each latent pixel
        a ``f x f`` block, after ``unit_scale``."""
        latents = np.asarray(latents, dtype=np.float32).reshape(-1, *np.shape(latents)[-2:])
        assert latents.shape[0] == self.latent_channels, (latents.shape, self.weights.shape)
        colours = np.einsum("chw,ck->hwk", unit_scale(latents), self.weights[:-1]) + self.weights[-1]
        pixels = np.round(np.clip((colours + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8)
        return np.repeat(np.repeat(pixels, self.factor, axis=0), self.factor, axis=1)

    def to_json(self) -> dict[str, Any]:
        return {"format": PREVIEW_FORMAT, "factor": self.factor,
                "weights": [[float(value) for value in row] for row in self.weights]}


@dataclass(frozen=True)
class DecoderPreview:
    """Previews by the decoder: the latents after ``unit_scale``, decoded as the final image is."""

    latent_scale_factor: float
    source: str = "the decoder"

    def images(self, engine: Any, latents: list[Any]) -> list[np.ndarray]:
        """Each ``(1, C, h, w)`` scaled latents on ``engine`` (all of one shape) -> ``(H, W, 3) uint8``, in one
        decoder call."""
        stacked = np.concatenate([unit_scale(engine.to_host(one).astype(np.float32)) for one in latents])
        decoded = engine.to_host(engine.decode(engine.to_array(stacked / np.float32(self.latent_scale_factor))))
        pixels = np.round(np.clip((decoded.astype(np.float32) + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8)
        return [np.ascontiguousarray(image.transpose(1, 2, 0)) for image in pixels]


def synthetic_images(count: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """``(count, 3, height, width) float32`` in [-1, 1]: each a ``FIT_BLOCKS`` grid of flat random colours."""
    colours = rng.uniform(-1.0, 1.0, size=(count, 3, FIT_BLOCKS, FIT_BLOCKS)).astype(np.float32)
    rows = np.minimum(np.arange(height) * FIT_BLOCKS // height, FIT_BLOCKS - 1)
    columns = np.minimum(np.arange(width) * FIT_BLOCKS // width, FIT_BLOCKS - 1)
    return np.ascontiguousarray(colours[:, :, rows][:, :, :, columns])


def decoder_pairs(engine: Any, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(N, C)`` scaled latent pixels the encoder makes of ``count`` synthetic images at the smallest size the
    engine takes, and ``(N, 3)`` the decoder's RGB of them average-pooled to the latent grid, in batches no
    larger than the engine's."""
    info = engine.info
    factor = info.latent_factor
    side = max(info.min_image_size, FIT_BLOCKS * factor)
    side += -side % info.image_size_multiple
    batch = max(1, min(count, info.max_images))
    features, targets = [], []
    for start in range(0, count, batch):
        images = synthetic_images(min(batch, count - start), side, side, rng)
        latents = engine.to_host(engine.encode_images(engine.to_array(images))).astype(np.float32)
        decoded = engine.to_host(engine.decode(engine.to_array(latents))).astype(np.float32)
        pooled = decoded.reshape(*decoded.shape[:2], side // factor, factor, side // factor, factor).mean(axis=(3, 5))
        scaled = latents * np.float32(info.latent_scale_factor)
        features.append(scaled.transpose(0, 2, 3, 1).reshape(-1, scaled.shape[1]))
        targets.append(pooled.transpose(0, 2, 3, 1).reshape(-1, 3))
    return np.concatenate(features).astype(np.float64), np.concatenate(targets).astype(np.float64)


def explained(weights: np.ndarray, features: np.ndarray, targets: np.ndarray) -> float:
    """R² of ``weights`` on ``(N, C)`` scaled latent pixels against ``(N, 3)`` RGB: 1 is exact, 0 no better than
    each channel's mean."""
    predicted = features @ weights[:-1] + weights[-1]
    return float(1.0 - np.sum((predicted - targets) ** 2) / np.sum((targets - targets.mean(axis=0)) ** 2))


def fit_latent_preview(engine: Any, count: int = FIT_IMAGES, seed: int = 0) -> tuple[LatentPreview, float]:
    """The least-squares map from ``engine``'s scaled latents to its decoder's RGB (``decoder_pairs`` of ``count``
    synthetic images) and its R² on ``count`` others. Runs on the engine: call it from the thread that owns it."""
    rng = np.random.default_rng(seed)
    features, targets = decoder_pairs(engine, count, rng)
    inputs = np.concatenate([features, np.ones((features.shape[0], 1))], axis=1)
    weights, *_ = np.linalg.lstsq(inputs, targets, rcond=None)
    score = explained(weights, *decoder_pairs(engine, count, rng))
    source = f"a linear map fitted at start from the decoder on {count} latents (R² {score:.2f})"
    return LatentPreview(weights=weights.astype(np.float32), factor=engine.info.latent_factor, source=source), score


def preview_for(engine: Any, stored: LatentPreview | None) -> LatentPreview | DecoderPreview:
    """How ``engine``'s previews are made: ``stored`` (the model folder's map) when there is one, else a map
    fitted now if it explains at least ``MIN_FIT_R2`` of the decoder's colours, else the decoder; logs which (at
    info level). Runs on the engine."""
    chosen: LatentPreview | DecoderPreview | None = stored
    if chosen is None:
        fitted, score = fit_latent_preview(engine)
        chosen = fitted if score >= MIN_FIT_R2 else DecoderPreview(
            engine.info.latent_scale_factor, source=f"the decoder (a linear map fitted at start explains R² "
                                                    f"{score:.2f} of its colours, under {MIN_FIT_R2})")
    log.info("previews: %s", chosen.source)
    return chosen


def load_latent_preview(folder: str | Path, latent_channels: int, factor: int) -> LatentPreview | None:
    """The map ``folder/PREVIEW_FILE`` holds, None without one; ``ConfigError`` naming the file when it is not a
    map for ``latent_channels`` channels and latent factor ``factor``."""
    path = Path(folder) / PREVIEW_FILE
    if not path.exists():
        return None
    data = read_description(folder, PREVIEW_FILE, "latent preview map", ConfigError)
    expected = (f"expected {{\"format\": {PREVIEW_FORMAT}, \"factor\": {factor}, \"weights\": "
                f"{latent_channels + 1} rows of 3 numbers}}")
    try:
        weights = np.asarray(data["weights"], dtype=np.float64)
        ok = (data["format"] == PREVIEW_FORMAT and data["factor"] == factor
              and weights.shape == (latent_channels + 1, 3) and bool(np.isfinite(weights).all()))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{path} is not a latent preview map of this model; {expected}")
    return LatentPreview(weights=weights.astype(np.float32), factor=factor, source=f"the linear map in {path}")


def write_fitted_preview(engine: Any, folder: str | Path) -> str:
    """Fit ``engine``'s latent preview map and keep it as ``folder/PREVIEW_FILE`` when it explains at least
    ``MIN_FIT_R2`` of the decoder's colours (a map there before is removed otherwise: servers then preview with the
    decoder); returns a line saying which. What ldm-train and ldm-export do once a model's autoencoder is final, so
    that a server starts without fitting. Runs on the engine."""
    fitted, score = fit_latent_preview(engine)
    path = Path(folder) / PREVIEW_FILE
    if score >= MIN_FIT_R2:
        save_latent_preview(folder, fitted)
        return (f"wrote {PREVIEW_FILE} (a linear map from latents to RGB explaining R² {score:.2f} of the decoder's "
                f"colours)")
    path.unlink(missing_ok=True)
    return (f"no {PREVIEW_FILE}: a linear map explains R² {score:.2f} of the decoder's colours, under "
            f"{MIN_FIT_R2}; previews decode")


def save_latent_preview(folder: str | Path, preview: LatentPreview) -> Path:
    """Write ``preview`` as ``folder/PREVIEW_FILE`` (whole or not at all); returns its path."""
    path = Path(folder) / PREVIEW_FILE
    write_text_atomic(path, json.dumps(preview.to_json(), indent=1) + "\n")
    return path
