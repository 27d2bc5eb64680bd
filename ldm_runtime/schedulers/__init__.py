"""Noise schedules and the samplers (DDIM, Euler and Euler ancestral, DPM-Solver++ 2M and its SDE form, UniPC, PLMS,
LCM, TCD), over numpy arrays or torch tensors (torch is never imported here)."""

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
from ldm_runtime.schedulers.euler import EulerAncestralSampler, EulerSampler
from ldm_runtime.schedulers.lcm import LCMSampler
from ldm_runtime.schedulers.plms import PLMSSampler, PLMSTrajectory
from ldm_runtime.schedulers.schedule import NoiseSchedule
from ldm_runtime.schedulers.sigmas import SigmaSampler, SigmaTrajectory
from ldm_runtime.schedulers.tcd import TCDSampler
from ldm_runtime.schedulers.unipc import UniPCSampler

__all__ = [
    "FINAL_TIMESTEP",
    "SAMPLER_NAMES",
    "TIMESTEP_SPACINGS",
    "DDIMConfig",
    "DDIMSampler",
    "DDIMTrajectory",
    "DPMSolverSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "LCMSampler",
    "NoiseSchedule",
    "PLMSSampler",
    "PLMSTrajectory",
    "SigmaSampler",
    "SigmaTrajectory",
    "TCDSampler",
    "UniPCSampler",
    "ddim_step",
    "ddim_timesteps",
    "previous_timesteps",
    "sigma_samplers",
]
