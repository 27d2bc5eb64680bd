"""Classifier-free guidance (Ho & Salimans 2022): eps = eps_uncond + s * (eps_cond - eps_uncond).

Both halves come from one batched UNet call on ``[unconditional rows; conditional rows]``. A guidance
scale of exactly 1 gives eps_cond, so by default a row with s == 1 is left out of the unconditional half
(``skip_unconditional_at_one=True``): a batch of such rows costs one UNet pass instead of two. The rows it
keeps are guided exactly as without the short-cut; turn it off to always run the doubled batch (a fixed
UNet batch size, e.g. for a captured CUDA graph).

Any scale >= 0 takes the formula, so a scale below 1 leans toward the unconditional prediction (0 gives it
alone), as in CompVis' LDM scripts; diffusers' StableDiffusionPipeline instead turns guidance off for every
scale <= 1 (``guidance_below_one_note`` is the line that says so).

Arrays are the engine's (numpy or torch, any device); guidance scales are host floats, one per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ldm_runtime.arrays import ArrayConverter, concatenate, host_to_array_like, take_rows

UNET_ROWS_PER_IMAGE = 2  # with guidance on, an image takes an unconditional and a conditional UNet row


def guided_images(unet_rows: int) -> int:
    """The most images a UNet batch of ``unet_rows`` rows holds with guidance on (each image takes two rows)."""
    return unet_rows // UNET_ROWS_PER_IMAGE


def guided_unet_rows(images: int) -> int:
    """The UNet rows ``images`` images take with guidance on."""
    return images * UNET_ROWS_PER_IMAGE


def guidance_below_one_note(guidance_scale: float) -> str | None:
    """One line for a scale from 0 to below 1, where diffusers' pipeline differs from the formula; else None."""
    if not 0 <= guidance_scale < 1:
        return None
    return (f"guidance_scale {guidance_scale:g} is below 1: sampled as eps_u + {guidance_scale:g} (eps_c - eps_u), "
            f"toward the unconditional prediction, where diffusers' StableDiffusionPipeline turns guidance off "
            f"(guidance_scale 1 gives its images)")


def apply_guidance(noise_pred_uncond: Any, noise_pred_cond: Any, guidance_scale: float | Sequence[float],
                   to_array: ArrayConverter | None = None) -> Any:
    """``eps_u + s (eps_c - eps_u)``: predictions ``(B, C, h, w)``, s a float or ``(B,)`` host floats."""
    batch = noise_pred_cond.shape[0]
    scale = _check_guidance_scale(guidance_scale, batch)
    scale = (to_array or host_to_array_like)(scale.reshape((batch,) + (1,) * (noise_pred_cond.ndim - 1)),
                                             noise_pred_cond)
    return noise_pred_uncond + scale * (noise_pred_cond - noise_pred_uncond)


@dataclass(frozen=True, eq=False)
class GuidedBatch:
    """Which rows of a batch need an unconditional UNet pass, and how to build and undo the stacked batch.

    ``guidance_scale``: ``(B,) float64``. ``unconditional_rows``: ``(U,) int64``, ascending; the UNet batch
    is ``U + B`` rows: the unconditional inputs of those rows, then the conditional inputs of all B rows.
    """

    guidance_scale: np.ndarray
    unconditional_rows: np.ndarray

    @classmethod
    def plan(cls, guidance_scale: float | Sequence[float], batch_size: int,
             skip_unconditional_at_one: bool = True) -> "GuidedBatch":
        scale = _check_guidance_scale(guidance_scale, batch_size)
        needs_unconditional = scale != 1.0 if skip_unconditional_at_one else np.ones(batch_size, dtype=bool)
        return cls(scale, np.flatnonzero(needs_unconditional).astype(np.int64))

    @property
    def batch_size(self) -> int:
        return len(self.guidance_scale)

    @property
    def unet_batch_size(self) -> int:
        return len(self.unconditional_rows) + self.batch_size

    def stack(self, conditional: Any, unconditional: Any = None) -> Any:
        """The UNet input ``(U + B, ...)`` from per-row inputs ``(B, ...)``.

        Latents and timesteps are the same for both halves (pass them once); for the text context pass
        the prompt embeddings as ``conditional`` and the negative-prompt embeddings as ``unconditional``.
        """
        assert conditional.shape[0] == self.batch_size, (conditional.shape, self.batch_size)
        unconditional = conditional if unconditional is None else unconditional
        assert unconditional.shape == conditional.shape, (unconditional.shape, conditional.shape)
        if len(self.unconditional_rows) == 0:
            return conditional
        unconditional_part = unconditional if self._all_rows_guided() else take_rows(unconditional,
                                                                                    self.unconditional_rows)
        return concatenate([unconditional_part, conditional])

    def combine(self, model_output: Any, to_array: ArrayConverter | None = None) -> Any:
        """The guided prediction ``(B, ...)`` from the UNet output ``(U + B, ...)`` of ``stack``'s batch."""
        assert model_output.shape[0] == self.unet_batch_size, (model_output.shape, self.unet_batch_size)
        unconditional_count = len(self.unconditional_rows)
        if unconditional_count == 0:
            return model_output
        noise_pred_cond = model_output[unconditional_count:]
        if self._all_rows_guided():
            noise_pred_uncond = model_output[:unconditional_count]
        else:
            # a row without an unconditional pass reads its own conditional output: eps_c + s * 0 = eps_c exactly
            source = unconditional_count + np.arange(self.batch_size, dtype=np.int64)
            source[self.unconditional_rows] = np.arange(unconditional_count, dtype=np.int64)
            noise_pred_uncond = take_rows(model_output, source)
        return apply_guidance(noise_pred_uncond, noise_pred_cond, self.guidance_scale, to_array)

    def _all_rows_guided(self) -> bool:
        return len(self.unconditional_rows) == self.batch_size


def _check_guidance_scale(guidance_scale: float | Sequence[float], batch: int) -> np.ndarray:
    """``(B,) float64``; ``ValueError`` naming the first value that is not a finite number >= 0."""
    values = np.asarray(guidance_scale)
    if values.dtype.kind not in "iuf" or values.dtype == np.bool_:
        raise ValueError(f"guidance_scale is {guidance_scale!r}; expected a number >= 0")
    if values.ndim > 1 or (values.ndim == 1 and values.shape[0] != batch):
        raise ValueError(f"guidance_scale has shape {values.shape}; expected ({batch},) or a single number")
    values = np.broadcast_to(values.astype(np.float64), (batch,))
    for value in values.tolist():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"guidance_scale {value!r} is not valid; expected a finite number >= 0")
    return values
