"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"): a multistep predictor on x_0 (UniP)
whose result is corrected with the next step's model output (UniC) before the next prediction, so the corrector
costs no extra UNet call.

The same numbers as diffusers' ``UniPCMultistepScheduler`` with its defaults (the B(h) = e^h - 1 variant "bh2",
x_0 prediction, the corrector on every step, lower orders on the first steps and the last ones) and
``solver_order`` 2 or 3. A row's history is its last ``order`` predicted x_0, newest first, and the sample its last
predictor started from (the corrector's x_{t-1}); the trajectory is DPM-Solver++'s. Every step's combination of
those arrays is computed per row on the host in float64.
"""

from __future__ import annotations

import math
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
    solver_trajectory,
)

UNIPC_ORDERS = (2, 3)


@dataclass(frozen=True)
class UniPCSampler(SigmaSampler):
    """UniPC of ``order`` 2 or 3 over ``schedule``; ``timestep_spacing`` and ``steps_offset`` as diffusers'
    (defaults: its defaults)."""

    schedule: NoiseSchedule
    order: int = 2
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        if self.order not in UNIPC_ORDERS:
            raise ValueError(f"unipc order {self.order!r} is not one of {UNIPC_ORDERS}")
        check_spacing(self.name, self.schedule, self.timestep_spacing, self.steps_offset)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "unipc" if self.order == 2 else f"unipc-{self.order}"

    @property
    def history_size(self) -> int:  # type: ignore[override]
        return self.order + 1

    def trajectory(self, num_inference_steps: int) -> SigmaTrajectory:
        steps = check_steps(self.schedule, num_inference_steps)
        return solver_trajectory(self.schedule, steps, False, self.timestep_spacing, self.steps_offset)

    def step(self, model_output: Any, trajectories: Sequence[SigmaTrajectory], step_indices: Sequence[int],
             sample: Any, history: tuple[Any, ...] = (), noise: Any = None,
             to_array: ArrayConverter | None = None) -> tuple[Any, tuple[Any, ...]]:
        assert model_output.shape == sample.shape, (model_output.shape, sample.shape)
        assert history or not any(step_indices), "steps after the first need the history"
        *outputs, last_sample = self.filled_history(history, sample)
        rows = np.array([self._row_weights(trajectory, index) for trajectory, index in zip(trajectories, step_indices)])
        weights = row_coefficients(rows.T, sample, to_array)
        sample_scale, output_scale = weights[:2]
        # the corrected sample: sample * c_sample + last_sample * c_last + x_0 * c_x0 + sum_i outputs[i] * c_i
        corrector = weights[2:6 + self.order - 1]
        predictor = weights[6 + self.order - 1:]

        pred_original_sample = sample * sample_scale + model_output * output_scale
        corrected = sample * corrector[0] + last_sample * corrector[1] + pred_original_sample * corrector[2]
        for output, weight in zip(outputs, corrector[3:]):
            corrected = corrected + output * weight
        # the next sample: corrected * p_sample + x_0 * p_x0 + sum_i outputs[i] * p_i (the newest order - 1 of them)
        prev_sample = corrected * predictor[0] + pred_original_sample * predictor[1]
        for output, weight in zip(outputs, predictor[2:]):
            prev_sample = prev_sample + output * weight
        return prev_sample, (pred_original_sample, *outputs[:-1], corrected)

    def _row_weights(self, trajectory: SigmaTrajectory, index: int) -> np.ndarray:
        """``(2 + (3 + order) + (2 + order - 1),) float64``: the x_0 scales, the corrector's weights and the
        predictor's, for a row at step ``index`` of ``trajectory``."""
        sigmas, steps = trajectory.sigmas, len(trajectory)
        assert 0 <= index < steps, (index, steps)
        alpha = 1.0 / math.sqrt(sigmas[index] ** 2 + 1.0)
        if self.schedule.prediction_type == "epsilon":  # x_0 = (x - alpha sigma eps) / alpha
            to_x0 = [1.0 / alpha, -sigmas[index]]
        else:  # v_prediction: x_0 = alpha x - alpha sigma v
            to_x0 = [alpha, -alpha * sigmas[index]]

        corrector = np.zeros(3 + self.order)
        if index == 0:
            corrector[0] = 1.0
        else:  # UniC with the order of the previous step's predictor, on the outputs before this step's
            order = min(self.order, steps - index + 1, index)
            keep, newest, earlier, current = _update_weights(sigmas, index - 1, order, corrector=True)
            corrector[1], corrector[2], corrector[3] = keep, current, newest
            corrector[4:4 + order - 1] = earlier

        predictor = np.zeros(2 + self.order - 1)
        order = min(self.order, steps - index, index + 1)
        keep, newest, earlier, _ = _update_weights(sigmas, index, order, corrector=False)
        predictor[0], predictor[1] = keep, newest
        predictor[2:2 + order - 1] = earlier
        return np.concatenate([to_x0, corrector, predictor])


def _update_weights(sigmas: np.ndarray, start: int, order: int,
                    corrector: bool) -> tuple[float, float, np.ndarray, float]:
    """The UniP (``corrector`` False) or UniC update of ``order`` from sigma ``sigmas[start]`` to
    ``sigmas[start + 1]`` (diffusers' ``multistep_uni_p_bh_update`` / ``multistep_uni_c_bh_update``, bh2, x_0
    prediction), as weights: ``(keep, newest, earlier, current)`` for the sample at ``start``, the x_0 predicted
    there, the ``order - 1`` x_0 predicted before it (newest first) and, for UniC, the x_0 predicted at
    ``start + 1``."""
    sigma, sigma_next = sigmas[start], sigmas[start + 1]
    alpha_next = 1.0 / math.sqrt(sigma_next**2 + 1.0)
    alpha = 1.0 / math.sqrt(sigma**2 + 1.0)
    keep = alpha_next * sigma_next / (alpha * sigma)
    if sigma_next == 0:  # onto x_0: h is infinite and only a first-order predictor reaches here
        assert order == 1 and not corrector, (order, corrector)
        return keep, alpha_next, np.zeros(0), 0.0
    # lambda = -log(sigma): h is the step in log signal-to-noise ratio, rks the earlier steps' offsets relative to it
    step = math.log(sigma) - math.log(sigma_next)
    rks = np.array([(math.log(sigma) - math.log(sigmas[start - i])) / step for i in range(1, order)] + [1.0])
    hh = -step
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    powers, b = [], []
    for i in range(1, order + 1):
        powers.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    matrix, rhs = np.array(powers), np.array(b)
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(matrix, rhs)
        rhos_earlier, rho_current = rhos[:-1], rhos[-1]
    else:
        rho_current = 0.0
        if order == 1:
            rhos_earlier = np.zeros(0)
        elif order == 2:
            rhos_earlier = np.array([0.5])
        else:
            rhos_earlier = np.linalg.solve(matrix[:-1, :-1], rhs[:-1])
    # x_next = keep x - alpha_next h_phi_1 m0 - alpha_next B(h) (sum_i rho_i (m_i - m0) / r_i + rho_current (m_t - m0))
    scale = -alpha_next * b_h
    earlier = scale * rhos_earlier / rks[:-1]
    newest = -alpha_next * h_phi_1 - earlier.sum() - scale * rho_current
    return keep, newest, earlier, scale * rho_current
