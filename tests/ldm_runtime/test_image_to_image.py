"""Image to image (SDEdit) in the pipeline and ldm-sample: strength 1 is text to image and 0 the reconstruction,
each sampler begins part-way with a first step, an imported Stable Diffusion model gives the latents of diffusers'
StableDiffusionImg2ImgPipeline on the same noise (on the torch engine, and on the onnxruntime and openvino engines
over its fp32 engine dir), and uploads are read as untrusted bytes. The tiny random-weight checkpoint of
test_pipeline (16 px images, 8x8 latents) and a tiny random Stable Diffusion folder."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from ldm_runtime import sample
from ldm_runtime.config import LARGEST_IMAGE_SIDE
from ldm_runtime.errors import RequestError
from ldm_runtime.images import read_upload
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from ldm_runtime.schedulers import SAMPLER_NAMES, DDIMConfig, NoiseSchedule, PLMSSampler
from test_pipeline import NumpyEngine, checkpoint_dir, engine  # noqa: F401 (session fixtures: the tiny checkpoint)
from tests.ldm_export.tiny_sd import feed_our_noise, relative_error
from tests.ldm_runtime.sd_engine_dir import sd2_engines  # noqa: F401 (session fixture: an imported SD's engine dir)

LATENT_RTOL = 1e-5  # final latents against diffusers', fp32 both ways (as the scheduler parity tests)
ENGINE_DIR_LATENT_RTOL = 1e-4  # an fp32 engine dir's, as its graphs against the eager model (the engine-dir tests)
PROMPT = "a red circle"
SIDE = LARGEST_IMAGE_SIDE  # the largest side an upload may have before a model is loaded, as ldm-sample reads them
BEYOND = SIDE + 1


def random_image(rng: np.random.Generator, height: int = 16, width: int = 16) -> np.ndarray:
    """A smooth random picture (a few colour blobs), (H, W, 3) uint8, which the tiny autoencoder has to keep."""
    rows, columns = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.zeros((height, width, 3))
    for _ in range(3):
        centre, colour = rng.random(2), rng.random(3)
        image += colour * np.exp(-((rows - centre[0]) ** 2 + (columns - centre[1]) ** 2) * 8)[..., None]
    return np.round(255 * image / image.max()).astype(np.uint8)


def final_latents(pipeline: Pipeline, requests: list[GenerationRequest]) -> list:
    states = pipeline.start(requests)
    while not all(state.done for state in states):
        active = [k for k, state in enumerate(states) if not state.done]
        for k, state in zip(active, pipeline.advance([states[k] for k in active])):
            states[k] = state
    return [state.latents for state in states]


# ---------------------------------------------------------------- strength: where sampling begins


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_strength_one_gives_the_text_to_image_image_byte_for_byte(engine, rng, sampler):
    pipeline = Pipeline(engine)
    seed = int(rng.integers(0, 2**62))
    text = GenerationRequest(prompt=PROMPT, seed=seed, sampler=sampler, steps=3)
    edit = dataclasses.replace(text, init_image=random_image(rng), strength=1.0)
    text_image, edit_image = pipeline.generate([text, edit])
    assert np.array_equal(text_image, edit_image)
    assert pipeline.start([edit])[0].original_latents is None  # nothing of the image is kept without a mask


def test_strength_zero_returns_the_reconstruction_without_a_unet_call(engine, rng):
    from test_pipeline import CountingEngine

    counting = CountingEngine(engine)
    pipeline = Pipeline(counting)
    image = random_image(rng)
    request = GenerationRequest(prompt=PROMPT, seed=int(rng.integers(0, 2**62)), init_image=image, strength=0.0)
    states = pipeline.start([request])
    assert states[0].done and len(states[0].trajectory) == 0
    pixels = torch.from_numpy(image.astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)[None]
    reconstruction = pipeline.decode([dataclasses.replace(
        states[0], latents=engine.encode_images(pixels) * engine.info.latent_scale_factor)])[0]
    assert np.array_equal(pipeline.generate([request])[0], reconstruction)
    assert counting.unet_calls == []
    assert np.abs(reconstruction.astype(int) - image).mean() > 0  # a random autoencoder does not return the image


@pytest.mark.parametrize(("sampler", "steps", "strength", "first"), [
    ("ddim", 10, 0.55, 5), ("euler", 7, 0.3, 5), ("dpmpp-2m", 4, 0.75, 1), ("unipc", 6, 0.999, 1), ("lcm", 4, 0.5, 2),
])
def test_image_to_image_takes_the_last_int_steps_times_strength_steps_of_the_trajectory(engine, rng, sampler, steps,
                                                                                      strength, first):
    pipeline = Pipeline(engine)
    text = GenerationRequest(prompt=PROMPT, seed=int(rng.integers(0, 2**62)), sampler=sampler, steps=steps)
    edit = dataclasses.replace(text, init_image=random_image(rng), strength=strength)
    text_state, edit_state = pipeline.start([text, edit])
    np.testing.assert_array_equal(edit_state.trajectory.timesteps, text_state.trajectory.timesteps[first:])
    assert edit_state.step_index == 0 and edit_state.history == ()


def test_plms_begun_part_way_is_a_plms_run_whose_every_call_lands_on_the_next_calls_timestep():
    sampler = PLMSSampler(NoiseSchedule(), steps_offset=1)
    full = sampler.trajectory(10)
    for start in range(10):
        begun = sampler.trajectory_from(10, start)
        remaining = 10 - start
        assert len(begun) == (remaining + 1 if remaining > 1 else remaining)
        assert begun.timesteps[0] == full.timesteps[start + (start > 0)]  # the full run's second call repeats
        np.testing.assert_array_equal(begun.to_timesteps[:-1], begun.timesteps[1:])
        np.testing.assert_array_equal(begun.from_timesteps[2:], begun.timesteps[2:])
        if remaining > 1:  # the redo goes back to the first call's sample
            assert begun.from_timesteps[1] == begun.timesteps[0]
    assert len(sampler.trajectory_from(10, 10)) == 0


class ExactDenoiserEngine(NumpyEngine):
    """The tiny engine's text encoder and decoder, with a UNet that predicts the noise of a one-image data set
    exactly, eps = (x - sqrt(a_t) x_0) / sqrt(1 - a_t), and an encoder that gives that image's latents for any."""

    def __init__(self, engine, latents: np.ndarray):
        super().__init__(engine)
        self.latents = latents
        self.alphas_cumprod = NoiseSchedule.from_dict(engine.info.schedule).alphas_cumprod

    def unet(self, latents, timesteps, context, context_mask):
        alpha = self.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
        original = self.latents * self.info.latent_scale_factor
        return ((latents - np.sqrt(alpha) * original) / np.sqrt(1 - alpha)).astype(np.float32)

    def encode_images(self, images):
        return np.repeat(self.latents, len(images), axis=0)


@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 10), ("euler", 4), ("dpmpp-2m", 8), ("unipc-3", 9),
                                                ("plms", 10)])
def test_every_sampler_begun_part_way_lands_on_the_image_under_the_exact_denoiser(engine, rng, sampler, steps):
    """With the exact noise prediction of a one-image data set, a deterministic sampler that begins at the noise
    level of the step it says it begins at, and then hands the UNet each sample's own timestep, lands on that image:
    a sampler begun one step off (as diffusers' PNDMScheduler is in its img2img pipeline) does not."""
    latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    pipeline = Pipeline(ExactDenoiserEngine(engine, latents), DDIMConfig(set_alpha_to_one=True))
    for strength in (0.3, 0.5, 0.9):
        request = GenerationRequest(prompt=PROMPT, seed=int(rng.integers(0, 2**62)), sampler=sampler, steps=steps,
                                    init_image=random_image(rng), strength=strength)
        (landed,) = final_latents(pipeline, [request])
        expected = latents * engine.info.latent_scale_factor
        assert np.linalg.norm(landed - expected) / np.linalg.norm(expected) <= 1e-4, (strength, sampler)


def test_image_requests_in_one_batch_with_others_equal_single_runs_bit_for_bit(engine, rng):
    pipeline = Pipeline(engine)
    seeds = rng.choice(2**62, size=6, replace=False).tolist()
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:12, 2:10] = True
    requests = [
        GenerationRequest(prompt=PROMPT, seed=seeds[0], sampler="dpmpp-2m", steps=4),
        GenerationRequest(prompt=PROMPT, seed=seeds[1], sampler="dpmpp-2m", steps=4, init_image=random_image(rng)),
        GenerationRequest(prompt="two blue squares", seed=seeds[2], sampler="ddim", steps=5, eta=0.5,
                          init_image=random_image(rng), strength=0.6),
        GenerationRequest(prompt=PROMPT, seed=seeds[3], sampler="euler-a", steps=3, init_image=random_image(rng),
                          strength=0.7, mask=mask),
        GenerationRequest(prompt=PROMPT, seed=seeds[4], sampler="plms", steps=4, init_image=random_image(rng),
                          strength=0.5),
        GenerationRequest(prompt=PROMPT, seed=seeds[5], sampler="euler", steps=3, init_image=random_image(rng),
                          strength=0.0),
    ]
    together = pipeline.generate(requests)
    for request, image in zip(requests, together):
        assert np.array_equal(pipeline.generate([request])[0], image)
    assert len({image.tobytes() for image in together}) == len(requests)


def test_the_init_image_sets_the_size_and_a_default_strength(engine, rng):
    pipeline = Pipeline(engine)
    image = random_image(rng, 12, 20)
    request = GenerationRequest(prompt=PROMPT, seed=1, steps=5, init_image=image)
    assert pipeline.image_shape(request) == (12, 20)
    assert pipeline.resolve(request).strength == 0.8
    assert pipeline.resolve(dataclasses.replace(request, mask=np.zeros((12, 20), np.uint8))).strength == 1.0
    assert pipeline.generate([dataclasses.replace(request, height=12, width=20)])[0].shape == (12, 20, 3)


def test_requests_hold_a_read_only_copy_of_the_image_and_compare_it_by_value(rng):
    image = random_image(rng)
    request = GenerationRequest(prompt=PROMPT, seed=1, init_image=image)
    image[0, 0] ^= 0xFF
    assert request.init_image[0, 0].tolist() != image[0, 0].tolist()
    assert not request.init_image.flags.writeable
    same = GenerationRequest(prompt=PROMPT, seed=1, init_image=image.copy())
    image[0, 0] ^= 0xFF
    again = GenerationRequest(prompt=PROMPT, seed=1, init_image=image)
    assert request == again and hash(request) == hash(again) and request != same
    assert dataclasses.replace(request, seed=2).init_image is request.init_image  # no copy of a held copy
    assert request != GenerationRequest(prompt=PROMPT, seed=1)


BAD_EDITS = [
    (dict(strength=0.5), "strength", "strength is 0.5 without an init_image"),
    (dict(init_image=np.zeros((16, 16, 3), np.float32)), "init_image",
     "init_image is a float32 array of shape (16, 16, 3); expected an (H, W, 3) uint8 RGB array"),
    (dict(init_image=np.zeros((16, 16), np.uint8)), "init_image", "expected an (H, W, 3) uint8 RGB array"),
    (dict(init_image=[[0]]), "init_image", "init_image is a list"),
    (dict(init_image=np.zeros((18, 16, 3), np.uint8)), "init_image",
     "init_image is 16x18 pixels; expected sides that are multiples of 4 from 4 to 32"),
    (dict(init_image=np.zeros((16, 20, 3), np.uint8), width=16), "width",
     "width is 16 but the init_image is 20x16 pixels; expected none or 20"),
    (dict(init_image=np.zeros((16, 16, 3), np.uint8), strength=1.5), "strength",
     "strength is 1.5; expected a number from 0 to 1"),
    (dict(init_image=np.zeros((16, 16, 3), np.uint8), strength=float("nan")), "strength", "strength is nan"),
    (dict(init_image=np.zeros((16, 16, 3), np.uint8), strength=True), "strength", "strength is True"),
    (dict(init_image=np.zeros((16, 16, 3), np.uint8), strength=0.4), "strength",  # returned the reconstruction
     "strength is 0.4 with 2 steps, which runs none of them (the last int(steps x strength) run); expected a "
     "strength of at least 0.5 for 2 steps"),
]


@pytest.mark.parametrize(("fields", "field", "message"), BAD_EDITS)
def test_a_bad_edit_field_is_refused_in_one_sentence_naming_it(engine, fields, field, message):
    pipeline = Pipeline(engine)
    with pytest.raises(RequestError) as raised:
        pipeline.generate([GenerationRequest(prompt=PROMPT, seed=1, steps=2, **fields)])
    assert raised.value.field == field and message in str(raised.value)
    assert "\n" not in str(raised.value)


# ---------------------------------------------------------------- uploads


def encoded(image: np.ndarray | Image.Image, format: str, **options) -> bytes:
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    picture.save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(("format", "options"), [("PNG", {}), ("WEBP", {"lossless": True}), ("JPEG", {"quality": 95})])
def test_read_upload_decodes_png_webp_and_jpeg_to_rgb(rng, format, options):
    image = random_image(rng, 16, 24)
    decoded = read_upload(encoded(image, format, **options), "init_image", max_side=SIDE)
    assert decoded.dtype == np.uint8 and decoded.shape == (16, 24, 3)
    if format == "JPEG":
        assert np.abs(decoded.astype(int) - image).mean() < 4
    else:
        assert np.array_equal(decoded, image)
    grey = read_upload(encoded(image, format, **options), "mask", max_side=SIDE, mask=True)
    assert grey.shape == (16, 24) and grey.dtype == np.uint8


def test_read_upload_turns_a_jpeg_upright_as_its_exif_orientation_says(rng):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    decoded = read_upload(encoded(random_image(rng, 16, 24), "JPEG", exif=exif), "init_image", max_side=SIDE)
    assert decoded.shape == (24, 16, 3)


def png_claiming_size(width: int, height: int) -> bytes:
    """A one-pixel PNG whose header states ``width`` x ``height`` (CRC fixed): decoding it would need that many
    pixels of memory, as a decompression bomb does."""
    data = bytearray(encoded(np.zeros((1, 1, 3), np.uint8), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


UPLOAD_REFUSALS = [
    (b"", {}, "init_image is empty; expected a PNG, JPEG or WebP image"),
    (b"GIF89a" + bytes(64), {}, "init_image is not a PNG, JPEG or WebP image"),
    ("BMP", {}, "init_image is not a PNG, JPEG or WebP image"),
    ("TIFF", {}, "init_image is not a PNG, JPEG or WebP image"),
    (png_claiming_size(BEYOND, 10), {}, f"init_image is {BEYOND}x10 pixels; expected at most {SIDE} pixels a side"),
    (png_claiming_size(100_000, 100_000), {}, f"init_image states a size of over 178956970 pixels in its header (a "
                                              f"decompression bomb); expected at most {SIDE} pixels a side"),
    (png_claiming_size(40, 40), {"max_side": 32}, "init_image is 40x40 pixels; expected at most 32 pixels a side"),
    ("PNG", {"max_bytes": 10}, "bytes; expected a PNG, JPEG or WebP image of at most 10 bytes"),
    ("TRUNCATED", {}, "init_image cannot be decoded as PNG"),
]


@pytest.mark.parametrize(("data", "limits", "message"), UPLOAD_REFUSALS)
def test_read_upload_refuses_bad_bytes_in_one_sentence_naming_the_field(rng, data, limits, message):
    if isinstance(data, str):
        image = random_image(rng)
        data = encoded(image, "PNG")[:-40] if data == "TRUNCATED" else encoded(image, data)
    with pytest.raises(RequestError) as raised:
        read_upload(data, "init_image", **{"max_side": SIDE, **limits})
    assert raised.value.field == "init_image" and message in str(raised.value), str(raised.value)
    assert "\n" not in str(raised.value)


def test_read_upload_checks_the_size_before_decoding_any_pixel(monkeypatch):
    def refuse_to_decode(self):
        raise AssertionError("a bomb was decoded")

    bombs = [png_claiming_size(side, side) for side in (BEYOND, 100_000)]
    for owner in (Image.Image, ImageFile.ImageFile):
        monkeypatch.setattr(owner, "load", refuse_to_decode)
    monkeypatch.setattr(Image.Image, "convert", refuse_to_decode)
    for bomb in bombs:
        with pytest.raises(RequestError, match=f"expected at most {SIDE} pixels a side"):
            read_upload(bomb, "init_image", max_side=SIDE)


# ---------------------------------------------------------------- ldm-sample


def run(argv: list, capsys) -> tuple[int, str]:
    code = sample.main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def test_ldm_sample_init_image_writes_the_pipelines_image_and_records_the_edit(checkpoint_dir, engine, tmp_path,
                                                                               rng, capsys):
    image = random_image(rng)
    (tmp_path / "photo.png").write_bytes(encoded(image, "PNG"))
    out = tmp_path / "edited.png"
    code, err = run(["--model", checkpoint_dir, PROMPT, "--seed", 4, "--sampler", "euler", "--steps", 5,
                     "--init-image", tmp_path / "photo.png", "--strength", 0.6, "--out", out], capsys)
    assert code == 0, err
    expected = Pipeline(engine).generate([GenerationRequest(prompt=PROMPT, seed=4, sampler="euler", steps=5,
                                                            init_image=image, strength=0.6)])[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), expected)
    settings = json.loads(Image.open(out).text["parameters"])
    assert settings["init_image"] == str(tmp_path / "photo.png") and settings["strength"] == 0.6
    assert settings["mask"] is None and (settings["height"], settings["width"]) == (16, 16)


CLI_REFUSALS = [
    (["--strength", "0.5"], "--strength 0.5 is given without --init-image"),
    (["--mask", "{mask}"], "is given without --init-image"),
    (["--init-image", "{missing}"], "cannot be read: No such file or directory"),
    (["--init-image", "{folder}"], "is a folder, not a regular file; expected a PNG, JPEG or WebP image file"),
    (["--init-image", "{text}"], "is not a PNG, JPEG or WebP image"),
    (["--init-image", "{gif}"], "is not a PNG, JPEG or WebP image"),
    (["--init-image", "{bomb}"], f"is {BEYOND}x{BEYOND} pixels; expected at most {SIDE} pixels a side"),
    (["--init-image", "{image}", "--strength", "1.5"], "strength is 1.5; expected a number from 0 to 1"),
    (["--init-image", "{image}", "--height", "20"], "height is 20 but the init_image is 16x16 pixels"),
    (["--init-image", "{large}"], "init_image is 40x40 pixels; expected sides that are multiples of 4 from 4 to 32"),
]


@pytest.mark.parametrize(("flags", "message"), CLI_REFUSALS)
def test_ldm_sample_refuses_a_bad_edit_flag_in_one_line_exit_2_writing_nothing(checkpoint_dir, tmp_path, rng,
                                                                               capsys, flags, message):
    files = {"image": tmp_path / "image.png", "mask": tmp_path / "mask.png", "missing": tmp_path / "missing.png",
             "folder": tmp_path, "text": tmp_path / "notes.png", "gif": tmp_path / "anim.gif",
             "bomb": tmp_path / "bomb.png", "large": tmp_path / "large.png"}
    files["image"].write_bytes(encoded(random_image(rng), "PNG"))
    files["mask"].write_bytes(encoded(np.zeros((16, 16), np.uint8), "PNG"))
    files["text"].write_text("a red circle\n")
    files["gif"].write_bytes(encoded(random_image(rng), "GIF"))
    files["bomb"].write_bytes(png_claiming_size(BEYOND, BEYOND))
    files["large"].write_bytes(encoded(random_image(rng, 40, 40), "PNG"))
    out = tmp_path / "out"
    argv = [flag.format(**files) for flag in flags]
    code, err = run(["--model", checkpoint_dir, PROMPT, "--steps", 2, *argv, "--out", out], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ldm-sample: error: "), err
    assert message in lines[0], lines[0]
    assert not out.exists()


# ---------------------------------------------------------------- an engine dir's encoder graph


def test_onnxruntime_engine_dir_edits_as_the_torch_engine(tmp_path_factory, rng):
    pytest.importorskip("onnxruntime")
    from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
    from ldm_runtime.engines.torch_engine import TorchEngine
    from tests.ldm_export.tiny_checkpoint import shared_tiny_engine

    checkpoint, engine_dir, code, output = shared_tiny_engine(tmp_path_factory, "fp32")
    assert code == 0, output
    mask = np.zeros((16, 24), np.uint8)
    mask[:, 12:] = 255
    requests = [GenerationRequest(prompt=PROMPT, seed=int(rng.integers(0, 2**62)), sampler=sampler, steps=4,
                                  init_image=random_image(rng, 16, 24), strength=0.5, mask=edit_mask)
                for sampler, edit_mask in (("dpmpp-2m", None), ("ddim", mask))]
    exported = final_latents(Pipeline(OnnxRuntimeEngine(engine_dir, intra_op_threads=1)), requests)
    eager = final_latents(Pipeline(TorchEngine(checkpoint, device="cpu", unet_chunk_size=None)), requests)
    for got, want in zip(exported, eager):
        want = want.double().numpy()
        assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-4


# ---------------------------------------------------------------- an imported Stable Diffusion against diffusers


@pytest.fixture(scope="module")
def stable_diffusion(tmp_path_factory):
    """kind -> (diffusers' pipeline of a tiny random SD folder, our pipeline over the torch engine on its import),
    each made on first use."""
    made: dict[str, tuple] = {}

    def model(kind: str):
        from diffusers import StableDiffusionPipeline

        from ldm_export.sd_import import import_source
        from ldm_runtime.engines.torch_engine import TorchEngine
        from tests.ldm_export.test_sd_import import _kind_seed
        from tests.ldm_export.tiny_sd import SD1_LIKE, SD2_LIKE, write_diffusers_folder

        if kind not in made:
            root = tmp_path_factory.mktemp(f"edit-{kind}")
            source = write_diffusers_folder({"sd1": SD1_LIKE, "sd2": SD2_LIKE}[kind], root / "diffusers",
                                            _kind_seed(kind))
            pipe = StableDiffusionPipeline.from_pretrained(str(source), safety_checker=None,
                                                           requires_safety_checker=False)
            made[kind] = pipe, Pipeline(TorchEngine(import_source(source, root / "checkpoint"), device="cpu"))
        return made[kind]

    return model


# our sampler -> diffusers' scheduler class and the settings that make it that sampler
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp-2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc-3": ("UniPCMultistepScheduler", {"solver_order": 3}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
def diffusers_edit_latents(pipe, sampler: str, image: np.ndarray, seed: int, steps: int, strength: float,
                           monkeypatch, mask: np.ndarray | None = None, guidance_scale: float = 7.5) -> torch.Tensor:
    """The final latents of diffusers' StableDiffusionImg2ImgPipeline (or, with ``mask``,
    StableDiffusionInpaintPipeline on the 4-channel UNet) around the scheduler of ``sampler`` read from the model's
    folder, fed our noise: x_T noise drawn for ``seed``, each stochastic step's noise for it, and the image's
    latents as the posterior mode (our encoder's) where diffusers draws a sample."""
    import diffusers

    feed_our_noise(monkeypatch, seed, (4, image.shape[0] // pipe.vae_scale_factor,
                                       image.shape[1] // pipe.vae_scale_factor))
    class_name, settings = DIFFUSERS_SCHEDULERS[sampler]
    scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **settings)
    kind = diffusers.StableDiffusionImg2ImgPipeline if mask is None else diffusers.StableDiffusionInpaintPipeline
    edit = kind(**{**pipe.components, "scheduler": scheduler})
    edit.set_progress_bar_config(disable=True)
    inputs = {} if mask is None else {"mask_image": Image.fromarray(mask), "height": image.shape[0],
                                      "width": image.shape[1]}
    return edit(PROMPT, image=Image.fromarray(image), strength=strength, num_inference_steps=steps,
                guidance_scale=guidance_scale, negative_prompt="", output_type="latent", **inputs).images


@pytest.mark.parametrize(("sampler", "steps", "strength"), [
    ("ddim", 6, 0.5), ("euler", 5, 0.6), ("euler-a", 5, 0.6), ("dpmpp-2m", 7, 0.6), ("dpmpp-2m-karras", 6, 0.7),
    ("dpmpp-2m-sde", 5, 0.8), ("unipc-3", 8, 0.75), ("lcm", 4, 0.5), ("tcd", 5, 0.6),
])
def test_imported_model_edits_as_diffusers_img2img_pipeline(stable_diffusion, rng, monkeypatch, sampler, steps,
                                                            strength):
    pipe, pipeline = stable_diffusion("sd1")
    image, seed = random_image(rng), int(rng.integers(0, 2**31))
    expected = diffusers_edit_latents(pipe, sampler, image, seed, steps, strength, monkeypatch)
    (actual,) = final_latents(pipeline, [GenerationRequest(prompt=PROMPT, seed=seed, sampler=sampler, steps=steps,
                                                           guidance_scale=7.5, init_image=image, strength=strength)])
    assert relative_error(expected, actual) <= LATENT_RTOL


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m"])
def test_imported_v_prediction_model_edits_as_diffusers_img2img_pipeline(stable_diffusion, rng, monkeypatch, sampler):
    pipe, pipeline = stable_diffusion("sd2")
    image, seed = random_image(rng), int(rng.integers(0, 2**31))
    expected = diffusers_edit_latents(pipe, sampler, image, seed, 6, 0.5, monkeypatch)
    (actual,) = final_latents(pipeline, [GenerationRequest(prompt=PROMPT, seed=seed, sampler=sampler, steps=6,
                                                           guidance_scale=7.5, init_image=image, strength=0.5)])
    assert relative_error(expected, actual) <= LATENT_RTOL


@pytest.mark.parametrize("engine_name", ["onnxruntime", "openvino"])
@pytest.mark.parametrize(("sampler", "steps", "strength"), [("ddim", 6, 0.5), ("dpmpp-2m", 7, 0.6)])
def test_fp32_engine_dir_of_an_import_edits_as_diffusers_img2img_pipeline(sd2_engines, rng, monkeypatch,
                                                                          engine_name, sampler, steps, strength):
    """The fp32 engine dir of the SD 2.x-like import (v-prediction, linear projections), on either engine, ends on
    diffusers' final latents within the relative error of 1e-4 that the engine-dir tests allow its graphs against
    the eager model (the torch engine itself is within 1e-5 of diffusers)."""
    pipe, pipeline = sd2_engines(engine_name)
    image, seed = random_image(rng), int(rng.integers(0, 2**31))
    expected = diffusers_edit_latents(pipe, sampler, image, seed, steps, strength, monkeypatch)
    (actual,) = final_latents(pipeline, [GenerationRequest(prompt=PROMPT, seed=seed, sampler=sampler, steps=steps,
                                                           guidance_scale=7.5, init_image=image, strength=strength)])
    error = relative_error(expected, torch.as_tensor(actual))
    assert error <= ENGINE_DIR_LATENT_RTOL, error
