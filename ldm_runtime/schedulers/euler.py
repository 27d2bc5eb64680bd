"""Euler's method on the probability-flow ODE in sigma (Karras et al. 2022, Algorithm 2 without churn), and its
ancestral form, which steps down to a lower sigma and adds fresh noise back up to the next one.

The same numbers as diffusers' ``EulerDiscreteScheduler`` (deterministic: s_churn 0) and
``EulerAncestralDiscreteScheduler`` (with the same noise) for the same spacing, linear sigma interpolation and a
final sigma of 0. The latents live in sigma space: x_T is unit noise times
``initial_noise_scale``, and the UNet sees x / sqrt(sigma^2 + 1). Engines take integer timesteps, so where
"linspace" gives fractional ones (e.g. 25 steps of 1000) the pipeline hands the UNet the nearest integer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np

from ldm_runtime.arrays import ArrayConverter
from ldm_runtime.schedulers.schedule import NoiseSchedule
from ldm_runtime.schedulers.sigmas import (
    SigmaSampler,
    SigmaTrajectory,
    check_spacing,
    check_steps,
    read_only_trajectory,
    row_coefficients,
    row_sigmas,
    schedule_sigmas,
    spaced_timesteps,
)


@dataclass(frozen=True)
class EulerSampler(SigmaSampler):
    """Euler over ``schedule``; ``timestep_spacing`` and ``steps_offset`` as diffusers' (defaults: its defaults)."""

    schedule: NoiseSchedule
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    name: ClassVar[str] = "euler"

    def __post_init__(self) -> None:
        check_spacing(self.name, self.schedule, self.timestep_spacing, self.steps_offset)

    def trajectory(self, num_inference_steps: int) -> SigmaTrajectory:
        steps = check_steps(self.schedule, num_inference_steps)
        timesteps = spaced_timesteps(self.schedule.num_train_timesteps, steps, self.timestep_spacing,
                                     self.steps_offset, endpoint_extra=0)
        if timesteps[0] >= self.schedule.num_train_timesteps:
            raise ValueError(f"num_inference_steps {steps} with steps_offset {self.steps_offset} starts at timestep "
                             f"{timesteps[0]:g}; expected timesteps below {self.schedule.num_train_timesteps}")
        # diffusers keeps Euler's timesteps in float32: the sigmas are interpolated at those values
        timesteps = timesteps.astype(np.float32).astype(np.float64)
        table = schedule_sigmas(self.schedule)
        return read_only_trajectory(timesteps, np.interp(timesteps, np.arange(len(table)), table))

    def initial_noise_scale(self, trajectory: SigmaTrajectory) -> float:
        largest = float(trajectory.sigmas.max())
        return largest if self.timestep_spacing != "leading" else float(np.sqrt(largest**2 + 1.0))

    def input_scales(self, trajectories: Sequence[SigmaTrajectory], step_indices: Sequence[int]) -> np.ndarray:
        sigma = row_sigmas(trajectories, step_indices)[1]
        return np.sqrt(sigma**2 + 1.0)

    def noise_scales(self, trajectory: SigmaTrajectory, index: int) -> tuple[float, float]:
        """``(1, sigma)``: latents in sigma space are x_0 + sigma eps."""
        return 1.0, float(trajectory.sigmas[index])

    def step(self, model_output: Any, trajectories: Sequence[SigmaTrajectory], step_indices: Sequence[int],
             sample: Any, history: tuple[Any, ...] = (), noise: Any = None,
             to_array: ArrayConverter | None = None) -> tuple[Any, tuple[Any, ...]]:
        assert model_output.shape == sample.shape, (model_output.shape, sample.shape)
        _, sigma, sigma_next = row_sigmas(trajectories, step_indices)
        target, noise_scale = self._step_target(sigma, sigma_next)
        if self.schedule.prediction_type == "epsilon":
            output_scale, sample_scale = -sigma, np.ones_like(sigma)
        else:  # v_prediction, in sigma space: x_0 = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1)
            output_scale, sample_scale = -sigma / np.sqrt(sigma**2 + 1.0), 1.0 / (sigma**2 + 1.0)
        sigma_t, step_size, output_scale, sample_scale, noise_scale = row_coefficients(
            np.stack([sigma, target - sigma, output_scale, sample_scale, noise_scale]), sample, to_array)
        pred_original_sample = model_output * output_scale + sample * sample_scale
        derivative = (sample - pred_original_sample) / sigma_t
        prev_sample = sample + derivative * step_size
        if self.stochastic:
            prev_sample = prev_sample + noise_scale * self.check_noise(noise, sample)
        return prev_sample, ()

    def _step_target(self, sigma: np.ndarray, sigma_next: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(B,)`` each: the sigma the ODE step lands on and the scale of the noise added after it."""
        return sigma_next, np.zeros_like(sigma)


@dataclass(frozen=True)
class EulerAncestralSampler(EulerSampler):
    """Euler ancestral over ``schedule``: each step goes down to sigma_down and adds sigma_up of fresh noise, where
    sigma_up^2 + sigma_down^2 = sigma_next^2 and sigma_up^2 is the variance of q(x_next | x, x_0)."""

    name: ClassVar[str] = "euler-a"
    stochastic: ClassVar[bool] = True

    def _step_target(self, sigma: np.ndarray, sigma_next: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sigma_up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        return sigma_next**2 / sigma, sigma_up  # sigma_down = sqrt(sigma_next^2 - sigma_up^2), without the rounding
