"""The forward (noising) process used for training: q(x_t | x_0) and the regression target.

The schedule's tables are the runtime's (``ldm_runtime.schedulers.NoiseSchedule``), the same numbers DDIM
samples with; this adds the two things only training does with them, on torch tensors.
"""

from __future__ import annotations

import torch

from ldm_runtime.config import ScheduleConfig
from ldm_runtime.schedulers import NoiseSchedule


class ForwardProcess:
    """Noising at integer timesteps t in [0, T); every per-sample coefficient is gathered from float64 tables."""

    def __init__(self, schedule: ScheduleConfig):
        self.schedule = schedule
        self.alphas_cumprod = torch.from_numpy(NoiseSchedule.from_config(schedule).alphas_cumprod.copy())

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

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) per timestep, float64."""
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps]
        return alpha_bar / (1.0 - alpha_bar)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
             min_snr_gamma: float = 0.0) -> torch.Tensor:
        """The mean squared error of ``prediction`` against ``target``; with ``min_snr_gamma`` > 0, each sample's
        error weighted by min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
        Strategy"): min(SNR_t, γ) / SNR_t for ε-prediction, min(SNR_t, γ) / (SNR_t + 1) for v-prediction, so
        that the easy low-noise timesteps stop dominating the gradient. A zero-terminal-SNR step (SNR 0) weighs 1,
        as in diffusers' training scripts."""
        error = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        if min_snr_gamma <= 0:
            return error.mean()
        snr = self.snr(timesteps)
        if self.schedule.prediction_type == "epsilon":
            weight = torch.clamp(min_snr_gamma / snr, max=1.0)  # min(SNR, γ) / SNR, and 1 at SNR 0 (γ / 0 = inf)
        else:
            weight = torch.where(snr == 0, 1.0, torch.clamp(snr, max=min_snr_gamma) / (snr + 1.0))
        return (error * weight.to(error.dtype)).mean()

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet regresses: ε, or v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0 for v-prediction."""
        if self.schedule.prediction_type == "epsilon":
            return noise
        signal, noise_scale = self._coefficients(timesteps, latents)
        return signal * noise - noise_scale * latents
