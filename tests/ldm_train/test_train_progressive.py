"""``ldm-train progressive``: a student that hits its targets exactly samples, with the runtime's DDIM at N steps
on the model folder's own settings, the latents the teacher's DDIM makes at K N steps; the loss is zero there and the
truncated-SNR-weighted x_0 error elsewhere; the teacher's guidance is the base's own unless a flag names one; the
folder written is a whole model whose requests default to DDIM at N steps, guidance 1, one UNet row a step; bad
flags are one line."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from ldm_runtime.checkpoint import UNET_WEIGHTS, load_checkpoint
from ldm_runtime.config import DEFAULT_GUIDANCE_SCALE, SamplerDefaults
from ldm_runtime.files import sha256_file
from ldm_runtime.guidance import apply_guidance
from ldm_runtime.schedulers.ddim import DDIMSampler
from ldm_runtime.schedulers.schedule import NoiseSchedule
from ldm_train.cli import main
from ldm_train.data import build_dataset
from ldm_train.diffusion import ForwardProcess
from ldm_train.train_lora import _with_context
from ldm_train.train_progressive import ProgressiveDistillation, ProgressiveSettings, progressive_config
from ldm_train.train_unet import _conditioning, encode_dataset
from tests.ldm_export.tiny_checkpoint import TINY_CONFIG, shared_tiny_checkpoint
from tests.ldm_train.distilled import defaults_and_rows

QUICK = ["--data", "shapes:16", "--steps", "4", "--batch-size", "4", "--checkpoint-every", "2", "--device", "cpu"]
BATCH = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return shared_tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def networks(base):
    return load_checkpoint(base)


@pytest.fixture(scope="module")
def data(networks):
    device = torch.device("cpu")
    dataset = build_dataset("shapes:8", networks.config.image_size, 0)
    encoded = encode_dataset(dataset, networks.autoencoder, networks.text_encoder, device, BATCH, True)
    return _with_context(encoded, networks.text_encoder, device)


def distillation(networks, sample_steps: int, guidance_scale: float | None = 5.0, config=None,
                 teacher_steps: int | None = None):
    config = config or networks.config
    settings = ProgressiveSettings(base="", out="", guidance_scale=guidance_scale, sample_steps=sample_steps,
                                   teacher_steps=teacher_steps)
    teacher = networks.unet.eval()
    return ProgressiveDistillation(settings, config, teacher, copy.deepcopy(teacher),
                                   ForwardProcess(config.schedule), torch.device("cpu"))


class OracleStudent(torch.nn.Module):
    """A student that answers every training target exactly: its output (ε or v, as the model predicts) is the one
    whose x̂_0 is the target x̃ of the teacher's K steps (for captions ``caption_ids``, at the student's grid
    timesteps)."""

    def __init__(self, run: ProgressiveDistillation, data, caption_ids):
        super().__init__()
        self.run, self.data, self.caption_ids = run, data, caption_ids

    def forward(self, noisy, timesteps, context=None, context_mask=None):
        index = np.searchsorted(-self.run.grid.starts, -timesteps.numpy())
        assert np.array_equal(self.run.grid.starts[index], timesteps.numpy())
        wanted = self.run.wanted(self.data, noisy, self.caption_ids, index)
        alpha = self.run.alphas_cumprod[timesteps].view(-1, 1, 1, 1).float()
        if self.run.config.schedule.prediction_type == "epsilon":
            return (noisy - alpha.sqrt() * wanted) / (1.0 - alpha).sqrt()
        return (alpha.sqrt() * noisy - wanted) / (1.0 - alpha).sqrt()  # x̂_0 = sqrt(ᾱ) x_t - sqrt(1 - ᾱ) v


def sample(model, sampler: DDIMSampler, steps: int, latents: torch.Tensor) -> torch.Tensor:
    """The runtime's DDIM run of ``model`` (a UNet-shaped callable) from ``latents``."""
    for current, previous in sampler.trajectory(steps):
        output = model(latents, torch.full((len(latents),), current))
        latents = sampler.step(output, current, previous, latents)[0]
    return latents


@pytest.mark.parametrize("sample_steps, teacher_steps, prediction_type",
                         [(1, None, "epsilon"), (2, None, "epsilon"), (4, None, "epsilon"), (2, 8, "epsilon"),
                          (2, None, "v_prediction")])
def test_a_student_on_its_targets_samples_in_n_steps_what_the_teacher_does_in_kn(networks, data, sample_steps,
                                                                                   teacher_steps, prediction_type):
    config = dataclasses.replace(networks.config, schedule=dataclasses.replace(networks.config.schedule,
                                                                               prediction_type=prediction_type))
    run = distillation(networks, sample_steps, config=config, teacher_steps=teacher_steps)
    caption_ids = data.caption_ids[:BATCH]
    conditional = _conditioning(data, caption_ids, run.device)
    unconditional = _conditioning(data, torch.zeros_like(caption_ids), run.device)

    def teacher(latents, timesteps):
        with torch.no_grad():
            return apply_guidance(networks.unet(latents, timesteps, **unconditional),
                                  networks.unet(latents, timesteps, **conditional), 5.0)

    written = progressive_config(config, sample_steps)
    assert written.sampler.timestep_spacing == "trailing"
    schedule = NoiseSchedule.from_config(written.schedule)
    generator = torch.Generator().manual_seed(3)
    start = torch.randn((BATCH, networks.config.autoencoder.latent_channels, 4, 4), generator=generator)
    student = OracleStudent(run, data, caption_ids)
    with torch.no_grad():
        fast = sample(student, DDIMSampler(schedule, written.sampler), sample_steps, start)
    slow = sample(teacher, DDIMSampler(schedule, written.sampler), teacher_steps or 2 * sample_steps, start)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(sample(teacher, DDIMSampler(schedule, written.sampler), sample_steps, start), slow,
                              atol=1e-3)  # the teacher alone at N steps lands elsewhere


def test_the_grid_is_the_trailing_one_from_pure_noise(networks):
    run = distillation(networks, 4)
    assert TINY_CONFIG.schedule.num_train_timesteps == 1000
    assert run.grid.starts.tolist() == [999, 749, 499, 249]
    assert run.grid.teacher_starts.tolist() == [[999, 874], [749, 624], [499, 374], [249, 124]]
    assert run.grid.teacher_ends.tolist() == [[874, 749], [624, 499], [374, 249], [124, -1]]
    assert run.grid.ends.tolist() == [749, 499, 249, -1]
    wide = distillation(networks, 2, teacher_steps=8).grid
    assert (wide.starts.tolist(), wide.ends.tolist()) == ([999, 499], [499, -1])
    assert wide.teacher_starts.tolist() == [[999, 874, 749, 624], [499, 374, 249, 124]]


def test_the_loss_is_the_truncated_snr_weighted_x0_error_and_zero_on_the_targets(networks, data):
    run = distillation(networks, 4)
    caption_ids = data.caption_ids[:BATCH]
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn((BATCH, networks.config.autoencoder.latent_channels, 4, 4), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    state = generator.get_state()
    with torch.no_grad():
        loss = run.loss(data, latents, noise, None, caption_ids, generator)
        generator.set_state(state)
        index = torch.randint(0, 4, (BATCH,), generator=generator).numpy()
        timesteps = torch.from_numpy(run.grid.starts[index])
        alpha = ForwardProcess(networks.config.schedule).alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt().float() * latents + (1.0 - alpha).sqrt().float() * noise
        output = run.student(noisy, timesteps, **_conditioning(data, caption_ids, run.device))
        denoised = (noisy - (1.0 - alpha).sqrt().float() * output) / alpha.sqrt().float()
        weight = torch.maximum(alpha / (1.0 - alpha), torch.ones_like(alpha)).float()
        by_hand = (weight * (denoised - run.wanted(data, noisy, caption_ids, index)).pow(2)).mean()
        assert float(loss) > 1e-4  # the student starts as the teacher, whose one step is not its two
        torch.testing.assert_close(loss, by_hand, rtol=1e-4, atol=1e-7)
        run.student = OracleStudent(run, data, caption_ids)
        generator.set_state(state)
        assert float(run.loss(data, latents, noise, None, caption_ids, generator)) < 1e-8


def test_the_teacher_takes_the_bases_own_guidance_unless_the_flag_names_one(networks, data):
    unguided = dataclasses.replace(networks.config, default_sampler=SamplerDefaults(guidance_scale=1.0))
    assert distillation(networks, 2, None).guidance_scale == DEFAULT_GUIDANCE_SCALE  # the tiny base names none
    assert distillation(networks, 2, None, unguided).guidance_scale == 1.0
    assert distillation(networks, 2, 3.0, unguided).guidance_scale == 3.0
    run = distillation(networks, 2, None, unguided)
    rows = []
    teacher = run.teacher
    run.teacher = lambda latents, *args, **kwargs: (rows.append(len(latents)), teacher(latents, *args, **kwargs))[1]
    caption_ids = data.caption_ids[:BATCH]
    latents = torch.randn((BATCH, networks.config.autoencoder.latent_channels, 4, 4))
    with torch.no_grad():
        run.wanted(data, latents, caption_ids, np.array([0, 1, 0, 1]))
    assert rows == [BATCH, BATCH]  # two teacher steps at guidance 1: the conditional rows alone


def test_the_model_it_writes_samples_ddim_at_n_steps_one_row_a_step(base, tmp_path, rng):
    base_unet = sha256_file(base / UNET_WEIGHTS)
    out = tmp_path / "progressive"
    assert main(["progressive", "--base", str(base), "--out", str(out), "--sample-steps", "2", *QUICK]) == 0
    assert sha256_file(base / UNET_WEIGHTS) == base_unet
    written = json.loads((out / "model.json").read_text())
    assert written["sampler"]["timestep_spacing"] == "trailing"
    defaults = written["default_sampler"]
    assert (defaults["name"], defaults["steps"], defaults["guidance_scale"]) == ("ddim", 2, 1.0)
    assert defaults_and_rows(out, rng) == (("ddim", 2, 1.0), 2)  # one UNet row a step
    # a second round takes the first's folder as its base, at its guidance 1
    again = tmp_path / "again"
    assert main(["progressive", "--base", str(out), "--out", str(again), "--sample-steps", "1", *QUICK]) == 0
    state = json.loads((again / "model.json").read_text())
    assert state["default_sampler"]["steps"] == 1 and state["sampler"]["timestep_spacing"] == "trailing"


def test_bad_flags_are_one_line(base, tmp_path, capsys):
    cases = [
        (["--sample-steps", "0"], "--sample-steps is 0; expected a positive integer"),
        (["--sample-steps", "501"], "--sample-steps is 501; expected at most 500 (the teacher takes 2 times as many "
                                    "DDIM steps, of the base's 1000 training timesteps)"),
        (["--sample-steps", "48"], "--sample-steps is 48; the trailing grid of 48 DDIM steps is not every 2 "
                                   "timesteps of the grid of 96"),
        (["--sample-steps", "4", "--teacher-steps", "6"], "--teacher-steps is 6; expected a multiple of "
                                                          "--sample-steps 4 of at least 8"),
        (["--sample-steps", "300", "--teacher-steps", "1200"], "--sample-steps is 300; expected at most 250 (the "
                                                               "teacher takes 4 times as many DDIM steps"),
        (["--guidance-scale", "-1"], "--guidance-scale is -1.0; expected a finite number >= 0"),
    ]
    for flags, message in cases:
        assert main(["progressive", "--base", str(base), "--out", str(tmp_path / "a"), *QUICK, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ldm-train: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists()
