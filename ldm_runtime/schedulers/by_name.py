"""The samplers a request can name: "ddim" (the model's own DDIM settings) and the others, by name."""

from __future__ import annotations

import dataclasses

from ldm_runtime.config import SAMPLER_NAMES, SamplerDefaults
from ldm_runtime.schedulers.dpm_solver import DPMSolverSampler
from ldm_runtime.schedulers.euler import EulerAncestralSampler, EulerSampler
from ldm_runtime.schedulers.lcm import LCMSampler
from ldm_runtime.schedulers.plms import PLMSSampler
from ldm_runtime.schedulers.schedule import NoiseSchedule
from ldm_runtime.schedulers.sigmas import SigmaSampler
from ldm_runtime.schedulers.tcd import TCDSampler
from ldm_runtime.schedulers.unipc import UniPCSampler

__all__ = ["SAMPLER_NAMES", "sigma_samplers"]


def sigma_samplers(schedule: NoiseSchedule, defaults: SamplerDefaults | None = None,
                   set_alpha_to_one: bool = False) -> dict[str, SigmaSampler]:
    """Every sampler of ``SAMPLER_NAMES`` but DDIM, by name, with diffusers' default settings but where
    ``defaults`` (a model's ``default_sampler``) names a ``timestep_spacing`` or ``steps_offset``: those apply to
    every sampler that spaces its timesteps (LCM and TCD take their own from the distillation schedule), as diffusers'
    ``from_config`` carries them to any scheduler. ``set_alpha_to_one`` is PLMS's final alpha (the model's DDIM
    setting, as diffusers' PNDMScheduler reads it from the same file)."""
    samplers: list[SigmaSampler] = [
        EulerSampler(schedule), EulerAncestralSampler(schedule),
        DPMSolverSampler(schedule), DPMSolverSampler(schedule, karras=True),
        DPMSolverSampler(schedule, sde=True), DPMSolverSampler(schedule, karras=True, sde=True),
        UniPCSampler(schedule), UniPCSampler(schedule, order=3),
        PLMSSampler(schedule, set_alpha_to_one=set_alpha_to_one), LCMSampler(schedule), TCDSampler(schedule),
    ]
    assert tuple(sampler.name for sampler in samplers) == SAMPLER_NAMES[1:]
    overrides = {}
    if defaults is not None and defaults.timestep_spacing is not None:
        overrides["timestep_spacing"] = defaults.timestep_spacing
    if defaults is not None and defaults.steps_offset is not None:
        overrides["steps_offset"] = defaults.steps_offset
    if overrides:
        samplers = [dataclasses.replace(sampler, **overrides)
                    if all(hasattr(sampler, name) for name in overrides) else sampler for sampler in samplers]
    return {sampler.name: sampler for sampler in samplers}
