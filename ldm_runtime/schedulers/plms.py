"""PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models"; the sampler of the LDM paper): a linear
multistep method on the model's noise prediction, applied through DDIM's transfer (eq. 9 of the PNDM paper).

The same numbers as diffusers' ``PNDMScheduler`` with ``skip_prk_steps=True``, with one UNet call per listed
timestep as diffusers makes: N steps list N + 1 timesteps (one for N = 1), the second timestep twice. The first
call steps from the first timestep by T // N; the second goes back to the first call's sample and steps it by the
mean of the two outputs (the pseudo-improved Euler step), landing on the timestep the second call was made at;
from then on each call takes a second-, third- and then fourth-order Adams-Bashforth step of T // N on the outputs
kept so far, the second call's output not among them. A row's history is the last three outputs kept (newest first)
and the first call's sample. The UNet's v is combined as it is and turned into noise with the sample it is applied
to, as diffusers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np

from ldm_runtime.arrays import ArrayConverter
from ldm_runtime.schedulers.schedule import NoiseSchedule
from ldm_runtime.schedulers.sigmas import SigmaSampler, check_spacing, check_steps, row_coefficients

# Adams-Bashforth weights of the newest output and the kept ones before it, by the number of outputs combined
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@dataclass(frozen=True, eq=False)
class PLMSTrajectory:
    """One request's walk: ``timesteps`` ``(M,) int64``, what the UNet sees at each call, and the alpha-product
    timesteps each call's transfer goes from and to (``to_timesteps`` -1: the final alpha). All read-only."""

    timesteps: np.ndarray
    from_timesteps: np.ndarray
    to_timesteps: np.ndarray

    def __len__(self) -> int:
        return len(self.timesteps)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return zip(self.timesteps.tolist(), self.from_timesteps.tolist(), self.to_timesteps.tolist())


@dataclass(frozen=True)
class PLMSSampler(SigmaSampler):
    """PLMS over ``schedule``; ``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one`` as diffusers'
    (defaults: its defaults)."""

    schedule: NoiseSchedule
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = False
    name: ClassVar[str] = "plms"
    history_size: ClassVar[int] = 4

    def __post_init__(self) -> None:
        check_spacing("plms", self.schedule, self.timestep_spacing, self.steps_offset)

    def trajectory(self, num_inference_steps: int) -> PLMSTrajectory:
        return self.trajectory_from(num_inference_steps, 0)

    def trajectory_from(self, num_inference_steps: int, start: int) -> PLMSTrajectory:
        """A PLMS run over the last ``num_inference_steps - start`` of the N spaced timesteps, each step still T // N
        (image-to-image): its calls begin with a first step and its redo, as a run of N steps does. diffusers'
        ``PNDMScheduler`` has no begin index: its img2img pipeline slices the N + 1 calls at ``start`` instead, which
        begins one spaced timestep higher and then hands the UNet a timestep one step below the sample's."""
        steps = check_steps(self.schedule, num_inference_steps)
        count = self.schedule.num_train_timesteps
        assert 0 <= start <= steps, (start, steps)
        if self.timestep_spacing == "linspace":
            spaced = np.linspace(0, count - 1, steps).round()
        elif self.timestep_spacing == "leading":
            spaced = (np.arange(0, steps) * (count // steps)).round() + self.steps_offset
        else:
            spaced = np.round(np.arange(count, 0, -count / steps)[:steps])[::-1] - 1  # as spaced_timesteps
        spaced = spaced.astype(np.int64)  # ascending
        stride = count // steps
        timesteps, from_timesteps, to_timesteps = _calls(spaced, stride)
        if len(spaced) != steps or spaced.min() < 0 or from_timesteps.max() >= count:
            raise ValueError(f"num_inference_steps {steps} gives {len(spaced)} plms timesteps from {spaced.min()} to "
                             f"{from_timesteps.max()}; expected {steps} from 0 to {count - 1} (use other steps)")
        if start:
            timesteps, from_timesteps, to_timesteps = _calls(spaced[:steps - start], stride)
        to_timesteps = np.maximum(to_timesteps, -1)
        for array in (timesteps, from_timesteps, to_timesteps):
            array.flags.writeable = False
        return PLMSTrajectory(np.ascontiguousarray(timesteps), from_timesteps, to_timesteps)

    def noise_scales(self, trajectory: PLMSTrajectory, index: int) -> tuple[float, float]:
        """sqrt(a_t) and sqrt(1 - a_t) at the timestep of call ``index``, the sample's own (x_0 at the end), as
        ``PNDMScheduler.add_noise``."""
        if index == len(trajectory):
            return 1.0, 0.0
        alpha = float(self.schedule.alphas_cumprod[int(trajectory.timesteps[index])])
        return float(np.sqrt(alpha)), float(np.sqrt(1.0 - alpha))

    def step(self, model_output: Any, trajectories: Sequence[PLMSTrajectory], step_indices: Sequence[int],
             sample: Any, history: tuple[Any, ...] = (), noise: Any = None,
             to_array: ArrayConverter | None = None) -> tuple[Any, tuple[Any, ...]]:
        assert model_output.shape == sample.shape, (model_output.shape, sample.shape)
        assert history or not any(step_indices), "steps after the first need the history"
        kept_1, kept_2, kept_3, first_sample = self.filled_history(history, sample)
        rows = np.array([self._row_weights(trajectory, index) for trajectory, index in zip(trajectories, step_indices)])
        sample_scale, first_sample_scale, output_scale, kept_1_scale, kept_2_scale, kept_3_scale = row_coefficients(
            rows.T, sample, to_array)
        prev_sample = (sample * sample_scale + first_sample * first_sample_scale + model_output * output_scale
                       + kept_1 * kept_1_scale + kept_2 * kept_2_scale + kept_3 * kept_3_scale)
        # the history: the outputs kept (the second call's is not) and the first call's sample, chosen per row as
        # a * (1 - m) + b * m with m 0 or 1, which gives a or b exactly
        masks = np.array([[index == 1 for index in step_indices], [index != 1 for index in step_indices],
                          [index == 0 for index in step_indices], [index != 0 for index in step_indices]])
        second, other, first, later = row_coefficients(masks.astype(np.float64), sample, to_array)
        return prev_sample, (model_output * other + kept_1 * second, kept_1 * other + kept_2 * second,
                             kept_2 * other + kept_3 * second, sample * first + first_sample * later)

    def _row_weights(self, trajectory: PLMSTrajectory, index: int) -> np.ndarray:
        """``(6,) float64``: the weights of the sample, the first call's sample, the model output and the three kept
        outputs in a row's next sample at call ``index``."""
        assert 0 <= index < len(trajectory), (index, len(trajectory))
        alphas_cumprod = self.schedule.alphas_cumprod
        final_alpha = 1.0 if self.set_alpha_to_one else alphas_cumprod[0]
        alpha = alphas_cumprod[trajectory.from_timesteps[index]]
        to_timestep = trajectory.to_timesteps[index]
        alpha_prev = alphas_cumprod[to_timestep] if to_timestep >= 0 else final_alpha
        # eq. 9: x_prev = sqrt(a_prev / a) x - (a_prev - a) / (a sqrt(1 - a_prev) + sqrt(a (1 - a) a_prev)) eps
        sample_scale = np.sqrt(alpha_prev / alpha)
        denominator = alpha * np.sqrt(1.0 - alpha_prev) + np.sqrt(alpha * (1.0 - alpha) * alpha_prev)
        eps_scale = -(alpha_prev - alpha) / denominator
        if index == 1:  # the mean of this output and the first, applied to the first call's sample
            output_weights = (0.5, 0.5, 0.0, 0.0)
        else:
            combined = ADAMS_BASHFORTH[min(index, 4) if index > 1 else 1]
            output_weights = combined + (0.0,) * (4 - len(combined))
        if self.schedule.prediction_type == "v_prediction":  # eps = sqrt(a) v + sqrt(1 - a) x, on the combined v
            sample_scale = sample_scale + eps_scale * np.sqrt(1.0 - alpha)
            eps_scale = eps_scale * np.sqrt(alpha)
        base = (0.0, sample_scale) if index == 1 else (sample_scale, 0.0)
        return np.array(base + tuple(eps_scale * weight for weight in output_weights), dtype=np.float64)


def _calls(spaced: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The calls of a PLMS run over ``spaced`` (ascending): each call's timestep, descending, the second one's
    twice, and the timesteps its transfer goes from and to (to: below 0 past the last)."""
    timesteps = np.concatenate([spaced[:-1], spaced[-2:-1], spaced[-1:]])[::-1]
    from_timesteps, to_timesteps = timesteps.copy(), timesteps - stride
    if len(timesteps) > 1:  # the second call redoes the first step, from one stride above its own timestep
        from_timesteps[1], to_timesteps[1] = timesteps[1] + stride, timesteps[1]
    return timesteps, from_timesteps, to_timesteps
