"""Samplers over the noise level sigma = sqrt((1 - a_t) / a_t) (Karras et al. 2022), written once for every array type.

A ``SigmaSampler`` plans a request's ``SigmaTrajectory`` (the timesteps the UNet sees and the sigmas between them,
as diffusers' ``set_timesteps`` computes them for the same spacing) and updates a batch whose rows may sit at
different steps of different trajectories: per-row scalars are computed on the host in float64 and handed to the
engine's array type by a converter, as in ``ddim.py``; the array math uses only ``+ - * /``. The pipeline multiplies
x_T by ``initial_noise_scale``, divides each UNet input by ``input_scales`` (sqrt(sigma^2 + 1) for Euler), keeps
the ``history_size`` arrays each row's ``step`` returns (a multistep solver's earlier model outputs) and hands them
to the row's next step, and draws each row's per-step noise from its seed for a ``stochastic`` sampler.
Image-to-image begins a row part-way (``trajectory_from``: its first step is a first step, with no history, as
diffusers' schedulers begin after ``set_begin_index``) from an image's latents noised as ``noise_scales`` says.

Where the numbers differ from diffusers' on purpose: "trailing" plans exactly N steps for the 62 step counts of 1000
where diffusers' float ``arange`` adds a last timestep -1 (``spaced_timesteps``), and Karras timesteps are rounded
from the float64 schedule, where diffusers' float32 ``alphas_cumprod`` puts some of them one timestep away (diffusers
with float64 ``alphas_cumprod`` gives ours). LCM image-to-image slices the N-step walk as SD's img2img pipeline does
(N = 4 at strength 0.5: timesteps 499, 259), not as diffusers' LatentConsistencyModelImg2ImgPipeline, which plans
all N steps below the strength (499, 379, 259, 139).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ldm_runtime.arrays import ArrayConverter, host_to_array_like
from ldm_runtime.schedulers.schedule import NoiseSchedule

SIGMA_SPACINGS = ("linspace", "leading", "trailing")
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5


@dataclass(frozen=True, eq=False)
class SigmaTrajectory:
    """One request's walk: ``timesteps`` ``(N,) float64`` (what the UNet sees; fractional for Euler's "linspace")
    and ``sigmas`` ``(N + 1,) float64``, descending, ending at 0. Both read-only."""

    timesteps: np.ndarray
    sigmas: np.ndarray

    def __len__(self) -> int:
        return len(self.timesteps)

    def begun_at(self, start: int) -> "SigmaTrajectory":
        """The walk from step ``start`` on (``len(self)``: no steps left, the sigmas just the final 0)."""
        assert 0 <= start <= len(self), (start, len(self))
        return SigmaTrajectory(self.timesteps[start:], self.sigmas[start:])


def schedule_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    """``(T,) float64``: sigma at each training timestep, ascending."""
    alphas_cumprod = schedule.alphas_cumprod
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def check_spacing(name: str, schedule: NoiseSchedule, timestep_spacing: Any, steps_offset: Any) -> None:
    """``ValueError`` in one sentence for a spacing that is not one of ``SIGMA_SPACINGS`` or a ``steps_offset`` that
    is not an integer from 0 to T - 1 (a sampler's own settings, checked when it is made)."""
    if timestep_spacing not in SIGMA_SPACINGS:
        raise ValueError(f"{name} timestep_spacing {timestep_spacing!r} is not one of {SIGMA_SPACINGS}")
    count = schedule.num_train_timesteps
    if (isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer))
            or not 0 <= steps_offset < count):
        raise ValueError(f"{name} steps_offset is {steps_offset!r}; expected an integer from 0 to {count - 1}")


def spaced_timesteps(count: int, steps: int, spacing: str, steps_offset: int, endpoint_extra: int) -> np.ndarray:
    """``(steps,) float64`` descending timesteps as diffusers spaces them: "linspace" and "leading" space
    ``steps + endpoint_extra`` points and keep the first ``steps`` (DPM-Solver spaces N + 1 and drops the last).
    "trailing" keeps the first ``steps`` of diffusers' float ``arange``, which for 62 step counts of 1000 (61, 103,
    121, ...) ends in one more point, timestep -1: diffusers then plans N + 1 calls, the last at timestep -1."""
    points = steps + endpoint_extra
    if spacing == "linspace":
        timesteps = np.linspace(0, count - 1, points)[::-1]
    elif spacing == "leading":
        timesteps = (np.arange(0, points) * (count // points)).round()[::-1] + steps_offset
    else:
        assert spacing == "trailing", spacing
        timesteps = np.round(np.arange(count, 0, -count / steps)[:steps]) - 1
    return np.ascontiguousarray(timesteps[:steps], dtype=np.float64)


def karras_sigmas(sigmas: np.ndarray, steps: int) -> np.ndarray:
    """``(steps,) float64``: Karras et al.'s rho = 7 ramp from the largest to the smallest of ``sigmas``."""
    ramp = np.linspace(0, 1, steps)
    low, high = sigmas.min() ** (1 / KARRAS_RHO), sigmas.max() ** (1 / KARRAS_RHO)
    return (high + ramp * (low - high)) ** KARRAS_RHO


def sigma_to_timestep(sigma: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """The fractional timestep of each sigma: linear interpolation in log sigma between the training timesteps."""
    log_sigmas = np.log(sigmas)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(sigmas) - 2)
    weight = np.clip((log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low]), 0, 1)
    return low + weight


def solver_trajectory(schedule: NoiseSchedule, steps: int, karras: bool, spacing: str,
                      steps_offset: int) -> SigmaTrajectory:
    """The trajectory of diffusers' multistep solvers (DPM-Solver++, UniPC): N of N + 1 spaced integer timesteps, or
    Karras sigmas and their rounded timesteps; ``ValueError`` where two timesteps coincide or one passes T - 1."""
    count = schedule.num_train_timesteps
    table = schedule_sigmas(schedule)
    if karras:
        sigmas = karras_sigmas(table, steps)
        timesteps = sigma_to_timestep(sigmas, table).round()
    else:
        timesteps = spaced_timesteps(count, steps, spacing, steps_offset, endpoint_extra=1).round()
        sigmas = np.interp(timesteps, np.arange(count), table)
    if timesteps[0] >= count or np.any(np.diff(sigmas) >= 0):
        if timesteps[0] >= count:
            found = f"starts at timestep {int(timesteps[0])}"
        else:
            repeat = int(np.argmax(np.diff(sigmas) >= 0))
            found = f"gives timestep {int(timesteps[repeat + 1])} after {int(timesteps[repeat])}"
        raise ValueError(f"num_inference_steps {steps} {found}; expected distinct timesteps below {count} (use fewer "
                         f"steps)")
    return read_only_trajectory(timesteps, sigmas)


def check_steps(schedule: NoiseSchedule, num_inference_steps: Any) -> int:
    """``num_inference_steps`` as an int; ``ValueError`` unless it is an integer from 1 to T."""
    count = schedule.num_train_timesteps
    valid = isinstance(num_inference_steps, (int, np.integer)) and not isinstance(num_inference_steps, bool)
    if not valid or not 1 <= num_inference_steps <= count:
        raise ValueError(f"num_inference_steps is {num_inference_steps!r}; expected an integer from 1 to {count}")
    return int(num_inference_steps)


def read_only_trajectory(timesteps: np.ndarray, sigmas: np.ndarray) -> SigmaTrajectory:
    """The trajectory of N timesteps and their N sigmas, with the final sigma 0 appended, as read-only arrays."""
    timesteps = np.ascontiguousarray(timesteps, dtype=np.float64)
    sigmas = np.append(np.asarray(sigmas, dtype=np.float64), 0.0)
    assert sigmas.shape == (len(timesteps) + 1,) and np.all(np.diff(sigmas) <= 0), sigmas
    timesteps.flags.writeable = False
    sigmas.flags.writeable = False
    return SigmaTrajectory(timesteps, sigmas)


def row_sigmas(trajectories: Sequence[SigmaTrajectory], step_indices: Sequence[int]) -> np.ndarray:
    """``(3, B) float64``: each row's previous sigma (its current one at step 0), current sigma and next sigma."""
    rows = []
    for trajectory, index in zip(trajectories, step_indices):
        assert 0 <= index < len(trajectory), (index, len(trajectory))
        rows.append((trajectory.sigmas[max(index - 1, 0)], trajectory.sigmas[index], trajectory.sigmas[index + 1]))
    return np.array(rows, dtype=np.float64).T


def row_coefficients(coefficients: np.ndarray, sample: Any, to_array: ArrayConverter | None) -> tuple[Any, ...]:
    """``(K, B)`` host coefficients as K arrays of ``sample``'s type shaped to broadcast over ``(C, h, w)``,
    in one host-to-device copy."""
    convert = to_array or host_to_array_like
    count, batch = coefficients.shape
    assert batch == sample.shape[0], (coefficients.shape, sample.shape)
    converted = convert(coefficients.reshape((count, batch) + (1,) * (sample.ndim - 1)), sample)
    return tuple(converted[i] for i in range(count))


class SigmaSampler:
    """What the pipeline asks of a sampler other than DDIM; subclasses plan and step. Holds no per-request state:
    a row's state between steps is the ``history_size`` arrays its ``step`` returns. A ``stochastic`` sampler's
    ``step`` takes unit Gaussian noise for every row; one that ``takes_eta`` takes each row's request ``eta`` too, as
    ``step(..., eta=)``."""

    name: str
    schedule: NoiseSchedule
    history_size: int = 0
    stochastic: bool = False
    takes_eta: bool = False

    def trajectory(self, num_inference_steps: int) -> SigmaTrajectory:
        raise NotImplementedError

    def trajectory_from(self, num_inference_steps: int, start: int) -> Any:
        """The trajectory of ``num_inference_steps`` begun at step ``start`` (image-to-image): its last
        ``num_inference_steps - start`` steps, the first of them taken as a first step."""
        return self.trajectory(num_inference_steps).begun_at(start)

    def noise_scales(self, trajectory: Any, index: int) -> tuple[float, float]:
        """``(a, b)``: the latents at step ``index`` of ``trajectory`` (before its UNet call; ``len(trajectory)``: the
        end, x_0 itself) are ``a x_0 + b eps`` in this sampler's latents, as its diffusers scheduler's ``add_noise``
        makes them: on variance-preserving latents alpha and alpha sigma, alpha = 1 / sqrt(sigma^2 + 1)."""
        sigma = float(trajectory.sigmas[index])
        alpha = 1.0 / np.sqrt(sigma**2 + 1.0)
        return float(alpha), float(alpha * sigma)

    def initial_noise_scale(self, trajectory: SigmaTrajectory) -> float:
        """x_T = unit noise times this (diffusers' init_noise_sigma); 1 on variance-preserving latents."""
        return 1.0

    def input_scales(self, trajectories: Sequence[SigmaTrajectory], step_indices: Sequence[int]) -> np.ndarray:
        """``(B,) float64``: each row's UNet input is its latents divided by this."""
        return np.ones(len(trajectories), dtype=np.float64)

    def step(self, model_output: Any, trajectories: Sequence[Any], step_indices: Sequence[int], sample: Any,
             history: tuple[Any, ...] = (), noise: Any = None,
             to_array: ArrayConverter | None = None) -> tuple[Any, tuple[Any, ...]]:
        """One update of ``(B, C, h, w)`` latents, row i at ``step_indices[i]`` of ``trajectories[i]``.
        ``history``: the ``history_size`` arrays, shaped like ``sample``, that each row's previous step returned
        (rows at step 0: any finite values), or ``()`` when every row is at step 0. ``noise``: ``(B, C, h, w)`` unit
        Gaussian noise (e.g. ``noise.step_noise``), needed by a ``stochastic`` sampler only.
        Returns ``(prev_sample, history)``: the new latents and ``history_size`` arrays, shaped and typed like
        ``sample``."""
        raise NotImplementedError

    def filled_history(self, history: tuple[Any, ...], sample: Any) -> tuple[Any, ...]:
        """``history``, or ``sample`` in every slot where it is ``()`` (every row at step 0)."""
        if not history:
            return (sample,) * self.history_size
        assert len(history) == self.history_size, (len(history), self.history_size)
        return history

    def check_noise(self, noise: Any, sample: Any) -> Any:
        """``noise``, after checking that a stochastic step was handed noise shaped like the sample."""
        if noise is None:
            raise ValueError(f"the {self.name} sampler needs per-step noise; expected a noise array shaped like the "
                             f"sample")
        assert noise.shape == sample.shape, (noise.shape, sample.shape)
        return noise
