"""Noise schedules and the DDIM sampler, over numpy arrays or torch tensors (torch is never imported here)."""

from ldm_runtime.schedulers.ddim import (
    FINAL_TIMESTEP,
    TIMESTEP_SPACINGS,
    DDIMConfig,
    DDIMSampler,
    DDIMTrajectory,
    ddim_step,
    ddim_timesteps,
    previous_timesteps,
)
from ldm_runtime.schedulers.schedule import NoiseSchedule

__all__ = [
    "FINAL_TIMESTEP",
    "TIMESTEP_SPACINGS",
    "DDIMConfig",
    "DDIMSampler",
    "DDIMTrajectory",
    "NoiseSchedule",
    "ddim_step",
    "ddim_timesteps",
    "previous_timesteps",
]
