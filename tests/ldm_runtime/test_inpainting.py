"""Inpainting by latent blending on any text-to-image model: after every step the latents outside the mask are the
init image's noised to the next step, the image returned keeps the init image's pixels outside the mask exactly, and
an imported Stable Diffusion model (4-channel UNet) gives the latents of diffusers' StableDiffusionInpaintPipeline on
the same noise (on the torch engine, and on the onnxruntime and openvino engines over its fp32 engine dir). The tiny
checkpoint of test_pipeline and the tiny Stable Diffusion of test_image_to_image."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_runtime.errors import RequestError
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from test_image_to_image import (  # noqa: F401 (fixtures: the tiny checkpoint, the tiny SD and its engine dir)
    ENGINE_DIR_LATENT_RTOL,
    LATENT_RTOL,
    PROMPT,
    checkpoint_dir,
    diffusers_edit_latents,
    encoded,
    engine,
    final_latents,
    random_image,
    relative_error,
    run,
    sd2_engines,
    stable_diffusion,
)


def random_mask(rng: np.random.Generator, height: int = 16, width: int = 16) -> np.ndarray:
    """(H, W) uint8 grey levels: a random rectangle of 128..255 (repaint) on 0..127 (keep)."""
    mask = rng.integers(0, 128, (height, width)).astype(np.uint8)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    bottom, right = rng.integers(top + 4, height + 1), rng.integers(left + 4, width + 1)
    mask[top:bottom, left:right] = rng.integers(128, 256, (bottom - top, right - left))
    return mask


def test_the_image_keeps_the_init_images_pixels_outside_the_mask_and_the_decoded_ones_inside(engine, rng):
    pipeline = Pipeline(engine)
    image, mask = random_image(rng), random_mask(rng)
    request = GenerationRequest(prompt=PROMPT, seed=int(rng.integers(0, 2**62)), sampler="euler", steps=4,
                                init_image=image, mask=mask)
    (latents,) = final_latents(pipeline, [request])
    decoded = engine.decode(latents / engine.info.latent_scale_factor)[0]
    decoded = ((decoded + 1) * 127.5).clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
    inpainted = pipeline.generate([request])[0]
    repaint = mask >= 128
    assert np.array_equal(inpainted[~repaint], image[~repaint])
    assert np.array_equal(inpainted[repaint], decoded[repaint])
    assert not np.array_equal(inpainted[repaint], image[repaint])


@pytest.mark.parametrize(("sampler", "strength"), [("ddim", 0.7), ("euler", 1.0), ("dpmpp-2m-sde", 0.8),
                                                   ("plms", 1.0)])
def test_after_every_step_the_latents_outside_the_mask_are_the_init_images_noised_to_the_next_step(engine, rng,
                                                                                                  sampler, strength):
    pipeline = Pipeline(engine)
    image, mask = random_image(rng), random_mask(rng)
    request = GenerationRequest(prompt=PROMPT, seed=int(rng.integers(0, 2**62)), sampler=sampler, steps=5,
                                init_image=image, mask=mask, strength=strength)
    unmasked = dataclasses.replace(request, mask=None)
    states = pipeline.start([request, unmasked])
    latent_mask = (mask >= 128)[::2, ::2]
    assert np.array_equal(states[0].latent_mask[0, 0].numpy(), latent_mask.astype(np.float32))
    scheduler = pipeline.sampler if sampler == "ddim" else pipeline.sigma_samplers[sampler]
    original, noise = states[0].original_latents, states[0].original_noise
    while not states[0].done:
        states = pipeline.advance(states)
        signal, scale = scheduler.noise_scales(states[0].trajectory, states[0].step_index)
        expected = (original * signal + noise * scale)[0].numpy()
        latents = states[0].latents[0].numpy()
        assert np.array_equal(latents[:, ~latent_mask], expected[:, ~latent_mask])
        assert not np.allclose(latents[:, latent_mask], expected[:, latent_mask])
    assert np.array_equal(states[0].latents[0].numpy()[:, ~latent_mask], original[0].numpy()[:, ~latent_mask])
    assert not np.array_equal(states[0].latents.numpy(), states[1].latents.numpy())


def test_a_mask_that_repaints_everything_is_image_to_image_and_one_that_repaints_nothing_the_image(engine, rng):
    pipeline = Pipeline(engine)
    image = random_image(rng)
    request = GenerationRequest(prompt=PROMPT, seed=int(rng.integers(0, 2**62)), sampler="dpmpp-2m", steps=4,
                                init_image=image, strength=0.75)
    everything = dataclasses.replace(request, mask=np.full((16, 16), True))
    nothing = dataclasses.replace(request, mask=np.zeros((16, 16), np.uint8))
    edited, repainted, kept = pipeline.generate([request, everything, nothing])
    assert np.array_equal(edited, repainted) and not np.array_equal(edited, image)
    assert np.array_equal(kept, image)


BAD_MASKS = [
    (dict(mask=np.zeros((16, 16), np.uint8)), "mask is given without an init_image"),
    (dict(init_image=np.zeros((16, 16, 3), np.uint8), mask=np.zeros((16, 12), np.uint8)),
     "mask is 12x16 pixels; expected the init_image's size, 16x16"),
    (dict(init_image=np.zeros((16, 16, 3), np.uint8), mask=np.zeros((16, 16), np.float32)),
     "mask is a float32 array of shape (16, 16); expected an (H, W) uint8 or bool array"),
    (dict(init_image=np.zeros((16, 16, 3), np.uint8), mask=np.zeros((16, 16, 3), np.uint8)),
     "mask is a uint8 array of shape (16, 16, 3)"),
    (dict(init_image=np.zeros((16, 16, 3), np.uint8), mask="everything"), "mask is a str"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_MASKS)
def test_a_bad_mask_is_refused_in_one_sentence_naming_the_field(engine, fields, message):
    with pytest.raises(RequestError) as raised:
        Pipeline(engine).start([GenerationRequest(prompt=PROMPT, seed=1, steps=2, **fields)])
    assert raised.value.field == "mask" and message in str(raised.value), str(raised.value)


def test_ldm_sample_mask_keeps_the_init_images_pixels_outside_it(checkpoint_dir, engine, tmp_path, rng, capsys):
    image, mask = random_image(rng), random_mask(rng)
    (tmp_path / "photo.webp").write_bytes(encoded(image, "WEBP", lossless=True))
    (tmp_path / "mask.png").write_bytes(encoded(mask, "PNG"))
    out = tmp_path / "inpainted.png"
    code, err = run(["--model", checkpoint_dir, PROMPT, "--seed", 9, "--sampler", "ddim", "--steps", 4,
                     "--init-image", tmp_path / "photo.webp", "--mask", tmp_path / "mask.png", "--out", out], capsys)
    assert code == 0, err
    written = np.asarray(Image.open(out).convert("RGB"))
    expected = Pipeline(engine).generate([GenerationRequest(prompt=PROMPT, seed=9, sampler="ddim", steps=4,
                                                            init_image=image, mask=mask)])[0]
    assert np.array_equal(written, expected)
    assert np.array_equal(written[mask < 128], image[mask < 128])


def test_ldm_sample_refuses_a_mask_of_another_size_before_loading_the_model(tmp_path, rng, capsys):
    (tmp_path / "photo.png").write_bytes(encoded(random_image(rng), "PNG"))
    (tmp_path / "mask.png").write_bytes(encoded(random_mask(rng, 16, 8), "PNG"))
    code, err = run(["--model", tmp_path / "no-model-here", PROMPT, "--init-image", tmp_path / "photo.png",
                     "--mask", tmp_path / "mask.png", "--out", tmp_path / "out.png"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert f"--mask {tmp_path / 'mask.png'} is 8x16 pixels; expected the --init-image's size, 16x16" in lines[0]


# ---------------------------------------------------------------- an imported Stable Diffusion against diffusers


@pytest.mark.parametrize(("sampler", "steps", "strength"), [
    ("ddim", 6, 1.0), ("ddim", 6, 0.6), ("euler", 5, 1.0), ("euler-a", 5, 0.7), ("dpmpp-2m", 7, 1.0),
    ("dpmpp-2m", 6, 0.5),
])
def test_imported_model_inpaints_as_diffusers_inpaint_pipeline(stable_diffusion, rng, monkeypatch, sampler, steps,
                                                               strength):
    pipe, pipeline = stable_diffusion("sd1")
    image, mask, seed = random_image(rng), random_mask(rng), int(rng.integers(0, 2**31))
    expected = diffusers_edit_latents(pipe, sampler, image, seed, steps, strength, monkeypatch, mask=mask)
    (actual,) = final_latents(pipeline, [GenerationRequest(prompt=PROMPT, seed=seed, sampler=sampler, steps=steps,
                                                           guidance_scale=7.5, init_image=image, strength=strength,
                                                           mask=mask)])
    assert relative_error(expected, actual) <= LATENT_RTOL


@pytest.mark.parametrize("engine_name", ["onnxruntime", "openvino"])
def test_fp32_engine_dir_of_an_import_inpaints_as_diffusers_inpaint_pipeline(sd2_engines, rng, monkeypatch,
                                                                             engine_name):
    """The fp32 engine dir of the SD 2.x-like import (v-prediction, linear projections), on either engine, ends on
    diffusers' final latents within the relative error of 1e-4 that the engine-dir tests allow its graphs against
    the eager model; inside the mask its pixels are within one uint8 level of diffusers' image of those latents,
    outside they are the init image's."""
    pipe, pipeline = sd2_engines(engine_name)
    image, mask, seed = random_image(rng), random_mask(rng), int(rng.integers(0, 2**31))
    expected = diffusers_edit_latents(pipe, "euler", image, seed, 5, 1.0, monkeypatch, mask=mask)
    request = GenerationRequest(prompt=PROMPT, seed=seed, sampler="euler", steps=5, guidance_scale=7.5,
                                init_image=image, strength=1.0, mask=mask)
    (actual,) = final_latents(pipeline, [request])
    error = relative_error(expected, torch.as_tensor(actual))
    assert error <= ENGINE_DIR_LATENT_RTOL, error
    with torch.no_grad():
        decoded = pipe.vae.decode(expected / pipe.vae.config.scaling_factor).sample
    want = np.asarray(pipe.image_processor.postprocess(decoded, output_type="pil")[0]).astype(int)
    got = pipeline.generate([request])[0]
    repaint = mask >= 128
    levels = int(np.abs(got[repaint].astype(int) - want[repaint]).max())
    assert levels <= 1, levels
    assert np.array_equal(got[~repaint], image[~repaint]) and not np.array_equal(got[repaint], image[repaint])


SHIPPED_INPAINT = Path(__file__).resolve().parents[2] / "models" / "shapes-inpaint"


@pytest.mark.skipif(not (SHIPPED_INPAINT / "model.json").is_file(), reason="models/shapes-inpaint is not in this tree")
def test_the_shipped_inpainting_model_repaints_only_the_mask_and_needs_an_image_and_a_mask(rng):
    from ldm_runtime.engines.torch_engine import TorchEngine

    engine = TorchEngine(SHIPPED_INPAINT, device="cpu")
    assert engine.info.inpainting and engine.config.unet.in_channels == 9
    pipeline = Pipeline(engine)
    with pytest.raises(RequestError, match="init_image and mask are missing"):
        pipeline.validate(GenerationRequest(prompt="a red circle", seed=0))
    image = random_image(rng, 32, 32)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    (edited,) = pipeline.generate([GenerationRequest(prompt="a large green star in the center, on a white "
                                                            "background", seed=int(rng.integers(0, 2**31)),
                                                     steps=4, init_image=image, mask=mask)])
    kept = mask < 128
    assert np.array_equal(edited[kept], image[kept]) and not np.array_equal(edited[~kept], image[~kept])
