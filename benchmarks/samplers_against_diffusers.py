"""Every sampler against diffusers' scheduler of the same name on a real model's UNet, with guidance.

    OMP_NUM_THREADS=2 python benchmarks/samplers_against_diffusers.py --model models/shapes-demo

The test suite checks each sampler step by step against diffusers on random models (tests/ldm_runtime/
test_samplers.py); this runs the whole guided loop on a trained model (the torch engine, fp32), our pipeline
against diffusers' scheduler driving the same UNet calls from the same x_T, and prints the latents' relative
error (max |ours - theirs| / max |theirs|) for each sampler and step count. The stochastic samplers get the same
per-step noise (``ldm_runtime.noise.step_noise``, handed to diffusers' ``randn_tensor``). Where a sampler gives
poor images on a model, this tells the solver's own behaviour apart from a mistake of ours.
"""

from __future__ import annotations

import argparse
import sys

import diffusers
import numpy as np
import torch
from diffusers.schedulers import scheduling_dpmsolver_multistep, scheduling_euler_ancestral_discrete, scheduling_lcm

from ldm_runtime.engines.torch_engine import TorchEngine
from ldm_runtime.noise import initial_noise, step_noise
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from ldm_tools.bench.diffusers_peers import PIPELINE_SCHEDULERS  # our sampler -> diffusers' class and settings


def diffusers_latents(engine: TorchEngine, scheduler, prompt: str, seed: int, steps: int, guidance: float,
                      alphas_cumprod: torch.Tensor) -> torch.Tensor:
    scheduler.alphas_cumprod = alphas_cumprod  # our float64 table, as the oracle tests hand it over
    scheduler.set_timesteps(steps)
    info = engine.info
    side = info.image_size // info.latent_factor
    shape = (info.latent_channels, side, side)
    context, mask = engine.encode_text([prompt, ""])
    drawn = []

    def randn_tensor(shape_, dtype=None, **kwargs):
        drawn.append(shape_)
        return torch.from_numpy(step_noise([seed], [len(drawn) - 1], shape)).to(dtype)

    for module in (scheduling_euler_ancestral_discrete, scheduling_dpmsolver_multistep, scheduling_lcm):
        module.randn_tensor = randn_tensor
    latents = torch.from_numpy(initial_noise([seed], shape)) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, timestep)
        rows = torch.cat([model_input, model_input])
        output = engine.unet(rows, np.array([int(round(float(timestep)))] * 2, dtype=np.int64), context, mask)
        conditional, unconditional = output[0:1], output[1:2]
        guided = unconditional + guidance * (conditional - unconditional)
        latents = scheduler.step(guided, timestep, latents).prev_sample
    return latents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a checkpoint dir")
    parser.add_argument("--steps", default="6,10", help="comma-separated step counts (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--prompt", default="a blue square on the left")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    engine = TorchEngine(args.model, device="cpu")
    pipeline = Pipeline(engine)
    schedule = pipeline.sampler.schedule
    settings = {"num_train_timesteps": schedule.num_train_timesteps, "beta_start": schedule.beta_start,
                "beta_end": schedule.beta_end, "beta_schedule": schedule.beta_schedule,
                "prediction_type": schedule.prediction_type}
    alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod)
    print("| sampler | steps | latent relative error against diffusers |")
    print("|---|---|---|")
    worst = 0.0
    for name, (class_name, extra) in PIPELINE_SCHEDULERS.items():
        scheduler_class = getattr(diffusers, class_name)
        for steps in (int(value) for value in args.steps.split(",")):
            theirs = diffusers_latents(engine, scheduler_class(**settings, **extra), args.prompt, args.seed, steps,
                                       args.guidance, alphas_cumprod)
            states = pipeline.start([GenerationRequest(prompt=args.prompt, seed=args.seed, sampler=name, steps=steps,
                                                       guidance_scale=args.guidance)])
            while not states[0].done:
                states = pipeline.advance(states)
            error = float((states[0].latents - theirs).abs().max() / theirs.abs().max())
            worst = max(worst, error)
            print(f"| {name} | {steps} | {error:.1e} |", flush=True)
    print(f"\nworst: {worst:.1e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
