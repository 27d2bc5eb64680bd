"""The forward-process noise schedule: betas and their cumulative alpha products, in float64 on the host.

Built from the ``"schedule"`` entry of the checkpoint's ``model.json`` (the same keys as
``train.config.ScheduleConfig``; the runtime reads the JSON, never the training code).
LDM's "scaled_linear" schedule is linear in sqrt(beta): betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class NoiseSchedule:
    """q(x_t | x_0) = N(sqrt(alphas_cumprod[t]) x_0, (1 - alphas_cumprod[t]) I) for t in 0..T-1.

    ``betas`` and ``alphas_cumprod`` are read-only ``(T,) float64`` arrays, so one schedule can be shared
    by every request a server runs at once. ``prediction_type`` says what the UNet predicts:
    ``"epsilon"`` (the noise) or ``"v_prediction"`` (v = sqrt(a) eps - sqrt(1 - a) x_0).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    betas: np.ndarray = field(init=False, repr=False, compare=False)
    alphas_cumprod: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate()
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

    def _validate(self) -> None:
        count = self.num_train_timesteps
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"schedule num_train_timesteps is {count!r}; expected a positive integer")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"schedule beta_schedule {self.beta_schedule!r} is not one of {BETA_SCHEDULES}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"schedule prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
                raise ValueError(f"schedule {name} is {value!r}; expected a number")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(
                f"schedule betas ({self.beta_start}, {self.beta_end}) must satisfy 0 < beta_start < beta_end < 1"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NoiseSchedule":
        """The schedule described by a ``model.json`` / ``manifest.json`` "schedule" object; unknown keys raise."""
        if not isinstance(data, dict):
            raise ValueError(f"schedule is {type(data).__name__}; expected an object")
        known = sorted(f.name for f in dataclasses.fields(cls) if f.init)
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"schedule has unknown keys {unknown}; expected some of {known}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``from_dict`` reads back (betas are derived, so they are not stored)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
