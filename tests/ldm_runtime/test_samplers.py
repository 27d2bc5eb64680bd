"""Euler and DPM-Solver++(2M) against diffusers' schedulers of the same name and settings (whole trajectories driven
by a fixed random linear "model" of the sample and timestep), and the samplers through the pipeline and ldm-sample:
per-request state in mixed batches, the initial and input scaling, and the one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from PIL import Image

from ldm_runtime import sample
from ldm_runtime.noise import initial_noise
from ldm_runtime.pipeline import GenerationRequest, Pipeline, RequestError
from ldm_runtime.schedulers import SAMPLER_NAMES, DPMSolverSampler, EulerSampler, NoiseSchedule
from test_pipeline import PROMPTS, checkpoint_dir, engine, sample_latents  # noqa: F401 (session fixtures)

LATENT_SHAPE = (2, 4, 6, 5)


def samplers_and_oracles(name: str, schedule: NoiseSchedule, **spacing):
    """Our sampler and diffusers' scheduler of the same name and settings."""
    settings = {"num_train_timesteps": schedule.num_train_timesteps, "beta_start": schedule.beta_start,
                "beta_end": schedule.beta_end, "beta_schedule": schedule.beta_schedule,
                "prediction_type": schedule.prediction_type, **spacing}
    if name == "euler":
        return EulerSampler(schedule, **spacing), EulerDiscreteScheduler(**settings)
    karras = name == "dpmpp-2m-karras"
    oracle = DPMSolverMultistepScheduler(**settings, algorithm_type="dpmsolver++", solver_order=2,
                                         use_karras_sigmas=karras)
    return DPMSolverSampler(schedule, karras=karras, **spacing), oracle


def linear_model(rng: np.random.Generator):
    """A fixed random model: a channel mix of its input plus a bias that varies with the timestep."""
    mix = rng.standard_normal((4, 4)) * 0.4
    bias = rng.standard_normal((4, 1, 1))
    return lambda latents, timestep: np.einsum("ij,bjhw->bihw", mix, latents) + bias * np.cos(timestep / 300.0)


@pytest.mark.parametrize("steps", [4, 10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name,spacing", [
    pytest.param("euler", {}, id="euler"),
    pytest.param("euler", {"timestep_spacing": "leading", "steps_offset": 1}, id="euler-leading-offset-1"),
    pytest.param("dpmpp-2m", {}, id="dpmpp-2m"),
    pytest.param("dpmpp-2m-karras", {}, id="dpmpp-2m-karras"),
])
def test_sampler_trajectory_matches_diffusers_scheduler(name, spacing, prediction_type, steps, rng):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    ours, oracle = samplers_and_oracles(name, schedule, **spacing)
    oracle.set_timesteps(steps)
    trajectory = ours.trajectory(steps)
    np.testing.assert_array_equal(trajectory.timesteps, oracle.timesteps.double().numpy())
    model = linear_model(rng)
    noise = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
    # ours in float32 as the engines hold latents; diffusers' schedulers compute in float32 too
    latents = noise * np.float32(ours.initial_noise_scale(trajectory))
    expected = torch.from_numpy(noise) * oracle.init_noise_sigma
    rows = [trajectory] * LATENT_SHAPE[0]
    previous = None
    for index in range(steps):
        scales = ours.input_scales(rows, [index] * len(rows)).astype(np.float32).reshape(-1, 1, 1, 1)
        output = model(latents / scales, trajectory.timesteps[index]).astype(np.float32)
        latents, previous = ours.step(output, rows, [index] * len(rows), latents, previous)
        timestep = oracle.timesteps[index]
        model_input = oracle.scale_model_input(expected, timestep)
        oracle_output = torch.from_numpy(model(model_input.double().numpy(), float(timestep)).astype(np.float32))
        expected = oracle.step(oracle_output, timestep, expected).prev_sample
    assert latents.dtype == np.float32
    expected = expected.double().numpy()
    error = np.abs(latents - expected).max() / np.abs(expected).max()
    assert error <= 1e-5, error


def test_rows_at_different_steps_of_different_trajectories_step_as_they_would_alone(rng):
    """DPM-Solver++ rows at step 0, a second-order step and the last step, in one call, each as if alone."""
    sampler = DPMSolverSampler(NoiseSchedule(), karras=True)
    trajectories = [sampler.trajectory(steps) for steps in (7, 12, 5)]
    indices = [0, 5, 4]
    latents = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    output = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    previous = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    together, _ = sampler.step(output, trajectories, indices, latents, previous)
    for row in range(3):
        alone, _ = sampler.step(output[row:row + 1], trajectories[row:row + 1], indices[row:row + 1],
                                latents[row:row + 1], previous[row:row + 1])
        assert np.array_equal(together[row:row + 1], alone)
    assert not np.array_equal(together[1], sampler.step(output[1:2], trajectories[1:2], [5], latents[1:2],
                                                        previous[1:2] + 1)[0][0]), "the previous x_0 must count"


def test_pipeline_image_is_identical_alone_or_batched_with_other_samplers_and_step_counts(engine, rng):
    pipeline = Pipeline(engine)
    seeds = rng.choice(2**62, size=6, replace=False).tolist()
    settings = [("euler", 4, 0.0), ("dpmpp-2m", 5, 0.0), ("dpmpp-2m-karras", 3, 0.0), ("ddim", 6, 0.5),
                ("ddim", 2, 0.0), ("euler", 7, 0.0)]
    requests = [GenerationRequest(prompt=PROMPTS[i % len(PROMPTS)], seed=seed, sampler=sampler, steps=steps, eta=eta,
                                  guidance_scale=[1.0, 3.0][i % 2])
                for i, (seed, (sampler, steps, eta)) in enumerate(zip(seeds, settings))]
    batched = pipeline.generate(requests)
    for request, image in zip(requests, batched):
        assert np.array_equal(pipeline.generate([request])[0], image), request.sampler
    alone = [pipeline.generate([GenerationRequest(prompt=PROMPTS[0], seed=seeds[0], sampler=name, steps=4)])[0]
             for name in SAMPLER_NAMES]
    assert all(not np.array_equal(alone[0], image) for image in alone[1:]), "each sampler must change the image"


@pytest.mark.parametrize("name", ["euler", "dpmpp-2m-karras"])
def test_pipeline_scales_the_noise_and_the_unet_input_as_the_sampler_says(engine, name, rng):
    """The pipeline's latents against a hand-written loop over the engine (guidance 1: one UNet row each)."""
    pipeline = Pipeline(engine)
    seed, steps = int(rng.integers(2**62)), 5
    request = GenerationRequest(prompt=PROMPTS[1], seed=seed, sampler=name, steps=steps, guidance_scale=1.0)
    [latents_from_pipeline] = sample_latents(pipeline, [request])

    sampler = pipeline.sigma_samplers[name]
    trajectory = sampler.trajectory(steps)
    context, mask = engine.encode_text([PROMPTS[1]])
    shape = (engine.info.latent_channels, engine.info.image_size // engine.info.latent_factor,
             engine.info.image_size // engine.info.latent_factor)
    latents = engine.to_array(initial_noise([seed], shape) * np.float32(sampler.initial_noise_scale(trajectory)))
    previous = None
    for index in range(steps):
        scale = sampler.input_scales([trajectory], [index])
        unet_input = latents / engine.to_array(scale.reshape(-1, 1, 1, 1), latents)
        timestep = np.rint(trajectory.timesteps[index:index + 1]).astype(np.int64)
        output = engine.unet(unet_input, timestep, context, mask)
        latents, previous = sampler.step(output, [trajectory], [index], latents, previous, to_array=engine.to_array)
    assert torch.allclose(latents_from_pipeline, latents, rtol=1e-5, atol=1e-5)


def test_unknown_sampler_eta_without_ddim_and_repeated_solver_timesteps_are_refused(engine):
    pipeline = Pipeline(engine)
    with pytest.raises(RequestError) as raised:
        pipeline.validate(GenerationRequest(prompt="a red circle", seed=1, sampler="heun"))
    assert str(raised.value) == "sampler is 'heun'; expected one of ddim, euler, dpmpp-2m, dpmpp-2m-karras"
    assert raised.value.field == "sampler"
    with pytest.raises(RequestError, match="eta is 0.5; expected 0 for the deterministic euler sampler"):
        pipeline.validate(GenerationRequest(prompt="a red circle", seed=1, sampler="euler", eta=0.5))
    with pytest.raises(ValueError, match="num_inference_steps 1000 gives the timesteps .*; expected distinct"):
        DPMSolverSampler(NoiseSchedule()).trajectory(1000)  # rounded linspace repeats a timestep: h would be 0


def test_ldm_sample_sampler_flag_writes_the_pipelines_image_and_names_the_sampler(checkpoint_dir, engine, tmp_path,
                                                                                  capsys):
    out = tmp_path / "one.png"
    code = sample.main(["--model", str(checkpoint_dir), "a red circle", "--seed", "3", "--steps", "4",
                        "--sampler", "dpmpp-2m", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    request = GenerationRequest(prompt="a red circle", seed=3, steps=4, sampler="dpmpp-2m")
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), Pipeline(engine).generate([request])[0])
    assert json.loads(Image.open(out).text["parameters"])["sampler"] == "dpmpp-2m"


def test_ldm_sample_refuses_an_unknown_sampler_in_one_line_with_exit_2(checkpoint_dir, tmp_path, capsys):
    code = sample.main(["--model", str(checkpoint_dir), "a red circle", "--sampler", "heun",
                        "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("ldm-sample: error: ") and "'heun'" in err, err
    assert "dpmpp-2m-karras" in err and not (tmp_path / "out").exists()
