"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): a second-order multistep solver on x_0, and its
SDE form (DPM-Solver++(2M) SDE, section 4 of the same paper), which adds fresh noise on every step.

The same numbers as diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"`` (or
``"sde-dpmsolver++"`` with the same noise), ``solver_order=2``, the midpoint solver type, a final sigma of 0 and
``use_karras_sigmas`` on or off. The first step and the last (which lands on sigma 0, i.e. on x_0) are first order;
every other step also uses the x_0 predicted on the row's previous step, its one array of history. Latents are the
usual variance-preserving ones: x_T is unit noise and the UNet sees them unscaled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ldm_runtime.arrays import ArrayConverter
from ldm_runtime.schedulers.schedule import NoiseSchedule
from ldm_runtime.schedulers.sigmas import (
    SigmaSampler,
    SigmaTrajectory,
    check_spacing,
    check_steps,
    row_coefficients,
    row_sigmas,
    solver_trajectory,
)


@dataclass(frozen=True)
class DPMSolverSampler(SigmaSampler):
    """DPM-Solver++(2M) over ``schedule``; ``karras`` spaces the sigmas as Karras et al. (rho 7) instead of the
    timesteps; ``sde`` takes the stochastic form; ``timestep_spacing`` and ``steps_offset`` as diffusers' (defaults:
    its defaults)."""

    schedule: NoiseSchedule
    karras: bool = False
    sde: bool = False
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    history_size = 1

    def __post_init__(self) -> None:
        check_spacing(self.name, self.schedule, self.timestep_spacing, self.steps_offset)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "dpmpp-2m" + ("-sde" if self.sde else "") + ("-karras" if self.karras else "")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.sde

    def trajectory(self, num_inference_steps: int) -> SigmaTrajectory:
        steps = check_steps(self.schedule, num_inference_steps)
        return solver_trajectory(self.schedule, steps, self.karras, self.timestep_spacing, self.steps_offset)

    def step(self, model_output: Any, trajectories: Sequence[SigmaTrajectory], step_indices: Sequence[int],
             sample: Any, history: tuple[Any, ...] = (), noise: Any = None,
             to_array: ArrayConverter | None = None) -> tuple[Any, tuple[Any, ...]]:
        assert model_output.shape == sample.shape, (model_output.shape, sample.shape)
        sigma_prev, sigma, sigma_next = row_sigmas(trajectories, step_indices)
        second_order = np.array([0 < index < len(trajectory) - 1
                                 for trajectory, index in zip(trajectories, step_indices)])
        assert history or not second_order.any(), "second-order steps need the previous x_0"

        # the variance-preserving scales alpha = 1 / sqrt(sigma^2 + 1) and alpha * sigma, at this step and the next
        alpha = 1.0 / np.sqrt(sigma**2 + 1.0)
        alpha_next = 1.0 / np.sqrt(sigma_next**2 + 1.0)
        if self.schedule.prediction_type == "epsilon":  # x_0 = (x - alpha sigma eps) / alpha
            sample_scale, output_scale = 1.0 / alpha, -sigma
        else:  # v_prediction: x_0 = alpha x - alpha sigma v
            sample_scale, output_scale = alpha, -alpha * sigma
        # exp(-h) = sigma_next / sigma, h the step in log signal-to-noise ratio; 0 on the step onto sigma 0
        decay = sigma_next / sigma
        keep_scale = alpha_next * sigma_next / (alpha * sigma)
        noise_scale = np.zeros_like(sigma)
        if self.sde:  # the SDE damps x by another exp(-h) and puts the variance it removes back as noise
            keep_scale = keep_scale * decay
            decay = decay**2
            noise_scale = alpha_next * sigma_next * np.sqrt(1.0 - decay)
        first_order_scale = alpha_next * (1.0 - decay)
        with np.errstate(divide="ignore", invalid="ignore"):  # rows at step 0 or the last step have no ratio r0
            ratio = np.log(sigma_prev / sigma) / np.log(sigma / sigma_next)
        correction_scale = np.where(second_order, 0.5 * first_order_scale / np.where(second_order, ratio, 1.0), 0.0)
        sample_scale, output_scale, keep_scale, first_order_scale, correction_scale, noise_scale = row_coefficients(
            np.stack([sample_scale, output_scale, keep_scale, first_order_scale, correction_scale, noise_scale]),
            sample, to_array)

        pred_original_sample = sample * sample_scale + model_output * output_scale
        (previous,) = history or (pred_original_sample,)
        prev_sample = (keep_scale * sample + first_order_scale * pred_original_sample
                       + correction_scale * (pred_original_sample - previous))
        if self.sde:
            prev_sample = prev_sample + noise_scale * self.check_noise(noise, sample)
        return prev_sample, (pred_original_sample,)
