"""The samplers a request can name: "ddim" (the model's own DDIM settings) and the sigma-space samplers."""

from __future__ import annotations

from ldm_runtime.schedulers.dpm_solver import DPMSolverSampler
from ldm_runtime.schedulers.euler import EulerSampler
from ldm_runtime.schedulers.schedule import NoiseSchedule
from ldm_runtime.schedulers.sigmas import SigmaSampler

SAMPLER_NAMES = ("ddim", "euler", "dpmpp-2m", "dpmpp-2m-karras")


def sigma_samplers(schedule: NoiseSchedule) -> dict[str, SigmaSampler]:
    """Every sampler of ``SAMPLER_NAMES`` but DDIM, by name, with diffusers' default settings."""
    samplers: list[SigmaSampler] = [EulerSampler(schedule), DPMSolverSampler(schedule),
                                    DPMSolverSampler(schedule, karras=True)]
    assert tuple(sampler.name for sampler in samplers) == SAMPLER_NAMES[1:]
    return {sampler.name: sampler for sampler in samplers}
