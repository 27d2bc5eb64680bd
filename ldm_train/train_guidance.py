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

from ldm_runtime.config import ModelConfig, SamplerDefaults
from ldm_train.train_lcm import Distillation, DistillationSettings, run_distillation
from ldm_train.train_unet import _conditioning

STAGE = "guidance"


@dataclass(frozen=True)
class GuidanceSettings(DistillationSettings):
    """``ldm-train guidance``'s flags: a distillation's (``guidance_scale`` the scale distilled)."""


def train_guidance(settings: GuidanceSettings, resume: bool = False) -> Path:
    """Distil the guidance of the model ``settings.base`` into ``settings.out`` (or continue the run there);
    returns the folder written."""
    return run_distillation(settings, STAGE, GuidanceDistillation, resume)


class GuidanceDistillation(Distillation):
    """The student's output on x_t against the teacher's guided output there."""

    def loss(self, data, latents, noise, timesteps, caption_ids, generator):
        noisy = self.forward.add_noise(latents, noise, timesteps)
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
