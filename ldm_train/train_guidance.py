"""``ldm-train guidance``: classifier-free guidance distillation (Meng et al. 2023, "On Distillation of Guided
Diffusion Models", stage one, at one guidance scale) of a trained model into one that samples with any sampler at
one UNet row per image and step where the base takes two.

The teacher is the base model's UNet, frozen; the student starts as a copy of it. Each step draws a training latent
x_0, its caption, a timestep t uniformly from the T training timesteps and noise, as ``ldm-train unet`` does, and the
student's output on x_t learns, under the squared error, the teacher's guided output there at ``guidance_scale``
(uncond + w (cond - uncond), the runtime's convention; in the model's own prediction type). The model folder holds
an EMA of the student (``average_decay``). Its model.json keeps the base's default sampler and steps with guidance 1
(``default_sampler``), so a request that names no guidance runs the conditional branch alone; any sampler takes it,
as the base's samplers take the base.

The latents and captions, the carried-over autoencoder and text encoder, the folder written whole every
``checkpoint_every`` steps: as ``ldm-train lcm`` (``ldm_train.train_lcm``), whose loop this shares.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm_runtime.config import ConfigError, ModelConfig, SamplerDefaults
from ldm_train.run import LR_SCHEDULES, check_finite_flags, check_seed, check_whole
from ldm_train.train_lcm import Distillation, run_distillation
from ldm_train.train_unet import _conditioning

STAGE = "guidance"


@dataclass(frozen=True)
class GuidanceSettings:
    """``ldm-train guidance``'s flags; the CLI reads its defaults from here."""

    base: str
    out: str
    data: str = "shapes:4000"
    guidance_scale: float = 5.0
    steps: int = 800
    batch_size: int = 32
    learning_rate: float = 5e-5
    lr_schedule: str = "cosine"
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    average_decay: float = 0.99
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 250
    skip_bad_images: bool = False

    def validate(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            check_whole(name, getattr(self, name), 1)
        check_whole("warmup_steps", self.warmup_steps, 0)
        check_seed(self.seed)
        check_finite_flags(self, above_zero=("learning_rate", "grad_clip"),
                           at_least_zero=("weight_decay", "guidance_scale"))
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr-schedule is {self.lr_schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
        if not 0.0 <= self.average_decay < 1.0:
            raise ConfigError(f"--average-decay is {self.average_decay}; expected a value in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_guidance(settings: GuidanceSettings) -> Path:
    """Distil the guidance of the model ``settings.base`` into ``settings.out``; returns the folder written."""
    return run_distillation(settings, STAGE, GuidanceDistillation)


class GuidanceDistillation(Distillation):
    """The student's output on x_t against the teacher's guided output there."""

    def loss(self, data, latents, noise, timesteps, caption_ids, generator):
        alpha = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1).float()
        noisy = alpha.sqrt() * latents + (1.0 - alpha).sqrt() * noise
        prediction = self.student(noisy, timesteps, **_conditioning(data, caption_ids, self.device))
        wanted = self.guided_teacher(data, noisy, timesteps, caption_ids)
        return (prediction.float() - wanted.float()).pow(2).mean()

    def written_config(self) -> ModelConfig:
        return guidance_distilled_config(self.config)


def guidance_distilled_config(config: ModelConfig) -> ModelConfig:
    """The base model's description with guidance 1 as its default (the student has the guidance in it); its
    default sampler and steps, and their spacing, stay the base's."""
    defaults = config.default_sampler or SamplerDefaults()
    unguided = dataclasses.replace(defaults, guidance_scale=1.0, guidance_interval=None)
    return dataclasses.replace(config, default_sampler=unguided)
