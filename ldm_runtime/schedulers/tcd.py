"""TCD sampling (Zheng et al. 2024, "Trajectory Consistency Distillation", strategic stochastic sampling): each step
predicts x_0 and the noise at timestep t, moves them deterministically to an earlier timestep s = floor((1 - gamma)
t'), t' the next timestep of the walk, and noises the result forward from s to t'. gamma (a request's ``eta``, as
diffusers' pipelines hand ``eta`` to ``TCDScheduler.step``) runs from 0, a deterministic DDIM walk of the model's
predictions, to 1, LCM's walk: x_0, noised afresh to each next timestep.

The same numbers as diffusers' ``TCDScheduler`` (with the same noise) for its defaults: the timesteps are the lcm
sampler's, taken from the ``original_inference_steps`` = 50 timesteps of distillation; s is computed in float32, as
diffusers computes it; the last step returns the walk at s = 0 (timestep 0's noise level, not x_0 itself). It is
written for consistency-distilled models (TCD's and LCM's) and runs on any model, as diffusers' does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np

from ldm_runtime.arrays import ArrayConverter
from ldm_runtime.schedulers.ddim import check_eta
from ldm_runtime.schedulers.lcm import DistilledStepsSampler
from ldm_runtime.schedulers.sigmas import SigmaTrajectory, row_coefficients


@dataclass(frozen=True)
class TCDSampler(DistilledStepsSampler):
    """TCD over ``schedule``; ``original_inference_steps`` as diffusers' (default: its default)."""

    name: ClassVar[str] = "tcd"
    stochastic: ClassVar[bool] = True
    takes_eta: ClassVar[bool] = True

    def step(self, model_output: Any, trajectories: Sequence[SigmaTrajectory], step_indices: Sequence[int],
             sample: Any, history: tuple[Any, ...] = (), noise: Any = None,
             to_array: ArrayConverter | None = None, eta: Any = None) -> tuple[Any, tuple[Any, ...]]:
        """As ``SigmaSampler.step``; ``eta``: gamma, one number or one per row, each from 0 to 1 (None: 0, as a
        request's default eta; TCD's authors sample with 0.3). ``noise`` is needed where some row has gamma > 0 and
        is not at its last step."""
        assert model_output.shape == sample.shape, (model_output.shape, sample.shape)
        gammas = np.broadcast_to(np.asarray(0.0 if eta is None else eta, dtype=np.float64),
                                 (len(trajectories),))
        check_eta(gammas)
        alphas_cumprod = self.schedule.alphas_cumprod
        rows = []
        for trajectory, index, gamma in zip(trajectories, step_indices, gammas):
            assert 0 <= index < len(trajectory), (index, len(trajectory))
            last = index == len(trajectory) - 1
            timestep = int(trajectory.timesteps[index])
            following = 0 if last else int(trajectory.timesteps[index + 1])
            earlier = int(np.floor(np.float32(1.0 - gamma) * np.float32(following)))  # float32, as diffusers
            alpha, alpha_next, alpha_s = (float(alphas_cumprod[t]) for t in (timestep, following, earlier))
            # the predictions at t moved to s: sqrt(a_s) x_0 + sqrt(1 - a_s) eps, a linear map of (x_t, output)
            if self.schedule.prediction_type == "epsilon":
                sample_scale = np.sqrt(alpha_s / alpha)
                output_scale = np.sqrt(1.0 - alpha_s) - np.sqrt(alpha_s) * np.sqrt(1.0 - alpha) / np.sqrt(alpha)
            else:  # v_prediction: x_0 = sqrt(a) x - sqrt(1 - a) v, eps = sqrt(a) v + sqrt(1 - a) x
                sample_scale = np.sqrt(alpha_s * alpha) + np.sqrt((1.0 - alpha_s) * (1.0 - alpha))
                output_scale = np.sqrt((1.0 - alpha_s) * alpha) - np.sqrt(alpha_s * (1.0 - alpha))
            # then forward from s to the next timestep with fresh noise (not at gamma 0, where s is that timestep,
            # nor at the last step)
            forward, noise_scale = 1.0, 0.0
            if gamma > 0 and not last:
                forward, noise_scale = np.sqrt(alpha_next / alpha_s), np.sqrt(1.0 - alpha_next / alpha_s)
            rows.append((forward * sample_scale, forward * output_scale, noise_scale))
        coefficients = np.array(rows, dtype=np.float64).T
        sample_scale, output_scale, noise_scale = row_coefficients(coefficients, sample, to_array)
        moved = sample * sample_scale + model_output * output_scale
        if not coefficients[2].any():
            return moved, ()
        return moved + noise_scale * self.check_noise(noise, sample), ()
