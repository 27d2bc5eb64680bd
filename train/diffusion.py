"""The forward (noising) process used for training: q(x_t | x_0) and the regression target.

The runtime keeps its own numpy copy of the schedule (ldm_runtime/schedulers/schedule.py) because it must
not import torch or this package; tests/train/test_diffusion.py checks that the two agree.
"""

from __future__ import annotations

import torch

from train.config import ScheduleConfig


def betas_for(schedule: ScheduleConfig) -> torch.Tensor:
    """(T,) float64 betas. "scaled_linear" (LDM, SD): linear in sqrt(beta)."""
    steps = schedule.num_train_timesteps
    if schedule.beta_schedule == "scaled_linear":
        return torch.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.linspace(schedule.beta_start, schedule.beta_end, steps, dtype=torch.float64)


class ForwardProcess:
    """Noising at integer timesteps t in [0, T); every per-sample coefficient is gathered from float64 tables."""

    def __init__(self, schedule: ScheduleConfig):
        self.schedule = schedule
        self.alphas_cumprod = torch.cumprod(1.0 - betas_for(schedule), dim=0)

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps]
        shape = (-1,) + (1,) * (like.ndim - 1)
        signal = alpha_bar.sqrt().view(shape).to(like.dtype)
        noise = (1.0 - alpha_bar).sqrt().view(shape).to(like.dtype)
        return signal, noise

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε. latents, noise: (B, C, h, w); timesteps: (B,) int64."""
        signal, noise_scale = self._coefficients(timesteps, latents)
        return signal * latents + noise_scale * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet regresses: ε, or v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0 for v-prediction."""
        if self.schedule.prediction_type == "epsilon":
            return noise
        signal, noise_scale = self._coefficients(timesteps, latents)
        return signal * noise - noise_scale * latents
