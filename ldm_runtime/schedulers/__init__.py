"""Noise schedules and the samplers (DDIM, Euler, DPM-Solver++ 2M), over numpy arrays or torch tensors (torch is
never imported here)."""

from ldm_runtime.schedulers.by_name import SAMPLER_NAMES, sigma_samplers
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
from ldm_runtime.schedulers.dpm_solver import DPMSolverSampler
from ldm_runtime.schedulers.euler import EulerSampler
from ldm_runtime.schedulers.schedule import NoiseSchedule
from ldm_runtime.schedulers.sigmas import SigmaSampler, SigmaTrajectory

__all__ = [
    "FINAL_TIMESTEP",
    "SAMPLER_NAMES",
    "TIMESTEP_SPACINGS",
    "DDIMConfig",
    "DDIMSampler",
    "DDIMTrajectory",
    "DPMSolverSampler",
    "EulerSampler",
    "NoiseSchedule",
    "SigmaSampler",
    "SigmaTrajectory",
    "ddim_step",
    "ddim_timesteps",
    "previous_timesteps",
    "sigma_samplers",
]
