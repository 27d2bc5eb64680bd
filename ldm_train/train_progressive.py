"""``ldm-train progressive``: progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast
Sampling of Diffusion Models", Algorithm 2; Meng et al. 2023's stage two on a guidance-distilled model): a model
whose DDIM at N steps lands where the base's DDIM at K N steps does. One round of the paper halves the steps
(K = 2, the default); ``teacher_steps`` takes K N at once, each training step then running the teacher K times.

The teacher is the base model's UNet, frozen, guided at ``guidance_scale`` (the base's own default where the flag is
not given: 1 for a model from ``ldm-train guidance`` or from an earlier round, when the teacher runs its conditional
branch alone); the student starts as a copy of it. Both walk the ``trailing`` timestep grid, which starts at the
last training timestep (pure noise) whatever N is: the student's N steps are every K-th timestep of the teacher's
K N (N = 4, K = 2, T = 1000: 999, 749, 499, 249, then the schedule's final alpha). Each training step draws a
latent x_0, a caption and one student step t -> t' uniformly, noises x_0 to t (``ForwardProcess.add_noise``) and
takes the teacher's K DDIM steps from t to t' with the runtime's own DDIM (``ldm_runtime.schedulers.ddim``). The
student learns the x̃ whose one DDIM step from x_t lands on the teacher's x_t':

    x̃ = (x_t' - (σ_t' / σ_t) x_t) / (α_t' - (σ_t' / σ_t) α_t),   α = sqrt(ᾱ), σ = sqrt(1 - ᾱ)

under the squared error of its x̂_0 weighted by max(SNR_t, 1) ("truncated SNR" weighting: the larger of the errors
in x_0 and in ε). The model folder holds an EMA of the student (``average_decay``); its model.json sets DDIM's
spacing to ``trailing`` and its default sampler to DDIM at N steps with guidance 1. A further round takes that
folder as its ``--base`` and divides N again.

The latents and captions, the carried-over autoencoder and text encoder, the folder written whole every
``checkpoint_every`` steps: as ``ldm-train lcm`` (``ldm_train.train_lcm``), whose loop this shares."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldm_runtime.config import DEFAULT_GUIDANCE_SCALE, ConfigError, DDIMConfig, ModelConfig, SamplerDefaults
from ldm_runtime.schedulers.ddim import DDIMTrajectory, alpha_products, ddim_step
from ldm_runtime.schedulers.schedule import NoiseSchedule
from ldm_train.run import check_whole
from ldm_train.train_lcm import Distillation, DistillationSettings, denoised_and_noise, run_distillation
from ldm_train.train_unet import _conditioning

STAGE = "progressive"
SPACING = "trailing"


@dataclass(frozen=True)
class ProgressiveSettings(DistillationSettings):
    """``ldm-train progressive``'s flags: a distillation's, ``sample_steps`` the student's N, ``teacher_steps`` the
    teacher's (None: 2N, one round of the paper's halving) and ``guidance_scale`` None for the base's own default
    guidance."""

    guidance_scale: float | None = None
    sample_steps: int = 4
    teacher_steps: int | None = None

    def validate(self) -> None:
        super().validate()
        check_whole("sample_steps", self.sample_steps, 1)
        if self.teacher_steps is not None and (not isinstance(self.teacher_steps, int)
                                               or self.teacher_steps < 2 * self.sample_steps
                                               or self.teacher_steps % self.sample_steps):
            raise ConfigError(f"--teacher-steps is {self.teacher_steps}; expected a multiple of --sample-steps "
                              f"{self.sample_steps} of at least {2 * self.sample_steps}")

    @property
    def teacher_step_count(self) -> int:
        return 2 * self.sample_steps if self.teacher_steps is None else self.teacher_steps


def train_progressive(settings: ProgressiveSettings, resume: bool = False) -> Path:
    """Distil the model ``settings.base`` into ``settings.out``, a model whose DDIM takes ``sample_steps`` where the
    base's takes ``teacher_steps`` (or continue the run there); returns the folder written."""
    return run_distillation(settings, STAGE, ProgressiveDistillation, resume)


def base_guidance_scale(config: ModelConfig) -> float:
    """The guidance a request to this model takes where it names none."""
    defaults = config.default_sampler
    return DEFAULT_GUIDANCE_SCALE if defaults is None or defaults.guidance_scale is None else defaults.guidance_scale


@dataclass(frozen=True)
class StudentGrid:
    """Where the student's N steps start and land (``starts``, ``ends``: ``(N,) int64``, ``FINAL_TIMESTEP`` after
    the last) and the teacher's K steps within each (``teacher_starts``, ``teacher_ends``: ``(N, K) int64``)."""

    starts: np.ndarray
    ends: np.ndarray
    teacher_starts: np.ndarray
    teacher_ends: np.ndarray


def student_grid(schedule: NoiseSchedule, sample_steps: int, teacher_steps: int, config: DDIMConfig) -> StudentGrid:
    """The trailing DDIM grids of N = ``sample_steps`` and ``teacher_steps`` = K N steps (``config`` a model's DDIM
    settings with that spacing), the first every K-th timestep of the second. ``ConfigError`` where the schedule has
    too few timesteps for K N or the grids do not nest."""
    count, factor = schedule.num_train_timesteps, teacher_steps // sample_steps
    if teacher_steps > count:
        raise ConfigError(f"--sample-steps is {sample_steps}; expected at most {count // factor} (the teacher takes "
                          f"{factor} times as many DDIM steps, of the base's {count} training timesteps)")
    student = DDIMTrajectory.plan(schedule, sample_steps, config)
    teacher = DDIMTrajectory.plan(schedule, teacher_steps, config)
    if not np.array_equal(teacher.timesteps[::factor], student.timesteps):
        raise ConfigError(f"--sample-steps is {sample_steps}; the trailing grid of {sample_steps} DDIM steps is not "
                          f"every {factor} timesteps of the grid of {teacher_steps} for the base's {count} training "
                          f"timesteps (choose step counts that divide {count})")
    return StudentGrid(student.timesteps, student.prev_timesteps, teacher.timesteps.reshape(sample_steps, factor),
                       teacher.prev_timesteps.reshape(sample_steps, factor))


def ddim_config_of(sampler: DDIMConfig) -> DDIMConfig:
    """A model's DDIM settings with the trailing spacing this distillation walks."""
    return dataclasses.replace(sampler, timestep_spacing=SPACING, previous_timestep="listed")


class ProgressiveDistillation(Distillation):
    """The student's one DDIM step against the teacher's K."""

    def __init__(self, *args):
        super().__init__(*args)
        self.guidance_scale = (self.settings.guidance_scale if self.settings.guidance_scale is not None
                               else base_guidance_scale(self.config))
        self.schedule = NoiseSchedule.from_config(self.config.schedule)
        self.ddim = ddim_config_of(self.config.sampler)
        self.grid = student_grid(self.schedule, self.settings.sample_steps, self.settings.teacher_step_count,
                                 self.ddim)

    @classmethod
    def check_base(cls, settings, config: ModelConfig) -> None:
        student_grid(NoiseSchedule.from_config(config.schedule), settings.sample_steps, settings.teacher_step_count,
                     ddim_config_of(config.sampler))

    def loss(self, data, latents, noise, timesteps, caption_ids, generator):
        denoised, wanted, weight = self.student_step(data, latents, noise, caption_ids, generator)
        return (weight * (denoised - wanted).pow(2)).mean()

    def student_step(self, data, latents: torch.Tensor, noise: torch.Tensor, caption_ids: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One student step of each row (drawn from ``generator``) from ``latents`` noised by ``noise``: the
        student's x̂_0 (with its gradient), the x̃ it should be and the row's loss weight."""
        index = torch.randint(0, self.settings.sample_steps, (len(latents),), generator=generator).numpy()
        start = torch.from_numpy(self.grid.starts[index]).to(self.device)
        noisy = self.forward.add_noise(latents, noise, start)
        output = self.student(noisy, start, **_conditioning(data, caption_ids, self.device))
        alpha = self.alphas_cumprod[start].view(-1, 1, 1, 1)
        denoised = denoised_and_noise(output.float(), noisy, alpha.float(), self.config.schedule.prediction_type)[0]
        with torch.no_grad():
            wanted = self.wanted(data, noisy, caption_ids, index)
        weight = self.forward.snr(start).clamp(min=1.0).view(-1, 1, 1, 1).float()
        return denoised, wanted, weight

    def teacher_steps(self, data, noisy: torch.Tensor, caption_ids: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        """The teacher's K DDIM steps from ``noisy`` within the student's steps ``index``: where they land."""
        sample = noisy
        for current, following in zip(self.grid.teacher_starts[index].T, self.grid.teacher_ends[index].T):
            timesteps = torch.from_numpy(np.ascontiguousarray(current)).to(self.device)
            output = self.guided_teacher(data, sample, timesteps, caption_ids)
            sample = ddim_step(output, current, following, sample, schedule=self.schedule, config=self.ddim)[0]
        return sample

    def wanted(self, data, noisy: torch.Tensor, caption_ids: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        """x̃: the x_0 prediction whose one DDIM step from ``noisy`` lands where the teacher's K steps do."""
        landed = self.teacher_steps(data, noisy, caption_ids, index)
        start_alpha, end_alpha = self.step_alphas(index)
        ratio = ((1.0 - end_alpha) / (1.0 - start_alpha)).sqrt()
        scale = end_alpha.sqrt() - ratio * start_alpha.sqrt()
        return ((landed - ratio.float() * noisy) / scale.float()).float()

    def step_alphas(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """ᾱ at each row's student step start and end (float64, broadcastable), as the runtime's DDIM step takes
        them (the final alpha after the last step)."""
        alphas = alpha_products(self.schedule, self.ddim, self.grid.starts[index], self.grid.ends[index])
        return tuple(torch.from_numpy(value).to(self.device).view(-1, 1, 1, 1) for value in alphas)

    def written_config(self) -> ModelConfig:
        return progressive_config(self.config, self.settings.sample_steps)


def progressive_config(config: ModelConfig, sample_steps: int) -> ModelConfig:
    """The base model's description with DDIM on the trailing grid and, by default, at ``sample_steps`` steps with
    guidance 1 (the student has the teacher's guidance in it)."""
    defaults = SamplerDefaults(name="ddim", steps=sample_steps, guidance_scale=1.0)
    return dataclasses.replace(config, sampler=ddim_config_of(config.sampler), default_sampler=defaults)
