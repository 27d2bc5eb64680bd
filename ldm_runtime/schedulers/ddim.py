"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), written once for every engine's array type.

The per-step scalars (alpha products, sigma_t) are computed on the host in float64 numpy, one value per
sample, and handed to the engine's array type by a converter (``to_array(values, like=sample)``), so the
latents stay where the engine keeps them (numpy for onnxruntime on CPU, a CUDA tensor for the torch engines)
for the whole loop. The array math uses only ``+ - * /`` and ``.clip``, which numpy and torch share; this
module never imports torch (it finds it in ``sys.modules`` when it is handed a tensor).

The numbers match diffusers' ``DDIMScheduler`` for the same settings. Where a step lands is
``DDIMConfig.previous_timestep``: diffusers' ``step`` goes from t to ``t - T // N`` ("diffusers"), which for the
``trailing`` spacing where N does not divide T, and for ``linspace``, is not the next timestep of its own
list; "listed" (the default) always steps to the next listed timestep and from the last one to
``final_alpha_cumprod``. For ``leading`` the two agree, except when ``steps_offset >= T // N``
together with ``set_alpha_to_one=True``: diffusers' last step then lands on timestep 0 instead of the final alpha.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ldm_runtime.arrays import ArrayConverter, host_to_array_like
from ldm_runtime.config import TIMESTEP_SPACINGS, DDIMConfig
from ldm_runtime.schedulers.schedule import NoiseSchedule

FINAL_TIMESTEP = -1  # a previous timestep of -1 means "the end of the chain": use final_alpha_cumprod


def check_eta(eta: float | np.ndarray) -> None:
    """``ValueError`` unless every eta is a finite number in [0, 1]."""
    values = np.atleast_1d(np.asarray(eta))
    has_bool = isinstance(eta, (list, tuple)) and any(isinstance(value, (bool, np.bool_)) for value in eta)
    if values.size == 0 or values.dtype.kind not in "iuf" or has_bool:
        raise ValueError(f"eta is {eta!r}; expected a number from 0 to 1")
    if values.min() >= 0 and values.max() <= 1:  # False for NaN
        return
    bad = ~((values >= 0) & (values <= 1))
    raise ValueError(f"eta {values[bad][0].item()!r} is out of range; expected a number from 0 to 1")


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def ddim_timesteps(schedule: NoiseSchedule, num_inference_steps: int, config: DDIMConfig = DDIMConfig()) -> np.ndarray:
    """The N timesteps a DDIM run visits: ``(N,) int64``, strictly descending, each in ``0..T-1``.

    The same numbers as diffusers' ``DDIMScheduler.set_timesteps`` for each spacing, except that "trailing"
    always has exactly N entries (diffusers' float ``np.arange`` appends a spurious ``-1`` for some N, e.g. 61).
    """
    count = schedule.num_train_timesteps
    if not _is_integer(num_inference_steps) or not 1 <= num_inference_steps <= count:
        raise ValueError(f"num_inference_steps is {num_inference_steps!r}; expected an integer from 1 to {count}")
    steps = int(num_inference_steps)
    if config.timestep_spacing == "leading":
        step_ratio = count // steps
        timesteps = (np.arange(0, steps) * step_ratio).round()[::-1].astype(np.int64) + config.steps_offset
        if timesteps[0] >= count:
            raise ValueError(
                f"num_inference_steps {steps} with steps_offset {config.steps_offset} starts at timestep "
                f"{timesteps[0]}; expected timesteps below num_train_timesteps {count} (use fewer steps, "
                f"steps_offset 0, or the 'trailing' or 'linspace' spacing)"
            )
    elif config.timestep_spacing == "trailing":
        step_ratio = count / steps
        timesteps = np.round(np.arange(count, 0, -step_ratio)[:steps]).astype(np.int64) - 1
    else:
        timesteps = np.linspace(0, count - 1, steps).round()[::-1].astype(np.int64)
    assert timesteps.shape == (steps,) and timesteps[-1] >= 0 and np.all(np.diff(timesteps) < 0), timesteps
    return np.ascontiguousarray(timesteps)


def previous_timesteps(timesteps: np.ndarray, previous_timestep: str = "listed",
                       num_train_timesteps: int = 1000) -> np.ndarray:
    """For each entry of a descending timestep list, the one DDIM steps to, ``(N,) int64``: "listed", the next
    entry and ``FINAL_TIMESTEP`` (-1) after the last; "diffusers", ``t - T // N`` and -1 where that is below 0."""
    timesteps = np.asarray(timesteps, dtype=np.int64)
    if previous_timestep == "listed":
        return np.append(timesteps[1:], FINAL_TIMESTEP)
    assert previous_timestep == "diffusers", previous_timestep
    prev = timesteps - num_train_timesteps // len(timesteps)
    return np.where(prev >= 0, prev, FINAL_TIMESTEP)


@dataclass(frozen=True, eq=False)
class DDIMTrajectory:
    """One request's walk: ``timesteps`` and ``prev_timesteps``, both ``(N,) int64`` and read-only.

    Holds nothing that changes while sampling, so a server keeps one per request and tracks the step index
    itself; samples at different steps of different trajectories can share one ``ddim_step`` call.
    """

    timesteps: np.ndarray
    prev_timesteps: np.ndarray

    @classmethod
    def plan(cls, schedule: NoiseSchedule, num_inference_steps: int,
             config: DDIMConfig = DDIMConfig()) -> "DDIMTrajectory":
        timesteps = ddim_timesteps(schedule, num_inference_steps, config)
        prev = previous_timesteps(timesteps, config.previous_timestep, schedule.num_train_timesteps)
        timesteps.flags.writeable = False
        prev.flags.writeable = False
        return cls(timesteps, prev)

    def __len__(self) -> int:
        return len(self.timesteps)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(t, prev_t) as Python ints, prev_t = -1 on the last step."""
        return zip(self.timesteps.tolist(), self.prev_timesteps.tolist())

    def begun_at(self, start: int) -> "DDIMTrajectory":
        """The walk from step ``start`` on (``len(self)``: no steps left), as image-to-image begins part-way."""
        assert 0 <= start <= len(self), (start, len(self))
        return DDIMTrajectory(self.timesteps[start:], self.prev_timesteps[start:])


def ddim_step(
    model_output: Any,
    timesteps: Any,
    prev_timesteps: Any,
    sample: Any,
    eta: float | np.ndarray | None = None,
    noise: Any = None,
    *,
    schedule: NoiseSchedule,
    config: DDIMConfig = DDIMConfig(),
    to_array: ArrayConverter | None = None,
) -> tuple[Any, Any]:
    """One DDIM update x_t -> x_prev for a batch whose rows may sit at different timesteps (Song et al. eq. 12).

    model_output, sample, noise: ``(B, C, h, w)`` arrays of the engine's type (numpy array or torch tensor,
    any float dtype, any device), noise only needed when some eta > 0 (e.g. ``noise.step_noise``).
    timesteps, prev_timesteps: host ints, ``(B,)`` or one for all rows; prev -1 means the final step.
    eta: a float or ``(B,)`` host floats in [0, 1]; None means ``config.eta``.
    to_array: ``(float64 numpy values, like) -> array of like's type, dtype and device``; the default
    handles numpy and torch.
    Returns ``(prev_sample, pred_original_sample)``, both shaped and typed like ``sample``.
    """
    batch = sample.shape[0]
    assert model_output.shape == sample.shape, (model_output.shape, sample.shape)
    convert = to_array or host_to_array_like
    eta = config.eta if eta is None else eta
    check_eta(eta)
    eta_rows = _per_row(eta, batch, "eta", np.float64)
    coefficients = _step_coefficients(schedule, config, timesteps, prev_timesteps, eta_rows, batch)
    # one host-to-device copy per step: the five per-sample scalars, shaped to broadcast over (C, h, w)
    coefficients = convert(coefficients.reshape((5, batch) + (1,) * (sample.ndim - 1)), sample)
    sqrt_alpha, sqrt_beta, sqrt_alpha_prev, direction_scale, std_dev = (coefficients[i] for i in range(5))

    if schedule.prediction_type == "epsilon":
        pred_original_sample = (sample - sqrt_beta * model_output) / sqrt_alpha
        pred_epsilon = model_output
    else:  # v_prediction: v = sqrt(a) eps - sqrt(1 - a) x_0
        pred_original_sample = sqrt_alpha * sample - sqrt_beta * model_output
        pred_epsilon = sqrt_alpha * model_output + sqrt_beta * sample
    if config.clip_sample:
        pred_original_sample = pred_original_sample.clip(-config.clip_sample_range, config.clip_sample_range)
    if config.use_clipped_model_output:
        pred_epsilon = (sample - sqrt_alpha * pred_original_sample) / sqrt_beta

    prev_sample = sqrt_alpha_prev * pred_original_sample + direction_scale * pred_epsilon
    if eta_rows.max() > 0:
        if noise is None:
            raise ValueError("eta > 0 needs per-step noise; expected a noise array shaped like the sample")
        assert noise.shape == sample.shape, (noise.shape, sample.shape)
        prev_sample = prev_sample + std_dev * noise
    return prev_sample, pred_original_sample


def alpha_products(schedule: NoiseSchedule, config: DDIMConfig, timesteps: np.ndarray,
                   prev_timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a_t, a_prev), float64 and shaped as the integer host arrays given: the alpha products a DDIM step between
    them uses, ``final_alpha_cumprod`` (1 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``) where prev is -1."""
    alphas_cumprod = schedule.alphas_cumprod
    final_alpha_cumprod = 1.0 if config.set_alpha_to_one else alphas_cumprod[0]
    previous = np.asarray(prev_timesteps)
    return (alphas_cumprod[np.asarray(timesteps)],
            np.where(previous >= 0, alphas_cumprod[np.maximum(previous, 0)], final_alpha_cumprod))


def _step_coefficients(schedule: NoiseSchedule, config: DDIMConfig, timesteps: Any, prev_timesteps: Any,
                       eta: np.ndarray, batch: int) -> np.ndarray:
    """(5, B) float64: sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev), sqrt(1 - a_prev - sigma^2), sigma (eqs. 12, 16)."""
    count = schedule.num_train_timesteps
    current = _per_row(timesteps, batch, "timesteps", np.int64)
    prev = _per_row(prev_timesteps, batch, "prev_timesteps", np.int64)
    if current.min() < 0 or current.max() >= count:
        raise ValueError(f"timesteps {current.tolist()} are out of range; expected integers from 0 to {count - 1}")
    if prev.min() < FINAL_TIMESTEP or (prev >= current).any():
        raise ValueError(
            f"prev_timesteps {prev.tolist()} do not precede timesteps {current.tolist()}; expected -1 <= prev < t"
        )
    alpha_prod, alpha_prod_prev = alpha_products(schedule, config, current, prev)
    beta_prod = 1.0 - alpha_prod
    beta_prod_prev = 1.0 - alpha_prod_prev
    variance = (beta_prod_prev / beta_prod) * (1.0 - alpha_prod / alpha_prod_prev)
    std_dev = eta * np.sqrt(variance)
    # 1 - a_prev - sigma^2 >= 0 exactly; the clamp only absorbs float rounding at eta = 1
    direction_scale = np.sqrt(np.maximum(1.0 - alpha_prod_prev - std_dev**2, 0.0))
    return np.stack([np.sqrt(alpha_prod), np.sqrt(beta_prod), np.sqrt(alpha_prod_prev), direction_scale, std_dev])


def _per_row(values: Any, batch: int, name: str, dtype: type) -> np.ndarray:
    """One value for every row, or one per row, as a ``(B,)`` host array; integers only where dtype is."""
    array = np.asarray(values)
    if np.issubdtype(dtype, np.integer) and array.dtype.kind not in "iu":
        raise ValueError(f"{name} have dtype {array.dtype}; expected integers")
    if array.ndim == 0:
        return np.full(batch, array, dtype=dtype)
    if array.shape != (batch,):
        raise ValueError(f"{name} has shape {array.shape}; expected ({batch},) or a single value")
    return array.astype(dtype)


@dataclass(frozen=True)
class DDIMSampler:
    """A schedule and DDIM settings, shared by every request (it holds no per-request state).

    ``trajectory(n)`` gives a request its (t, prev_t) pairs; ``step`` is ``ddim_step`` with this schedule
    and config.
    """

    schedule: NoiseSchedule
    config: DDIMConfig = DDIMConfig()

    def trajectory(self, num_inference_steps: int) -> DDIMTrajectory:
        return DDIMTrajectory.plan(self.schedule, num_inference_steps, self.config)

    def trajectory_from(self, num_inference_steps: int, start: int) -> DDIMTrajectory:
        """The trajectory of ``num_inference_steps`` begun at step ``start`` (image-to-image): its last
        ``num_inference_steps - start`` steps, as diffusers' img2img pipeline slices ``DDIMScheduler.timesteps``."""
        return self.trajectory(num_inference_steps).begun_at(start)

    def noise_scales(self, trajectory: DDIMTrajectory, index: int) -> tuple[float, float]:
        """``(a, b)``: the latents at step ``index`` of ``trajectory`` (before its UNet call; ``len(trajectory)``: the
        end, x_0 itself) are ``a x_0 + b eps``, i.e. sqrt(a_t) and sqrt(1 - a_t), as ``DDIMScheduler.add_noise``."""
        if index == len(trajectory):
            return 1.0, 0.0
        alpha = float(self.schedule.alphas_cumprod[int(trajectory.timesteps[index])])
        return float(np.sqrt(alpha)), float(np.sqrt(1.0 - alpha))

    def step(self, model_output: Any, timesteps: Any, prev_timesteps: Any, sample: Any,
             eta: float | np.ndarray | None = None, noise: Any = None,
             to_array: ArrayConverter | None = None) -> tuple[Any, Any]:
        return ddim_step(model_output, timesteps, prev_timesteps, sample, eta, noise,
                         schedule=self.schedule, config=self.config, to_array=to_array)
