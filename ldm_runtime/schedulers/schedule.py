"""The forward-process noise schedule: betas and their cumulative alpha products, in float64 on the host.

One implementation for training and sampling: ``ldm_train.diffusion.ForwardProcess`` noises training latents
with these tables, and DDIM walks them back. The settings are ``ldm_runtime.config.ScheduleConfig`` (the
``"schedule"`` entry of ``model.json`` and ``manifest.json``); this adds the tables computed from them.
LDM's "scaled_linear" schedule is linear in sqrt(beta): betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ldm_runtime.config import ScheduleConfig, config_from_dict


@dataclass(frozen=True)
class NoiseSchedule(ScheduleConfig):
    """q(x_t | x_0) = N(sqrt(alphas_cumprod[t]) x_0, (1 - alphas_cumprod[t]) I) for t in 0..T-1.

    ``betas`` and ``alphas_cumprod`` are read-only ``(T,) float64`` arrays, so one schedule can be shared
    by every request a server runs at once. ``prediction_type`` says what the UNet predicts:
    ``"epsilon"`` (the noise) or ``"v_prediction"`` (v = sqrt(a) eps - sqrt(1 - a) x_0).
    Invalid settings raise ``ConfigError`` (a ``ValueError``) naming the value.
    """

    betas: np.ndarray = field(init=False, repr=False, compare=False)
    alphas_cumprod: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()
        if self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_train_timesteps,
                                dtype=np.float64) ** 2
        else:
            betas = np.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        betas.flags.writeable = False
        alphas_cumprod.flags.writeable = False
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", alphas_cumprod)

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> "NoiseSchedule":
        """The schedule of a model's ``ScheduleConfig``."""
        return cls(**config.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NoiseSchedule":
        """The schedule described by a ``model.json`` / ``manifest.json`` "schedule" object; unknown keys raise."""
        return config_from_dict(cls, data, "schedule")
