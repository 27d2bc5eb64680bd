"""What every engine answers: encode text, one UNet call, decode latents, encode images.

The sampler and the pipeline are written once against this interface, over whatever array type the
engine computes in (numpy for onnxruntime on the CPU, torch tensors for the torch engines), so latents
stay on the engine's device for the whole sampling loop. Host values cross over only through
``to_array`` (host -> engine) and ``to_host`` (engine -> host).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import numpy as np

from ldm_runtime.guidance import guided_images

Array = Any  # numpy.ndarray or torch.Tensor, depending on the engine
DEFAULT_MAX_BATCH_SIZE = 64  # UNet rows of one call on the torch engines: 32 guided images


def batch_buckets_for(max_batch: int, buckets: Iterable[int] | None = None) -> tuple[int, ...]:
    """The batch sizes calls are padded to: ``buckets`` (None: every power of two) below ``max_batch``, then
    ``max_batch`` itself."""
    if buckets is None:
        buckets = (2**power for power in range(max_batch.bit_length()))
    return tuple(sorted({bucket for bucket in buckets if bucket < max_batch} | {max_batch}))


@dataclass(frozen=True)
class EngineInfo:
    """What the pipeline needs to know about the model behind an engine."""

    name: str  # "torch", "onnxruntime", "triton", "tensorrt"
    latent_channels: int
    latent_factor: int  # image side / latent side
    latent_scale_factor: float  # latents fed to the UNet are the autoencoder's latents times this
    image_size: int  # the size the model was trained at (the default for requests)
    min_image_size: int  # inclusive; multiples of ``image_size_multiple``
    max_image_size: int
    image_size_multiple: int
    max_batch_size: int  # UNet batch (guidance doubles the request batch)
    text_max_length: int
    schedule: dict  # the model.json "schedule" entry (NoiseSchedule.from_dict reads it)
    sampler: dict = field(default_factory=dict)  # the model's DDIM settings (DDIMConfig.from_dict); {} = defaults
    default_sampler: dict = field(default_factory=dict)  # the model's SamplerDefaults (from_dict); {} = defaults
    # an inpainting UNet (ModelConfig.inpainting): ``unet`` takes [latents, mask, masked image latents], 2C + 1
    # channels, and returns C
    inpainting: bool = False

    @property
    def max_images(self) -> int:
        """The most images one guided UNet call holds: half of ``max_batch_size``."""
        return guided_images(self.max_batch_size)


class Engine(Protocol):
    info: EngineInfo

    def encode_text(self, prompts: list[str]) -> tuple[Array, Array]:
        """Prompts -> (context (B, L, D) float, context_mask (B, L) bool: True = real token)."""

    def unet(self, latents: Array, timesteps: np.ndarray, context: Array, context_mask: Array) -> Array:
        """One UNet call. latents: (B, C, h, w) scaled latents (an inpainting model's: (B, 2C + 1, h, w), the mask
        and the masked image's latents after them); timesteps: (B,) int64 on the host, one per sample (samples at
        different steps share a call). Returns the model output, (B, C, h, w)."""

    def decode(self, latents: Array) -> Array:
        """Unscaled latents (B, C, h, w) -> images (B, 3, H, W) float in [-1, 1]."""

    def encode_images(self, images: Array) -> Array:
        """Images (B, 3, H, W) float in [-1, 1] -> unscaled latents (B, C, h, w) (the posterior mode)."""

    # Feature caching across steps (DeepCache): engines with ``deep_cache = True`` also answer
    #   unet_with_deep_features(latents, timesteps, context, context_mask) -> (prediction, deep_features)
    #   unet_shallow(latents, timesteps, context, context_mask, deep_features) -> prediction
    # (``ldm_runtime.models.unet.UNet.forward_with_deep_features`` and ``forward_shallow``).
    # LoRA adapters per request (``ldm_runtime.adapters``): engines with an ``adapters`` dict (None or absent: none,
    # ``adapters_missing`` saying why) take ``adapters=``, one (name, scale) tuple per row, in encode_text and the
    # UNet calls.

    def to_array(self, values: np.ndarray, like: Array | None = None) -> Array:
        """A host array as an engine array (on the engine's device; ``like``'s dtype when given)."""

    def to_host(self, array: Array) -> np.ndarray:
        """An engine array as a host numpy array."""


def deep_cache_missing(engine: Any) -> str:
    """Why ``engine`` cannot cache the UNet's features across steps (``deep_cache``), in a few words."""
    return getattr(engine, "deep_cache_missing", None) or "it has no shallow UNet graph"
