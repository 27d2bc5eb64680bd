"""``ldm-train lcm``: the consistency function and the solver step are the ones the lcm sampler and diffusers use
(diffusers' LCMScheduler and DDIMScheduler as the oracle), the model folder it writes is a whole model whose requests
default to lcm at its steps with guidance 1 (one UNet row per image), the base is left as it was, and every bad
flag is one line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from ldm_runtime.checkpoint import AUTOENCODER_WEIGHTS, UNET_WEIGHTS, load_tensors
from ldm_runtime.config import inpainting_channels
from ldm_runtime.files import sha256_file
from ldm_runtime.schedulers import LCMSampler, NoiseSchedule
from ldm_runtime.schedulers.sigmas import read_only_trajectory, schedule_sigmas
from ldm_train.checkpoint import write_random_checkpoint
from ldm_train.cli import main
from ldm_train.train_lcm import (
    SOLVER_STEPS,
    boundary_scalings,
    consistency_function,
    ddim_step,
    solver_grid,
)
from tests.ldm_export.tiny_checkpoint import TINY_CONFIG, shared_tiny_checkpoint
from tests.ldm_train.distilled import defaults_and_rows

QUICK = ["--data", "shapes:16", "--steps", "4", "--batch-size", "4", "--checkpoint-every", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return shared_tiny_checkpoint(tmp_path_factory)


def schedule_tables():
    schedule = NoiseSchedule.from_config(TINY_CONFIG.schedule)
    return schedule, torch.from_numpy(schedule.alphas_cumprod.copy())


def test_the_boundary_condition_and_the_grid_are_diffusers_lcm_schedulers():
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear")
    timesteps = torch.tensor([0, 19, 259, 999])
    skip, out = boundary_scalings(timesteps)
    for index, timestep in enumerate(timesteps.tolist()):
        expected = scheduler.get_scalings_for_boundary_condition_discrete(timestep)
        assert float(skip[index]) == pytest.approx(float(expected[0]), rel=1e-12)
        assert float(out[index]) == pytest.approx(float(expected[1]), rel=1e-12)
    scheduler.set_timesteps(SOLVER_STEPS)  # LCM at 50 steps takes every timestep of its distillation grid
    assert solver_grid(1000, SOLVER_STEPS).flip(0).tolist() == scheduler.timesteps.tolist()


@pytest.mark.parametrize("timestep", [999, 519, 19])
def test_the_consistency_function_is_what_the_lcm_sampler_returns_at_its_last_step(timestep, rng):
    """The student learns f(x, t); the sampler's last step maps the model's output at t to f(x, t), so the sampler
    takes the distilled model as it is."""
    schedule, alphas = schedule_tables()
    sampler = LCMSampler(schedule)
    sample = rng.standard_normal((2, 4, 8, 8))
    output = rng.standard_normal((2, 4, 8, 8))
    trajectory = read_only_trajectory(np.array([timestep]), schedule_sigmas(schedule)[[timestep]])
    expected, _ = sampler.step(output, [trajectory, trajectory], [0, 0], sample, noise=np.zeros_like(sample))
    got = consistency_function(torch.from_numpy(output), torch.from_numpy(sample), torch.tensor([timestep] * 2),
                               alphas, "epsilon")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_solver_step_is_diffusers_ddim_step_over_the_grid(prediction_type, rng):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False,
                              set_alpha_to_one=False)
    scheduler.set_timesteps(SOLVER_STEPS)
    _, alphas = schedule_tables()
    for start in (999, 519, 39):
        sample = torch.from_numpy(rng.standard_normal((1, 4, 8, 8)))
        output = torch.from_numpy(rng.standard_normal((1, 4, 8, 8)))
        expected = scheduler.step(output, start, sample, eta=0.0).prev_sample
        previous = start - 1000 // SOLVER_STEPS
        got = ddim_step(output, sample, alphas[start], alphas[previous], prediction_type)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # diffusers keeps its tables in float32


def test_the_model_it_writes_samples_with_lcm_unguided_by_default(base, tmp_path, capsys, rng):
    base_unet = sha256_file(base / UNET_WEIGHTS)
    out = tmp_path / "lcm"
    assert main(["lcm", "--base", str(base), "--out", str(out), *QUICK, "--sample-steps", "3"]) == 0
    assert sha256_file(base / UNET_WEIGHTS) == base_unet  # the base is untouched
    assert sha256_file(out / AUTOENCODER_WEIGHTS) == sha256_file(base / AUTOENCODER_WEIGHTS)
    assert load_tensors(out / UNET_WEIGHTS).keys() == load_tensors(base / UNET_WEIGHTS).keys()
    assert any(not torch.equal(value, load_tensors(base / UNET_WEIGHTS)[name])
               for name, value in load_tensors(out / UNET_WEIGHTS).items())  # it trained
    defaults = json.loads((out / "model.json").read_text())["default_sampler"]
    assert defaults == {"name": "lcm", "steps": 3, "guidance_scale": 1.0, "timestep_spacing": None,
                        "steps_offset": None}
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [4]
    assert defaults_and_rows(out, rng) == (("lcm", 3, 1.0), 3)  # one UNet row a step: no unconditional row


def test_bad_flags_an_existing_model_or_the_base_as_out_are_one_line(base, tmp_path, capsys):
    cases = [
        (["--out", str(tmp_path / "a"), "--sample-steps", "51"], "--sample-steps is 51; expected an integer from 1 "
                                                                 "to 50"),
        (["--out", str(tmp_path / "a"), "--ema-decay", "1"], "--ema-decay is 1.0; expected a value in [0, 1)"),
        (["--out", str(tmp_path / "a"), "--guidance-scale", "-1"], "--guidance-scale is -1.0; expected a finite "
                                                                   "number >= 0"),
        (["--out", str(base)], f"--out {base} already holds a model; pass --overwrite"),
        (["--out", str(base), "--overwrite"], f"--out {base} is --base; expected a new folder"),
    ]
    for flags, message in cases:
        assert main(["lcm", "--base", str(base), *QUICK, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ldm-train: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists()
    inpainting = tmp_path / "inpainting"
    write_random_checkpoint(inpainting, dataclasses.replace(TINY_CONFIG, unet=dataclasses.replace(
        TINY_CONFIG.unet, in_channels=inpainting_channels(TINY_CONFIG.unet.out_channels))))
    assert main(["lcm", "--base", str(inpainting), "--out", str(tmp_path / "c"), *QUICK]) == 2
    assert f"--base {inpainting} is an inpainting model (its UNet takes 9 channels); expected a text-to-image" \
        in capsys.readouterr().err
    assert main(["lcm", "--base", str(tmp_path / "none"), "--out", str(tmp_path / "b"), *QUICK]) == 2
    assert f"--base {tmp_path / 'none'} is not a checkpoint dir" in capsys.readouterr().err
