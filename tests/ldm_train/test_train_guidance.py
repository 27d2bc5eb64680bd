"""``ldm-train guidance``: the student learns the teacher's guided output (the runtime's classifier-free guidance
of the teacher's conditional and unconditional outputs on the same noised latents), the model folder it writes is a
whole model whose requests default to the base's sampler at guidance 1 (one UNet row per image and step), the base
is left as it was, and bad flags are one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ldm_runtime.checkpoint import AUTOENCODER_WEIGHTS, UNET_WEIGHTS, load_checkpoint, load_tensors
from ldm_runtime.config import DEFAULT_SAMPLER, DEFAULT_STEPS
from ldm_runtime.files import sha256_file
from ldm_runtime.guidance import apply_guidance
from ldm_train.cli import main
from ldm_train.data import build_dataset
from ldm_train.diffusion import ForwardProcess
from ldm_train.train_guidance import GuidanceDistillation, GuidanceSettings
from ldm_train.train_lora import _with_context
from ldm_train.train_unet import _conditioning, encode_dataset
from tests.ldm_export.tiny_checkpoint import shared_tiny_checkpoint
from tests.ldm_train.distilled import defaults_and_rows

QUICK = ["--data", "shapes:16", "--steps", "4", "--batch-size", "4", "--checkpoint-every", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return shared_tiny_checkpoint(tmp_path_factory)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_the_loss_is_the_students_distance_to_the_teachers_guided_output(base, guidance_scale):
    networks = load_checkpoint(base)
    config, teacher, device = networks.config, networks.unet.eval(), torch.device("cpu")
    student = copy.deepcopy(teacher)
    forward = ForwardProcess(config.schedule)
    data = _with_context(encode_dataset(build_dataset("shapes:8", config.image_size, 0), networks.autoencoder,
                                        networks.text_encoder, device, 4, True), networks.text_encoder, device)
    settings = GuidanceSettings(base=str(base), out="", guidance_scale=guidance_scale)
    run = GuidanceDistillation(settings, config, teacher, student, forward, device)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn((4, config.autoencoder.latent_channels, 4, 4), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([0, 13, 500, config.schedule.num_train_timesteps - 1])
    caption_ids = data.caption_ids[:4]
    with torch.no_grad():
        loss = run.loss(data, latents, noise, timesteps, caption_ids, generator)
        noisy = forward.add_noise(latents, noise, timesteps)
        conditional = teacher(noisy, timesteps, **_conditioning(data, caption_ids, device))
        unconditional = teacher(noisy, timesteps, **_conditioning(data, torch.zeros_like(caption_ids), device))
    wanted = apply_guidance(unconditional, conditional, guidance_scale)
    if guidance_scale == 1.0:  # the student starts as the teacher: the conditional output is already the target
        assert float(loss) < 1e-10
    else:
        assert float(loss) > 1e-4
        torch.testing.assert_close(loss, (conditional - wanted).pow(2).mean(), rtol=1e-5, atol=1e-8)


def test_the_model_it_writes_samples_with_the_bases_sampler_unguided_by_default(base, tmp_path, rng):
    base_unet = sha256_file(base / UNET_WEIGHTS)
    out = tmp_path / "guidance"
    assert main(["guidance", "--base", str(base), "--out", str(out), *QUICK]) == 0
    assert sha256_file(base / UNET_WEIGHTS) == base_unet  # the base is untouched
    assert sha256_file(out / AUTOENCODER_WEIGHTS) == sha256_file(base / AUTOENCODER_WEIGHTS)
    assert any(not torch.equal(value, load_tensors(base / UNET_WEIGHTS)[name])
               for name, value in load_tensors(out / UNET_WEIGHTS).items())  # it trained
    defaults = json.loads((out / "model.json").read_text())["default_sampler"]
    assert (defaults["name"], defaults["steps"], defaults["guidance_scale"]) == (None, None, 1.0)
    # one UNet row a step: no unconditional row
    assert defaults_and_rows(out, rng) == ((DEFAULT_SAMPLER, DEFAULT_STEPS, 1.0), DEFAULT_STEPS)


def test_bad_flags_an_existing_model_or_the_base_as_out_are_one_line(base, tmp_path, capsys):
    cases = [
        (["--out", str(tmp_path / "a"), "--average-decay", "1"], "--average-decay is 1.0; expected a value in [0, "
                                                                 "1)"),
        (["--out", str(tmp_path / "a"), "--guidance-scale", "-1"], "--guidance-scale is -1.0; expected a finite "
                                                                   "number >= 0"),
        (["--out", str(tmp_path / "a"), "--steps", "0"], "--steps is 0; expected a positive integer"),
        (["--out", str(base)], f"--out {base} already holds a model; pass --overwrite"),
        (["--out", str(base), "--overwrite"], f"--out {base} is --base; expected a new folder"),
    ]
    for flags, message in cases:
        assert main(["guidance", "--base", str(base), *QUICK, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ldm-train: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists()
