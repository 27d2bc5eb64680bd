"""Every sampler but DDIM against diffusers' scheduler of the same name and settings (whole trajectories driven by a
fixed random linear "model" of the sample and timestep, the stochastic ones fed the same noise), and the samplers
through the pipeline and ldm-sample: per-request state in mixed batches, seeded noise that does not depend on the
batch, the initial and input scaling, and the one-line refusals."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import (
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_lcm,
    scheduling_tcd,
)
from PIL import Image

from ldm_runtime import sample
from ldm_runtime.noise import initial_noise, step_noise
from ldm_runtime.pipeline import GenerationRequest, Pipeline, RequestError
from ldm_runtime.schedulers import (
    SAMPLER_NAMES,
    DPMSolverSampler,
    EulerAncestralSampler,
    EulerSampler,
    LCMSampler,
    NoiseSchedule,
    PLMSSampler,
    TCDSampler,
    UniPCSampler,
)
from ldm_runtime.schedulers.sigmas import spaced_timesteps
from test_pipeline import (  # noqa: F401 (session fixtures)
    PROMPTS,
    CountingEngine,
    checkpoint_dir,
    engine,
    sample_latents,
)

LATENT_SHAPE = (2, 4, 6, 5)
STOCHASTIC = ("euler-a", "dpmpp-2m-sde", "dpmpp-2m-sde-karras", "lcm", "tcd")
LINSPACE, LEADING_OFFSET_1, TRAILING = ({"timestep_spacing": "linspace"},
                                        {"timestep_spacing": "leading", "steps_offset": 1},
                                        {"timestep_spacing": "trailing"})


def samplers_and_oracles(name: str, schedule: NoiseSchedule, **spacing):
    """Our sampler and diffusers' scheduler of the same name and settings, the scheduler reading the schedule's
    float64 alpha products (its own float32 ones lose 1e-4 of sigma near timestep 0 in 1 - alphas_cumprod)."""
    ours, oracle = _sampler_and_oracle(name, schedule, **spacing)
    oracle.alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod.copy())
    return ours, oracle


def _sampler_and_oracle(name: str, schedule: NoiseSchedule, **spacing):
    settings = {"num_train_timesteps": schedule.num_train_timesteps, "beta_start": schedule.beta_start,
                "beta_end": schedule.beta_end, "beta_schedule": schedule.beta_schedule,
                "prediction_type": schedule.prediction_type, **spacing}
    if name == "euler":
        return EulerSampler(schedule, **spacing), EulerDiscreteScheduler(**settings)
    if name == "euler-a":
        return EulerAncestralSampler(schedule, **spacing), EulerAncestralDiscreteScheduler(**settings)
    if name.startswith("unipc"):
        order = 3 if name == "unipc-3" else 2
        return UniPCSampler(schedule, order=order, **spacing), UniPCMultistepScheduler(**settings, solver_order=order)
    if name == "plms":
        return PLMSSampler(schedule, **spacing), PNDMScheduler(**settings, skip_prk_steps=True)
    if name == "lcm":
        return LCMSampler(schedule), LCMScheduler(**settings)
    if name == "tcd":
        return TCDSampler(schedule), TCDScheduler(**settings)
    karras, sde = name.endswith("-karras"), "-sde" in name
    oracle = DPMSolverMultistepScheduler(**settings, algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
                                         solver_order=2, use_karras_sigmas=karras)
    return DPMSolverSampler(schedule, karras=karras, sde=sde, **spacing), oracle


def linear_model(rng: np.random.Generator):
    """A fixed random model: a channel mix of its input plus a bias that varies with the timestep."""
    mix = rng.standard_normal((4, 4)) * 0.4
    bias = rng.standard_normal((4, 1, 1))
    return lambda latents, timestep: np.einsum("ij,bjhw->bihw", mix, latents) + bias * np.cos(timestep / 300.0)


ORACLE_CASES = [
    pytest.param(name, spacing, id=f"{name}-{label}")
    for name in ("euler", "euler-a", "dpmpp-2m", "dpmpp-2m-sde", "unipc", "unipc-3", "plms")
    for label, spacing in (("linspace", LINSPACE), ("leading-offset-1", LEADING_OFFSET_1), ("trailing", TRAILING))
] + [pytest.param(name, {}, id=name) for name in ("dpmpp-2m-karras", "dpmpp-2m-sde-karras", "lcm")] + [
    # TCD's gamma (a request's eta): 0 a deterministic walk, 0.3 its authors' setting, 1 LCM's walk
    pytest.param("tcd", {"eta": gamma}, id=f"tcd-gamma-{gamma:g}") for gamma in (0.0, 0.3, 0.55, 1.0)]
ORACLE_STEPS = [pytest.param(case, steps, id=f"{case.id}-{steps}")
                for case in ORACLE_CASES for steps in (1, 2, 4, 10, 25)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case,steps", ORACLE_STEPS)
def test_sampler_trajectory_matches_diffusers_scheduler(case, steps, prediction_type, rng, monkeypatch):
    name, spacing = case.values
    spacing = dict(spacing)
    eta = {"eta": spacing.pop("eta")} if "eta" in spacing else {}
    schedule = NoiseSchedule(prediction_type=prediction_type)
    ours, oracle = samplers_and_oracles(name, schedule, **spacing)
    oracle.set_timesteps(steps)
    trajectory = ours.trajectory(steps)
    np.testing.assert_array_equal(trajectory.timesteps, oracle.timesteps.double().numpy())
    assert ours.stochastic == (name in STOCHASTIC)
    model = linear_model(rng)
    noise = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
    step_noises = rng.standard_normal((len(trajectory),) + LATENT_SHAPE).astype(np.float32)
    drawn = []  # diffusers draws its per-step noise through randn_tensor: it gets ours, in order

    def randn_tensor(shape, dtype=None, **kwargs):
        drawn.append(shape)
        return torch.from_numpy(step_noises[len(drawn) - 1]).to(dtype)

    for module in (scheduling_euler_ancestral_discrete, scheduling_dpmsolver_multistep, scheduling_lcm,
                   scheduling_tcd):
        monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    # ours in float32 as the engines hold latents; diffusers' schedulers compute in float32 too
    latents = noise * np.float32(ours.initial_noise_scale(trajectory))
    expected = torch.from_numpy(noise) * oracle.init_noise_sigma
    rows = [trajectory] * LATENT_SHAPE[0]
    history = ()
    for index in range(len(trajectory)):
        scales = ours.input_scales(rows, [index] * len(rows)).astype(np.float32).reshape(-1, 1, 1, 1)
        output = model(latents / scales, trajectory.timesteps[index]).astype(np.float32)
        latents, history = ours.step(output, rows, [index] * len(rows), latents, history,
                                     step_noises[index] if ours.stochastic else None, **eta)
        assert len(history) == ours.history_size
        timestep = oracle.timesteps[index]
        model_input = oracle.scale_model_input(expected, timestep)
        oracle_output = torch.from_numpy(model(model_input.double().numpy(), float(timestep)).astype(np.float32))
        expected = oracle.step(oracle_output, timestep, expected, **eta).prev_sample
    assert latents.dtype == np.float32
    if name in ("lcm", "tcd"):  # their last step draws none, and TCD at gamma 0 none at all
        assert len(drawn) == (0 if eta.get("eta") == 0 else len(trajectory) - 1)
    elif name in STOCHASTIC:
        assert len(drawn) == len(trajectory)
    expected = expected.double().numpy()
    error = np.abs(latents - expected).max() / np.abs(expected).max()
    assert error <= 1e-5, error


@pytest.mark.parametrize("name,steps,indices", [
    pytest.param("dpmpp-2m-karras", (7, 12, 5), (0, 5, 4), id="dpmpp-2m-karras"),
    pytest.param("dpmpp-2m-sde", (7, 12, 5), (0, 5, 4), id="dpmpp-2m-sde"),
    pytest.param("unipc-3", (7, 12, 5, 9), (0, 1, 4, 6), id="unipc-3"),
    pytest.param("plms", (7, 12, 5, 9), (0, 1, 2, 7), id="plms"),
    pytest.param("euler-a", (7, 12), (0, 11), id="euler-a"),
    pytest.param("lcm", (7, 12), (3, 11), id="lcm"),
    pytest.param("tcd", (7, 12, 9), (3, 11, 0), id="tcd"),
])
def test_rows_at_different_steps_of_different_trajectories_step_as_they_would_alone(name, steps, indices, rng):
    """Rows at the first step, multistep steps and the last step, in one call, each as if alone; the history and the
    noise count."""
    sampler = samplers_and_oracles(name, NoiseSchedule())[0]
    trajectories = [sampler.trajectory(count) for count in steps]
    batch = len(steps)
    latents, output, noise = (rng.standard_normal((batch, 4, 4, 4)).astype(np.float32) for _ in range(3))
    history = tuple(rng.standard_normal((batch, 4, 4, 4)).astype(np.float32) for _ in range(sampler.history_size))
    noise = noise if sampler.stochastic else None
    etas = [0.3, 0.0, 0.8][:batch] if sampler.takes_eta else None  # TCD's gamma, each row its own

    def rows(arrays, row):
        return tuple(array[row:row + 1] for array in arrays)

    def eta(row=None):
        return {} if etas is None else {"eta": etas if row is None else etas[row:row + 1]}

    together, together_history = sampler.step(output, trajectories, indices, latents, history, noise, **eta())
    for row in range(batch):
        alone, alone_history = sampler.step(output[row:row + 1], trajectories[row:row + 1], indices[row:row + 1],
                                            latents[row:row + 1], rows(history, row),
                                            None if noise is None else noise[row:row + 1], **eta(row))
        assert np.array_equal(together[row:row + 1], alone)
        assert all(np.array_equal(a, b) for a, b in zip(rows(together_history, row), alone_history))
    changed = []  # (row, its step with its history or its noise moved by 1)
    if history:
        row = next(row for row in range(batch) if 0 < indices[row] < len(trajectories[row]) - 1)
        changed.append((row, sampler.step(output[row:row + 1], trajectories[row:row + 1], indices[row:row + 1],
                                          latents[row:row + 1], tuple(array + 1 for array in rows(history, row)),
                                          None if noise is None else noise[row:row + 1])[0]))
    if noise is not None:
        row = next(row for row in range(batch) if indices[row] < len(trajectories[row]) - 1)
        changed.append((row, sampler.step(output[row:row + 1], trajectories[row:row + 1], indices[row:row + 1],
                                          latents[row:row + 1], rows(history, row), noise[row:row + 1] + 1,
                                          **eta(row))[0]))
    if etas is not None:  # another gamma moves the row
        changed.append((0, sampler.step(output[:1], trajectories[:1], indices[:1], latents[:1], rows(history, 0),
                                        noise[:1], eta=[0.6])[0]))
    assert changed and all(not np.array_equal(together[row:row + 1], other) for row, other in changed)


def test_pipeline_image_is_identical_alone_or_batched_with_other_samplers_and_step_counts(engine, rng):
    pipeline = Pipeline(engine)
    settings = [("euler", 4, 0.0), ("dpmpp-2m", 5, 0.0), ("dpmpp-2m-karras", 3, 0.0), ("ddim", 6, 0.5),
                ("ddim", 2, 0.0), ("euler", 7, 0.0), ("unipc", 5, 0.0), ("unipc-3", 6, 0.0), ("plms", 4, 0.0),
                ("euler-a", 3, 0.0), ("lcm", 4, 0.0), ("dpmpp-2m-sde-karras", 5, 0.0), ("tcd", 4, 0.3),
                ("tcd", 3, 0.0)]
    seeds = rng.choice(2**62, size=len(settings), replace=False).tolist()
    requests = [GenerationRequest(prompt=PROMPTS[i % len(PROMPTS)], seed=seed, sampler=sampler, steps=steps, eta=eta,
                                  guidance_scale=[1.0, 3.0][i % 2])
                for i, (seed, (sampler, steps, eta)) in enumerate(zip(seeds, settings))]
    batched = pipeline.generate(requests)
    for request, image in zip(requests, batched):
        assert np.array_equal(pipeline.generate([request])[0], image), request.sampler
    # 6 steps: UniPC-3 is third order only from its third step to the third from last, so 4 steps match UniPC
    alone = [sample_latents(pipeline, [GenerationRequest(prompt=PROMPTS[0], seed=seeds[0], sampler=name, steps=6)])[0]
             for name in SAMPLER_NAMES]
    for index, name in enumerate(SAMPLER_NAMES):
        assert all(not torch.equal(alone[index], other) for other in alone[index + 1:]), f"{name} must differ"


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_sampler_latents_are_identical_alone_or_in_a_mixed_batch(engine, name, rng):
    """The request's per-step noise comes from its seed: batch mates of other samplers, steps and seeds (one of them
    of the same sampler) change nothing, and another seed changes the result."""
    pipeline = Pipeline(engine)
    seeds = rng.choice(2**62, size=5, replace=False).tolist()
    eta = 0.3 if name == "tcd" else 0.0  # TCD draws noise at gamma > 0 only
    request = GenerationRequest(prompt=PROMPTS[0], seed=seeds[0], sampler=name, steps=5, guidance_scale=2.0, eta=eta)
    mates = [GenerationRequest(prompt=PROMPTS[1], seed=seeds[1], sampler=name, steps=3, eta=eta / 2),
             GenerationRequest(prompt=PROMPTS[2], seed=seeds[2], sampler="plms", steps=6, guidance_scale=1.0),
             GenerationRequest(prompt=PROMPTS[3], seed=seeds[3], sampler="ddim", steps=4, eta=0.8),
             GenerationRequest(prompt=PROMPTS[0], seed=seeds[4], sampler="unipc", steps=7)]
    [alone] = sample_latents(pipeline, [request])
    for batch in ([mates[0], request, *mates[1:]], [*mates[1:3], request], [request, mates[0]]):
        assert torch.equal(sample_latents(pipeline, batch)[batch.index(request)], alone)
    [other_seed] = sample_latents(pipeline, [GenerationRequest(**{**request.__dict__, "seed": seeds[1]})])
    assert not torch.equal(other_seed, alone)


@pytest.mark.parametrize("name", SAMPLER_NAMES[1:])
def test_pipeline_scales_the_noise_and_the_unet_input_as_the_sampler_says(engine, name, rng):
    """The pipeline's latents against a hand-written loop over the engine (guidance 1: one UNet row each) that keeps
    the sampler's history and draws its step noise from the seed; one UNet call per trajectory entry."""
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
    history = ()
    for index in range(len(trajectory)):
        scale = sampler.input_scales([trajectory], [index])
        unet_input = latents / engine.to_array(scale.reshape(-1, 1, 1, 1), latents)
        timestep = np.rint(trajectory.timesteps[index:index + 1]).astype(np.int64)
        output = engine.unet(unet_input, timestep, context, mask)
        noise = engine.to_array(step_noise([seed], [index], shape), latents) if sampler.stochastic else None
        latents, history = sampler.step(output, [trajectory], [index], latents, history, noise,
                                        to_array=engine.to_array)
    assert torch.allclose(latents_from_pipeline, latents, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_plms_steps_make_as_many_unet_calls_as_diffusers_pndm(engine, steps):
    counting = CountingEngine(engine)
    pipeline = Pipeline(counting)
    pipeline.generate([GenerationRequest(prompt=PROMPTS[0], seed=3, sampler="plms", steps=steps)])
    oracle = PNDMScheduler(skip_prk_steps=True)
    oracle.set_timesteps(steps)
    assert [int(call["timesteps"][0]) for call in counting.unet_calls] == oracle.timesteps.tolist()


def test_unknown_sampler_eta_without_ddim_or_tcd_and_unplannable_steps_are_refused(engine):
    pipeline = Pipeline(engine)
    with pytest.raises(RequestError) as raised:
        pipeline.validate(GenerationRequest(prompt="a red circle", seed=1, sampler="heun"))
    assert str(raised.value) == ("sampler is 'heun'; expected one of ddim, euler, euler-a, dpmpp-2m, dpmpp-2m-karras, "
                                 "dpmpp-2m-sde, dpmpp-2m-sde-karras, unipc, unipc-3, plms, lcm, tcd")
    assert raised.value.field == "sampler"
    for name in SAMPLER_NAMES[1:-1]:
        with pytest.raises(RequestError) as raised:
            pipeline.validate(GenerationRequest(prompt="a red circle", seed=1, sampler=name, eta=0.5))
        assert str(raised.value) == (f"eta is 0.5; expected 0 for the {name} sampler (eta applies to ddim and tcd "
                                     f"only)")
    pipeline.validate(GenerationRequest(prompt="a red circle", seed=1, sampler="tcd", eta=0.5))
    with pytest.raises(RequestError) as raised:
        pipeline.validate(GenerationRequest(prompt="a red circle", seed=1, sampler="lcm", steps=51))
    assert str(raised.value).startswith("steps is 51; the lcm sampler cannot take them: num_inference_steps is 51; "
                                        "expected an integer from 1 to 50")
    assert raised.value.field == "steps" and "\n" not in str(raised.value)
    with pytest.raises(ValueError, match=r"^num_inference_steps 1000 gives timestep \d+ after \d+; expected distinct "
                                         r"timesteps below 1000 \(use fewer steps\)$"):
        DPMSolverSampler(NoiseSchedule()).trajectory(1000)  # rounded linspace repeats a timestep: h would be 0
    with pytest.raises(ValueError, match=r"^num_inference_steps 999 starts at timestep 1000; expected distinct"):
        DPMSolverSampler(NoiseSchedule(), timestep_spacing="leading", steps_offset=1).trajectory(999)  # listed 999


def test_plms_trailing_plans_n_steps_where_diffusers_float_arange_gives_one_more():
    for steps in (61, 103, 121):  # diffusers' PNDM lists a timestep -1 there (and reads alphas_cumprod[-1])
        planned = PLMSSampler(NoiseSchedule(), timestep_spacing="trailing").trajectory(steps)
        expected = spaced_timesteps(1000, steps, "trailing", 0, endpoint_extra=0)
        assert sorted(set(planned.timesteps.tolist())) == sorted(expected.astype(int).tolist())
        assert planned.timesteps.min() >= 0 and len(planned.timesteps) == steps + 1  # the first step's redo


@pytest.mark.parametrize("name,eta", [("dpmpp-2m-sde", 0.0), ("tcd", 0.3)])
def test_ldm_sample_sampler_flag_writes_the_pipelines_image_and_names_the_sampler(checkpoint_dir, engine, tmp_path,
                                                                                  capsys, name, eta):
    out = tmp_path / "one.png"
    code = sample.main(["--model", str(checkpoint_dir), "a red circle", "--seed", "3", "--steps", "4",
                        "--sampler", name, "--eta", str(eta), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    request = GenerationRequest(prompt="a red circle", seed=3, steps=4, sampler=name, eta=eta)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), Pipeline(engine).generate([request])[0])
    recorded = json.loads(Image.open(out).text["parameters"])
    assert (recorded["sampler"], recorded["eta"]) == (name, eta)


def test_ldm_sample_refuses_an_unknown_sampler_in_one_line_with_exit_2(checkpoint_dir, tmp_path, capsys):
    code = sample.main(["--model", str(checkpoint_dir), "a red circle", "--sampler", "heun",
                        "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("ldm-sample: error: ") and "'heun'" in err, err
    assert all(name in err for name in SAMPLER_NAMES) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("make, message", [
    (lambda: EulerSampler(NoiseSchedule(), steps_offset=-5),
     "euler steps_offset is -5; expected an integer from 0 to 999"),
    (lambda: EulerSampler(NoiseSchedule(), steps_offset=2.5), "euler steps_offset is 2.5"),
    (lambda: DPMSolverSampler(NoiseSchedule(), timestep_spacing="leading", steps_offset=-3),
     "dpmpp-2m steps_offset is -3"),  # shifted every timestep down by 3
    (lambda: UniPCSampler(NoiseSchedule(), steps_offset=1000), "unipc steps_offset is 1000"),
    (lambda: PLMSSampler(NoiseSchedule(), steps_offset=-3), "plms steps_offset is -3"),
    (lambda: LCMSampler(NoiseSchedule(), original_inference_steps=2.5),  # an IndexError at its first trajectory
     "lcm original_inference_steps 2.5 is out of range; expected an integer from 1 to 1000"),
    (lambda: LCMSampler(NoiseSchedule(), original_inference_steps="50"), "lcm original_inference_steps '50'"),
    (lambda: TCDSampler(NoiseSchedule(), original_inference_steps=True), "tcd original_inference_steps True"),
])
def test_a_samplers_own_settings_are_checked_when_it_is_made(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()
