"""LCM multistep sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 3): each step maps x_t to x_0
through the consistency boundary condition and noises it afresh to the next timestep (the last step does not).

The same numbers as diffusers' ``LCMScheduler`` (with the same noise) for its defaults: the N timesteps are taken
evenly by index from the ``original_inference_steps`` = 50 timesteps of distillation (T / 50 - 1, ..., T - 1), so N
is at most 50. It is written for consistency-distilled models and runs on any model, as diffusers' does.
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
    read_only_trajectory,
    row_coefficients,
    schedule_sigmas,
)

SIGMA_DATA = 0.5  # the boundary condition's data scale (Song et al. 2023, "Consistency Models")


def boundary_scalings(timestep: Any, timestep_scaling: float) -> tuple[Any, Any]:
    """(c_skip, c_out) of the consistency boundary condition at ``timestep`` (a number or a numpy array of them):
    what a consistency model's x_0 prediction is mixed with its input by, here and in ``ldm-train lcm``."""
    scaled = timestep * timestep_scaling
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / np.sqrt(scaled**2 + SIGMA_DATA**2)


@dataclass(frozen=True)
class DistilledStepsSampler(SigmaSampler):
    """A sampler of consistency-distilled models (lcm, tcd) over ``schedule``: its N timesteps are taken evenly by
    index from the ``original_inference_steps`` timesteps of distillation (T / original - 1, ..., T - 1), as
    diffusers' LCMScheduler and TCDScheduler take them (default: their default, 50)."""

    schedule: NoiseSchedule
    original_inference_steps: int = 50

    def __post_init__(self) -> None:
        count = self.schedule.num_train_timesteps
        steps = self.original_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= count:
            raise ValueError(f"{self.name} original_inference_steps {self.original_inference_steps!r} is out of "
                             f"range; expected an integer from 1 to {count}")

    def trajectory(self, num_inference_steps: int) -> SigmaTrajectory:
        original = self.original_inference_steps
        valid = isinstance(num_inference_steps, (int, np.integer)) and not isinstance(num_inference_steps, bool)
        if not valid or not 1 <= num_inference_steps <= original:
            raise ValueError(f"num_inference_steps is {num_inference_steps!r}; expected an integer from 1 to "
                             f"{original} (the {self.name} sampler takes its steps from {original} distillation "
                             f"timesteps)")
        stride = self.schedule.num_train_timesteps // original
        distilled = (np.arange(1, original + 1) * stride - 1)[::-1]
        indices = np.floor(np.linspace(0, original, num=int(num_inference_steps), endpoint=False)).astype(np.int64)
        timesteps = distilled[indices]
        return read_only_trajectory(timesteps, schedule_sigmas(self.schedule)[timesteps])


@dataclass(frozen=True)
class LCMSampler(DistilledStepsSampler):
    """LCM over ``schedule``; ``original_inference_steps`` and ``timestep_scaling`` as diffusers' (defaults: its
    defaults)."""

    timestep_scaling: float = 10.0
    name: ClassVar[str] = "lcm"
    stochastic: ClassVar[bool] = True

    def step(self, model_output: Any, trajectories: Sequence[SigmaTrajectory], step_indices: Sequence[int],
             sample: Any, history: tuple[Any, ...] = (), noise: Any = None,
             to_array: ArrayConverter | None = None) -> tuple[Any, tuple[Any, ...]]:
        assert model_output.shape == sample.shape, (model_output.shape, sample.shape)
        rows = []
        for trajectory, index in zip(trajectories, step_indices):
            assert 0 <= index < len(trajectory), (index, len(trajectory))
            last = index == len(trajectory) - 1
            timestep = int(trajectory.timesteps[index])
            alpha = self.schedule.alphas_cumprod[timestep]
            alpha_next = self.schedule.alphas_cumprod[int(trajectory.timesteps[index + (not last)])]
            skip, out = boundary_scalings(timestep, self.timestep_scaling)
            if self.schedule.prediction_type == "epsilon":  # x_0 = (x - sqrt(1 - a) eps) / sqrt(a)
                sample_scale, output_scale = 1.0 / np.sqrt(alpha), -np.sqrt(1.0 - alpha) / np.sqrt(alpha)
            else:  # v_prediction: x_0 = sqrt(a) x - sqrt(1 - a) v
                sample_scale, output_scale = np.sqrt(alpha), -np.sqrt(1.0 - alpha)
            # the last step returns the denoised x_0 itself; the others noise it to the next timestep
            rows.append((out * sample_scale + skip, out * output_scale, 1.0 if last else np.sqrt(alpha_next),
                         0.0 if last else np.sqrt(1.0 - alpha_next)))
        sample_scale, output_scale, denoised_scale, noise_scale = row_coefficients(
            np.array(rows, dtype=np.float64).T, sample, to_array)
        denoised = sample * sample_scale + model_output * output_scale
        return denoised * denoised_scale + noise_scale * self.check_noise(noise, sample), ()
