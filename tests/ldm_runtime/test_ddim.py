"""DDIM, the noise schedule and classifier-free guidance, with diffusers' DDIMScheduler as the oracle.

diffusers' ``step`` takes the previous timestep to be ``t - T // N``. For the ``trailing`` and ``linspace``
spacings that is not the next entry of its own timestep list (diffusers issues #9261, #11347, #12633), so
those loops are compared against diffusers' ``step`` with its lookup of alpha_prev redirected to the correct
previous timestep (``_diffusers_step``), and, independently, against eq. 12 of Song et al. (2021) written
out in float64 below. ``leading``, and every spacing with ``previous_timestep="diffusers"``, is also compared
against diffusers' unmodified ``step``.

The loops run in float64 with diffusers' alpha table replaced by the float64 schedule, so a mismatch
measures the step, not float32 rounding of the table; the table itself is compared with diffusers' float32
one separately.
"""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ldm_runtime.arrays import host_to_array_like
from ldm_runtime.config import ScheduleConfig
from ldm_runtime.guidance import GuidedBatch, apply_guidance
from ldm_runtime.noise import initial_noise, step_noise
from ldm_runtime.schedulers import (
    DDIMConfig,
    DDIMSampler,
    DDIMTrajectory,
    NoiseSchedule,
    ddim_step,
    ddim_timesteps,
)

LATENT_SHAPE = (4, 4, 4)
PREDICTION_TYPES = ("epsilon", "v_prediction")
# (clip_sample, use_clipped_model_output): no clipping, clipping, clipping with epsilon re-derived from x_0
CLIPPING = ((False, False), (True, False), (True, True))


def _assert_close(actual, expected, rtol: float, what: str = "") -> None:
    """max |actual - expected| <= rtol * max |expected| (relative to the array's scale, not elementwise)."""
    actual = actual.detach().cpu().double().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    expected = expected.detach().cpu().double().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.max(np.abs(expected))
    assert scale > 0, "comparing against zeros proves nothing"
    error = np.max(np.abs(actual.astype(np.float64) - expected))
    assert error <= rtol * scale, f"{what}: max error {error:.3e} > {rtol:.0e} x scale {scale:.3e}"


def _pseudo_model(sample, timesteps, phase: np.ndarray, context=None):
    """A fixed stand-in for the UNet: 0.3 x + sin(0.01 t + phase) (+ 0.2 context), any array type."""
    wave = np.sin(0.01 * np.asarray(timesteps, dtype=np.float64).reshape(-1, 1, 1, 1) + phase)
    output = 0.3 * sample + host_to_array_like(wave, sample)
    return output if context is None else output + 0.2 * context


def _diffusers_scheduler(schedule: NoiseSchedule, config: DDIMConfig, steps: int) -> DDIMScheduler:
    scheduler = DDIMScheduler(
        num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start,
        beta_end=schedule.beta_end, beta_schedule=schedule.beta_schedule,
        prediction_type=schedule.prediction_type, timestep_spacing=config.timestep_spacing,
        steps_offset=config.steps_offset, set_alpha_to_one=config.set_alpha_to_one,
        clip_sample=config.clip_sample, clip_sample_range=config.clip_sample_range,
    )
    scheduler.set_timesteps(steps)
    # float64 table: the comparison then measures the step math, not float32 rounding of alphas_cumprod
    scheduler.alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod.copy())
    scheduler.final_alpha_cumprod = torch.tensor(
        1.0 if config.set_alpha_to_one else schedule.alphas_cumprod[0], dtype=torch.float64)
    return scheduler


def _diffusers_step(scheduler: DDIMScheduler, config: DDIMConfig, model_output, t: int, prev_t: int,
                    sample, eta: float, noise, redirect_prev: bool = True):
    """diffusers' step; with ``redirect_prev`` its alpha_prev lookup (at t - T // N) reads alpha at ``prev_t``."""
    table, final = scheduler.alphas_cumprod, scheduler.final_alpha_cumprod
    diffusers_prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    if redirect_prev:
        target = table[prev_t].clone() if prev_t >= 0 else final
        if diffusers_prev >= 0:
            saved = table[diffusers_prev].clone()
            table[diffusers_prev] = target
        else:
            scheduler.final_alpha_cumprod = target
    output = scheduler.step(model_output, t, sample, eta=eta,
                            use_clipped_model_output=config.use_clipped_model_output,
                            variance_noise=noise if eta > 0 else None)
    if redirect_prev and diffusers_prev >= 0:
        table[diffusers_prev] = saved
    scheduler.final_alpha_cumprod = final
    return output.prev_sample, output.pred_original_sample


def _compare_loops_with_diffusers(schedule, config, steps, eta, rng, redirect_prev=True, batch=2) -> None:
    """Runs a full DDIM loop here and in diffusers from the same x_T with the same noise; compares every step."""
    phase = rng.standard_normal(LATENT_SHAPE)
    latents = rng.standard_normal((batch,) + LATENT_SHAPE)
    reference = torch.from_numpy(latents.copy())
    scheduler = _diffusers_scheduler(schedule, config, steps)
    trajectory = DDIMTrajectory.plan(schedule, steps, config)
    listed = scheduler.timesteps.numpy()[:steps].tolist()
    assert trajectory.timesteps.tolist() == listed
    if config.previous_timestep == "listed":  # the next listed timestep, then the final alpha
        assert trajectory.prev_timesteps.tolist() == listed[1:] + [-1]
    for index, (t, prev_t) in enumerate(trajectory):
        noise = rng.standard_normal(latents.shape)
        latents, pred_x0 = ddim_step(_pseudo_model(latents, t, phase), t, prev_t, latents, eta,
                                     noise if eta > 0 else None, schedule=schedule, config=config)
        reference, reference_x0 = _diffusers_step(
            scheduler, config, _pseudo_model(reference, t, phase), t, prev_t, reference, eta,
            torch.from_numpy(noise), redirect_prev)
        what = f"{config} steps={steps} eta={eta} step {index} (t={t}, prev={prev_t})"
        _assert_close(pred_x0, reference_x0, 1e-6, what + " pred_original_sample")
        _assert_close(latents, reference, 1e-6, what + " prev_sample")


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_schedule_matches_diffusers_betas_and_alphas_cumprod(beta_schedule):
    schedule = NoiseSchedule(beta_schedule=beta_schedule, beta_start=0.0001 if beta_schedule == "linear" else 0.00085,
                             beta_end=0.02 if beta_schedule == "linear" else 0.012)
    scheduler = DDIMScheduler(beta_start=schedule.beta_start, beta_end=schedule.beta_end, beta_schedule=beta_schedule)
    assert schedule.betas.dtype == np.float64 and schedule.alphas_cumprod.shape == (1000,)
    # diffusers builds the table in float32: a float32 cumprod over 1000 factors drifts by ~1e-6 relative
    np.testing.assert_allclose(schedule.betas, scheduler.betas.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(schedule.alphas_cumprod, scheduler.alphas_cumprod.double().numpy(), rtol=5e-6)


def test_scaled_linear_betas_are_linear_in_sqrt_beta():
    betas = NoiseSchedule().betas
    assert betas[0] == pytest.approx(0.00085, rel=1e-12) and betas[-1] == pytest.approx(0.012, rel=1e-12)
    np.testing.assert_allclose(np.diff(np.sqrt(betas), 2), 0.0, atol=1e-15)
    assert np.all(np.diff(np.diff(betas)) > 0)  # convex in t, unlike "linear"


def test_schedule_from_dict_reads_the_model_json_schedule_entry():
    entry = dataclasses.asdict(ScheduleConfig())  # what ldm-train writes under "schedule"
    schedule = NoiseSchedule.from_dict(entry)
    assert schedule == NoiseSchedule()  # the runtime's defaults are the training defaults
    assert schedule.to_dict() == entry
    v_schedule = NoiseSchedule.from_dict({**entry, "prediction_type": "v_prediction", "beta_schedule": "linear"})
    assert (v_schedule.prediction_type, v_schedule.beta_schedule) == ("v_prediction", "linear")


def test_schedule_arrays_are_read_only():
    schedule = NoiseSchedule()
    with pytest.raises(ValueError):
        schedule.alphas_cumprod[0] = 0.5


@pytest.mark.parametrize("entry, named", [
    ({"num_train_timesteps": 1000, "beta_shedule": "linear"}, "beta_shedule"),
    ({"beta_schedule": "cosine"}, "cosine"),
    ({"prediction_type": "sample"}, "sample"),
    ({"beta_start": 0.02, "beta_end": 0.01}, "0.02"),
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"num_train_timesteps": 10.5}, "10.5"),
])
def test_schedule_from_dict_rejects_unknown_keys_and_values(entry, named):
    with pytest.raises(ValueError, match=named):
        NoiseSchedule.from_dict(entry)


# ---------------------------------------------------------------- timesteps


@pytest.mark.parametrize("spacing, steps_offset", [("leading", 0), ("leading", 1), ("trailing", 1), ("linspace", 1)])
def test_ddim_timesteps_match_diffusers_for_every_step_count(spacing, steps_offset):
    schedule = NoiseSchedule()
    config = DDIMConfig(timestep_spacing=spacing, steps_offset=steps_offset)
    scheduler = DDIMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    for steps in range(1, schedule.num_train_timesteps + 1):
        if spacing == "leading" and steps_offset == 1 and steps == schedule.num_train_timesteps:
            continue  # starts at timestep T; rejected, see test_ddim_timesteps_reject_leading_offset_past_the_schedule
        ours = ddim_timesteps(schedule, steps, config)
        scheduler.set_timesteps(steps)
        theirs = scheduler.timesteps.numpy()
        assert ours.dtype == np.int64 and ours.shape == (steps,)
        np.testing.assert_array_equal(ours, theirs[:steps], err_msg=f"{spacing} steps={steps}")
        # diffusers' float np.arange sometimes yields one more "trailing" entry, always the invalid timestep -1
        assert len(theirs) == steps or (spacing == "trailing" and list(theirs[steps:]) == [-1])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_trajectory_steps_to_the_next_timestep_and_ends_at_the_final_alpha(spacing):
    trajectory = DDIMTrajectory.plan(NoiseSchedule(), 13, DDIMConfig(timestep_spacing=spacing))
    pairs = list(trajectory)
    assert len(trajectory) == 13 and len(pairs) == 13
    assert [prev for _, prev in pairs[:-1]] == [t for t, _ in pairs[1:]]
    assert pairs[-1][1] == -1
    assert all(isinstance(t, int) and isinstance(prev, int) for t, prev in pairs)
    with pytest.raises(ValueError):
        trajectory.timesteps[0] = 5


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True, "50"])
def test_ddim_timesteps_reject_step_counts_outside_one_to_t(steps):
    with pytest.raises(ValueError, match=r"num_inference_steps is .*expected an integer from 1 to 1000"):
        ddim_timesteps(NoiseSchedule(), steps, DDIMConfig())


def test_ddim_timesteps_reject_leading_offset_past_the_schedule():
    with pytest.raises(ValueError, match="starts at timestep 1000"):
        ddim_timesteps(NoiseSchedule(), 1000, DDIMConfig(steps_offset=1))
    assert ddim_timesteps(NoiseSchedule(), 1000, DDIMConfig(steps_offset=0))[0] == 999


# ---------------------------------------------------------------- the step against diffusers


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_loop_matches_diffusers_with_correct_prev_timestep(spacing, eta, prediction_type, rng):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    final_alphas = itertools.cycle(itertools.product((False, True), (0, 1)))  # (set_alpha_to_one, steps_offset)
    for steps, (clip, use_clipped) in itertools.product((1, 7, 25), CLIPPING):
        set_alpha_to_one, steps_offset = next(final_alphas)
        config = DDIMConfig(timestep_spacing=spacing, steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one,
                            clip_sample=clip, use_clipped_model_output=use_clipped, clip_sample_range=1.5)
        _compare_loops_with_diffusers(schedule, config, steps, eta, rng)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_loop_of_999_steps_matches_diffusers(spacing, rng):
    config = DDIMConfig(timestep_spacing=spacing, clip_sample=True)
    _compare_loops_with_diffusers(NoiseSchedule(prediction_type="v_prediction"), config, 999, 0.5, rng, batch=1)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_leading_loop_matches_unmodified_diffusers_step(prediction_type, rng):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    for steps, eta, set_alpha_to_one, steps_offset in itertools.product((1, 7, 50, 600), (0.0, 1.0), (False, True),
                                                                         (0, 1)):
        if set_alpha_to_one and steps_offset >= schedule.num_train_timesteps // steps:
            continue  # diffusers' last step lands on timestep 0 there, ours on the final alpha (module docstring)
        if steps == 600 and (eta, set_alpha_to_one, steps_offset) != (1.0, False, 1):
            continue  # one long run: ratio T // N = 1 with the offset, where diffusers' prev is 0, not -1
        config = DDIMConfig(steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one)
        _compare_loops_with_diffusers(schedule, config, steps, eta, rng, redirect_prev=False, batch=1)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_loop_with_previous_timestep_diffusers_matches_unmodified_diffusers_step(spacing, prediction_type, rng):
    """Step counts that divide T and that do not (61: diffusers' "trailing" lists one more timestep, -1, which
    ours leaves out), steps_offset 0/1, set_alpha_to_one, clipping, eta 0 and 1."""
    schedule = NoiseSchedule(prediction_type=prediction_type)
    settings = itertools.cycle(itertools.product((0, 1), (False, True), CLIPPING, (0.0, 1.0)))
    for steps in (1, 4, 7, 50, 61, 600):
        for _ in range(4 if steps < 600 else 1):
            steps_offset, set_alpha_to_one, (clip, use_clipped), eta = next(settings)
            config = DDIMConfig(timestep_spacing=spacing, steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one,
                                clip_sample=clip, use_clipped_model_output=use_clipped, previous_timestep="diffusers")
            _compare_loops_with_diffusers(schedule, config, steps, eta, rng, redirect_prev=False, batch=1)


def test_previous_timestep_listed_and_diffusers_differ_only_where_diffusers_leaves_its_list():
    schedule = NoiseSchedule()
    for spacing, steps in itertools.product(("leading", "trailing", "linspace"), (4, 7, 50)):
        timesteps = ddim_timesteps(schedule, steps, DDIMConfig(timestep_spacing=spacing))
        listed = DDIMTrajectory.plan(schedule, steps, DDIMConfig(timestep_spacing=spacing))
        theirs = DDIMTrajectory.plan(schedule, steps, DDIMConfig(timestep_spacing=spacing,
                                                                 previous_timestep="diffusers"))
        np.testing.assert_array_equal(theirs.timesteps, listed.timesteps)
        np.testing.assert_array_equal(theirs.prev_timesteps, np.maximum(timesteps - 1000 // steps, -1))
        lands_on_its_list = spacing == "leading" or (spacing == "trailing" and 1000 % steps == 0)
        assert (theirs.prev_timesteps == listed.prev_timesteps).all() == lands_on_its_list, (spacing, steps)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_step_matches_song_et_al_eq12_written_out_in_float64(spacing, rng):
    """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev), with a_prev at the next listed timestep."""
    schedule, config = NoiseSchedule(), DDIMConfig(timestep_spacing=spacing)
    alphas = schedule.alphas_cumprod
    timesteps = ddim_timesteps(schedule, 17, config)
    for index in range(len(timesteps)):
        t = int(timesteps[index])
        prev_t = int(timesteps[index + 1]) if index + 1 < len(timesteps) else -1
        alpha, alpha_prev = alphas[t], (alphas[prev_t] if prev_t >= 0 else alphas[0])
        eta = rng.uniform(0.1, 1.0)
        sample, epsilon, z = rng.standard_normal((3, 2) + LATENT_SHAPE)
        sigma = eta * np.sqrt((1 - alpha_prev) / (1 - alpha)) * np.sqrt(1 - alpha / alpha_prev)
        x0 = (sample - np.sqrt(1 - alpha) * epsilon) / np.sqrt(alpha)
        expected = np.sqrt(alpha_prev) * x0 + np.sqrt(1 - alpha_prev - sigma**2) * epsilon + sigma * z
        prev_sample, pred_x0 = ddim_step(epsilon, t, prev_t, sample, eta, z, schedule=schedule, config=config)
        _assert_close(pred_x0, x0, 1e-12, f"t={t}")
        _assert_close(prev_sample, expected, 1e-12, f"t={t}")


def test_ddim_float32_loop_stays_within_float32_rounding_of_unmodified_diffusers(rng):
    schedule, config = NoiseSchedule(), DDIMConfig()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              set_alpha_to_one=False, clip_sample=False)
    scheduler.set_timesteps(50)
    phase = rng.standard_normal(LATENT_SHAPE)
    latents = torch.from_numpy(rng.standard_normal((2,) + LATENT_SHAPE).astype(np.float32))
    reference = latents.clone()
    for t, prev_t in DDIMTrajectory.plan(schedule, 50, config):
        latents, _ = ddim_step(_pseudo_model(latents, t, phase), t, prev_t, latents, schedule=schedule, config=config)
        reference = scheduler.step(_pseudo_model(reference, t, phase), t, reference).prev_sample
    assert latents.dtype == torch.float32
    _assert_close(latents, reference, 1e-4, "float32 loop")


# ---------------------------------------------------------------- array types and per-sample vectors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_step_gives_the_same_result_on_numpy_arrays_and_torch_tensors(dtype, prediction_type, rng):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    config = DDIMConfig(clip_sample=True, use_clipped_model_output=True)
    model_output, sample, noise = rng.standard_normal((3, 3) + LATENT_SHAPE).astype(dtype)
    timesteps, prev_timesteps, eta = [901, 501, 21], [801, 301, -1], np.array([0.0, 0.4, 1.0])
    numpy_result = ddim_step(model_output, timesteps, prev_timesteps, sample, eta, noise,
                             schedule=schedule, config=config)
    torch_result = ddim_step(torch.from_numpy(model_output), timesteps, prev_timesteps, torch.from_numpy(sample),
                             eta, torch.from_numpy(noise), schedule=schedule, config=config)
    for from_numpy, from_torch in zip(numpy_result, torch_result):
        assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == dtype
        assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.from_numpy(sample).dtype
        _assert_close(from_torch, from_numpy, 1e-6 if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("array_kind", ["numpy", "torch"])
def test_ddim_step_on_a_mixed_batch_equals_each_row_run_alone(array_kind, rng):
    convert = (lambda a: a) if array_kind == "numpy" else torch.from_numpy
    schedule = NoiseSchedule(prediction_type="v_prediction")
    config = DDIMConfig(timestep_spacing="trailing", clip_sample=True)
    timesteps, prev_timesteps = np.array([999, 640, 320, 77, 5]), np.array([950, 500, -1, 12, -1])
    eta = np.array([0.0, 1.0, 0.3, 0.0, 0.8])
    model_output, sample, noise = (convert(a) for a in rng.standard_normal((3, 5) + LATENT_SHAPE))
    batched, batched_x0 = ddim_step(model_output, timesteps, prev_timesteps, sample, eta, noise,
                                    schedule=schedule, config=config)
    for row in range(5):
        alone, alone_x0 = ddim_step(model_output[row:row + 1], timesteps[row], prev_timesteps[row],
                                    sample[row:row + 1], float(eta[row]), noise[row:row + 1],
                                    schedule=schedule, config=config)
        _assert_close(batched[row:row + 1], alone, 1e-14, f"row {row}")
        _assert_close(batched_x0[row:row + 1], alone_x0, 1e-14, f"row {row}")


def _run_requests(requests, phase, schedule, config, array_kind):
    """Serves requests the way a batching server would: a request joins at its start iteration, rows at
    different steps share one guided UNet call and one ddim_step, and a row leaves when its trajectory ends."""
    convert = (lambda a: a) if array_kind == "numpy" else torch.from_numpy
    sampler = DDIMSampler(schedule, config)
    trajectories = [sampler.trajectory(request["steps"]) for request in requests]
    latents = [convert(initial_noise([request["seed"]], LATENT_SHAPE).astype(np.float64)) for request in requests]
    iteration = 0
    while any(iteration < request["start"] + len(trajectory) for request, trajectory in zip(requests, trajectories)):
        active = [i for i, (request, trajectory) in enumerate(zip(requests, trajectories))
                  if request["start"] <= iteration < request["start"] + len(trajectory)]
        step_indices = [iteration - requests[i]["start"] for i in active]
        timesteps = np.array([trajectories[i].timesteps[k] for i, k in zip(active, step_indices)])
        prev_timesteps = np.array([trajectories[i].prev_timesteps[k] for i, k in zip(active, step_indices)])
        batch_latents = (np.concatenate if array_kind == "numpy" else torch.cat)([latents[i] for i in active])
        guided = GuidedBatch.plan([requests[i]["guidance"] for i in active], len(active))
        context = host_to_array_like(np.array([requests[i]["prompt"] for i in active]).reshape(-1, 1, 1, 1),
                                     batch_latents)
        negative = host_to_array_like(np.array([requests[i]["negative"] for i in active]).reshape(-1, 1, 1, 1),
                                      batch_latents)
        model_output = _pseudo_model(guided.stack(batch_latents), guided.stack(timesteps), phase,
                                     guided.stack(context, negative))
        eta = np.array([requests[i]["eta"] for i in active])
        noise = step_noise([requests[i]["seed"] for i in active], step_indices, LATENT_SHAPE).astype(np.float64)
        batch_latents, _ = sampler.step(guided.combine(model_output), timesteps, prev_timesteps, batch_latents,
                                        eta, convert(noise))
        for row, i in enumerate(active):
            latents[i] = batch_latents[row:row + 1]
        iteration += 1
    return latents


@pytest.mark.parametrize("array_kind", ["numpy", "torch"])
def test_batched_requests_with_different_steps_eta_guidance_equal_separate_runs(array_kind, rng):
    schedule, config = NoiseSchedule(), DDIMConfig(timestep_spacing="trailing")
    phase = rng.standard_normal(LATENT_SHAPE)
    seeds = rng.integers(0, 2**63, size=4).tolist()
    requests = [
        dict(steps=6, eta=0.0, guidance=7.5, start=0),
        dict(steps=4, eta=1.0, guidance=1.0, start=1),
        dict(steps=9, eta=0.5, guidance=3.0, start=0),
        dict(steps=3, eta=0.3, guidance=1.0, start=4),
    ]
    for request, seed in zip(requests, seeds):
        request.update(seed=seed, prompt=rng.standard_normal(), negative=rng.standard_normal())
    batched = _run_requests(requests, phase, schedule, config, array_kind)
    for request, latents in zip(requests, batched):
        alone = _run_requests([dict(request, start=0)], phase, schedule, config, array_kind)[0]
        _assert_close(latents, alone, 1e-14, f"request {request}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_ddim_step_keeps_cuda_latents_on_the_device_and_matches_cpu(rng):
    schedule = NoiseSchedule()
    model_output, sample, noise = (torch.from_numpy(a.astype(np.float32)) for a in rng.standard_normal((3, 2, 4, 8, 8)))
    args = ([981, 21], [961, -1])
    on_cpu, _ = ddim_step(model_output, *args, sample, 0.5, noise, schedule=schedule)
    on_gpu, x0_gpu = ddim_step(model_output.cuda(), *args, sample.cuda(), 0.5, noise.cuda(), schedule=schedule)
    assert on_gpu.is_cuda and x0_gpu.is_cuda
    _assert_close(on_gpu, on_cpu, 1e-6)


# ---------------------------------------------------------------- guidance


@pytest.mark.parametrize("array_kind", ["numpy", "torch"])
def test_apply_guidance_uses_each_rows_own_scale(array_kind, rng):
    uncond, cond = rng.standard_normal((2, 3) + LATENT_SHAPE)
    scale = np.array([1.0, 7.5, 0.0])
    convert = (lambda a: a) if array_kind == "numpy" else torch.from_numpy
    guided = apply_guidance(convert(uncond), convert(cond), scale)
    for row in range(3):
        expected = uncond[row] + scale[row] * (cond[row] - uncond[row])
        _assert_close(guided[row], expected, 1e-14, f"row {row}")
    _assert_close(apply_guidance(convert(uncond), convert(cond), 4.0), uncond + 4.0 * (cond - uncond), 1e-14)


@pytest.mark.parametrize("array_kind", ["numpy", "torch"])
def test_guided_batch_stacks_unconditional_then_conditional_and_skips_scale_one(array_kind, rng):
    convert = (lambda a: a) if array_kind == "numpy" else torch.from_numpy
    latents, prompt, negative = (convert(a) for a in rng.standard_normal((3, 4) + LATENT_SHAPE))
    timesteps = convert(np.array([999, 500, 20, 7]))
    phase = rng.standard_normal(LATENT_SHAPE)
    scale = [3.0, 1.0, 7.5, 1.0]
    results = {}
    for skip in (True, False):
        guided = GuidedBatch.plan(scale, 4, skip_unconditional_at_one=skip)
        stacked = guided.stack(latents)
        assert stacked.shape[0] == guided.unet_batch_size == (6 if skip else 8)
        context = guided.stack(prompt, negative)
        unconditional_rows = [0, 2] if skip else [0, 1, 2, 3]
        _assert_close(context[:len(unconditional_rows)], negative[unconditional_rows], 0.0)
        _assert_close(context[len(unconditional_rows):], prompt, 0.0)
        output = _pseudo_model(stacked, guided.stack(timesteps).tolist(), phase, context)
        results[skip] = guided.combine(output)
    eps_cond = _pseudo_model(latents, timesteps.tolist(), phase, prompt)
    eps_uncond = _pseudo_model(latents, timesteps.tolist(), phase, negative)
    for row in range(4):
        expected = eps_uncond[row] + scale[row] * (eps_cond[row] - eps_uncond[row])
        _assert_close(results[True][row], expected, 1e-14, f"row {row}")
        _assert_close(results[False][row], expected, 1e-14, f"row {row}")


def test_guided_batch_with_every_scale_one_runs_only_the_conditional_half(rng):
    latents = rng.standard_normal((3,) + LATENT_SHAPE)
    guided = GuidedBatch.plan(1.0, 3)
    assert guided.unet_batch_size == 3
    assert guided.stack(latents) is latents and guided.combine(latents) is latents
    assert GuidedBatch.plan(1.0, 3, skip_unconditional_at_one=False).unet_batch_size == 6


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_eta_outside_zero_to_one_is_rejected_in_config_and_step(eta, rng):
    with pytest.raises(ValueError, match="eta"):
        DDIMConfig(eta=eta)
    sample = rng.standard_normal((2,) + LATENT_SHAPE)
    with pytest.raises(ValueError, match="eta"):
        ddim_step(sample, 500, 400, sample, [0.2, eta], sample, schedule=NoiseSchedule())


def test_ddim_step_rejects_missing_noise_bad_timesteps_and_wrong_lengths(rng):
    schedule, sample = NoiseSchedule(), rng.standard_normal((2,) + LATENT_SHAPE)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(sample, 500, 400, sample, 0.5, None, schedule=schedule)
    with pytest.raises(ValueError, match="1000"):
        ddim_step(sample, 1000, 400, sample, schedule=schedule)
    with pytest.raises(ValueError, match="prev_timesteps"):
        ddim_step(sample, [500, 400], [500, -1], sample, schedule=schedule)
    with pytest.raises(ValueError, match="prev_timesteps"):
        ddim_step(sample, 500, -2, sample, schedule=schedule)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        ddim_step(sample, [500, 400, 300], 20, sample, schedule=schedule)
    with pytest.raises(ValueError, match=r"eta has shape \(3,\)"):
        ddim_step(sample, 500, 20, sample, [0.0, 0.1, 0.2], schedule=schedule)
    with pytest.raises(ValueError, match="float"):
        ddim_step(sample, 500.0, 20, sample, schedule=schedule)


@pytest.mark.parametrize("settings, named", [
    ({"timestep_spacing": "karras"}, "karras"),
    ({"steps_offset": -1}, "steps_offset"),
    ({"set_alpha_to_one": 1}, "set_alpha_to_one"),
    ({"clip_sample_range": 0.0}, "clip_sample_range"),
    ({"step_offset": 1}, "step_offset"),
])
def test_ddim_config_rejects_unknown_keys_and_values(settings, named):
    with pytest.raises(ValueError, match=named):
        DDIMConfig.from_dict(settings)


def test_ddim_config_round_trips_through_its_dict():
    config = DDIMConfig(timestep_spacing="trailing", steps_offset=0, eta=0.25, clip_sample=True)
    assert DDIMConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("scale", [-1.0, float("inf"), float("nan"), "7.5", [1.0, 2.0]])
def test_guidance_scale_must_be_a_finite_non_negative_number_per_row(scale):
    with pytest.raises(ValueError, match="guidance_scale"):
        GuidedBatch.plan(scale, 3)


def test_runtime_modules_sample_without_torch():
    """The runtime must serve an engine on a machine without torch: block its import and run a guided step."""
    script = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
from ldm_runtime.guidance import GuidedBatch
from ldm_runtime.noise import initial_noise, step_noise
from ldm_runtime.schedulers import DDIMSampler, NoiseSchedule
sampler = DDIMSampler(NoiseSchedule())
latents = initial_noise([1, 2], (4, 8, 8))
guided = GuidedBatch.plan([7.5, 1.0], 2)
for index, (t, prev_t) in enumerate(sampler.trajectory(3)):
    eps = guided.combine(0.1 * guided.stack(latents))
    latents, _ = sampler.step(eps, t, prev_t, latents, 0.5, step_noise([1, 2], index, (4, 8, 8)))
assert latents.dtype == np.float32 and np.all(np.isfinite(latents))
print("sampled without torch")
"""
    repo_root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=repo_root)
    assert result.returncode == 0, result.stderr
    assert "sampled without torch" in result.stdout
