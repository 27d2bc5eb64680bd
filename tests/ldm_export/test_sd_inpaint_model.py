"""Stable Diffusion's inpainting models (9-channel UNets) through ldm-import, the pipeline and ldm-export: tiny random
SD 1.x- and 2.x-like inpainting folders (diffusers' UNet2DConditionModel(in_channels=9) in the tiny pipelines of
tiny_sd.py) and their original-layout files import with unet.in_channels 9, and our images equal diffusers'
StableDiffusionInpaintPipeline on the same noise on the torch engine and on the fp32 onnxruntime and openvino
engine dirs (DeepCache's graphs included)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_export.sd_import import import_source, main
from ldm_runtime.errors import RequestError
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from tests.conftest import base_seed
from tests.ldm_export.tiny_sd import (IMAGE_SIZE, LATENT_SIZE, PROMPTS, SD1_LIKE, SD2_LIKE, TinySD, component_weights,
                                      feed_our_noise, relative_error, write_diffusers_folder, write_original_file)

GUIDANCE = 7.5
LATENT_RTOL = 1e-5  # final latents against diffusers', fp32 both ways (as the img2img and inpainting parity tests)
ENGINE_DIR_RTOL = 1e-4  # an fp32 engine dir's graphs are validated to 1e-4 against the eager model
# our sampler -> diffusers' scheduler class and the settings that make it that sampler
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
}


def write_inpainting_folder(sizes: TinySD, folder: Path, seed: int) -> Path:
    """``write_diffusers_folder``'s tiny pipeline with a random 9-channel UNet of the same sizes in its unet/ and
    model_index.json naming StableDiffusionInpaintPipeline, as the SD inpainting releases are laid out."""
    from diffusers import UNet2DConditionModel

    write_diffusers_folder(sizes, folder, seed)
    config = json.loads((folder / "unet" / "config.json").read_text())
    settings = {key: value for key, value in config.items() if not key.startswith("_")}
    torch.manual_seed(seed + 1)
    UNet2DConditionModel(**{**settings, "in_channels": 9}).save_pretrained(str(folder / "unet"),
                                                                            safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    return folder


def _kind_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{base_seed()}:inpaint:{name}".encode()).digest()[:4], "little")


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
    """kind ("sd1", "sd2") -> (the diffusers folder, its ldm-import), each made on first use."""
    made: dict[str, tuple[Path, Path]] = {}

    def model(kind: str) -> tuple[Path, Path]:
        if kind not in made:
            root = tmp_path_factory.mktemp(f"inpaint-{kind}")
            sizes = {"sd1": SD1_LIKE, "sd2": SD2_LIKE}[kind]
            source = write_inpainting_folder(sizes, root / "diffusers", _kind_seed(kind))
            made[kind] = source, import_source(source, root / "checkpoint")
        return made[kind]

    return model


def random_image(rng: np.random.Generator) -> np.ndarray:
    """A smooth random picture (a few colour blobs), (H, W, 3) uint8."""
    rows, columns = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3))
    for _ in range(3):
        centre, colour = rng.random(2), rng.random(3)
        image += colour * np.exp(-((rows - centre[0]) ** 2 + (columns - centre[1]) ** 2) * 8)[..., None]
    return np.round(255 * image / image.max()).astype(np.uint8)


def random_mask(rng: np.random.Generator) -> np.ndarray:
    """(H, W) uint8 grey levels: a random rectangle of 128..255 (repaint) on 0..127 (keep)."""
    mask = rng.integers(0, 128, (IMAGE_SIZE, IMAGE_SIZE)).astype(np.uint8)
    top, left = rng.integers(0, IMAGE_SIZE // 2, 2)
    bottom, right = rng.integers(top + 4, IMAGE_SIZE + 1), rng.integers(left + 4, IMAGE_SIZE + 1)
    mask[top:bottom, left:right] = rng.integers(128, 256, (bottom - top, right - left))
    return mask


def final_latents(pipeline: Pipeline, requests: list[GenerationRequest]) -> list:
    states = pipeline.start(requests)
    while not all(state.done for state in states):
        active = [k for k, state in enumerate(states) if not state.done]
        for k, state in zip(active, pipeline.advance([states[k] for k in active])):
            states[k] = state
    return [torch.as_tensor(np.asarray(state.latents)) if isinstance(state.latents, np.ndarray) else state.latents
            for state in states]


def diffusers_inpaint(source: Path, sampler: str, image: np.ndarray, mask: np.ndarray, seed: int, steps: int,
                      strength: float, monkeypatch) -> tuple[torch.Tensor, np.ndarray]:
    """(final latents, (H, W, 3) uint8 image) of diffusers' StableDiffusionInpaintPipeline on folder ``source``
    around the scheduler of ``sampler`` read from its folder, fed our noise (x_T and each stochastic step's, drawn
    for ``seed``) and the images' latents as the posterior mode (our encoder's) where diffusers draws a sample."""
    import diffusers

    feed_our_noise(monkeypatch, seed, (4, LATENT_SIZE, LATENT_SIZE))
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(str(source), safety_checker=None,
                                                                    requires_safety_checker=False)
    assert pipe.unet.config.in_channels == 9
    class_name, settings = DIFFUSERS_SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **settings)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(PROMPTS[0], image=Image.fromarray(image), mask_image=Image.fromarray(mask), height=IMAGE_SIZE,
                   width=IMAGE_SIZE, strength=strength, num_inference_steps=steps, guidance_scale=GUIDANCE,
                   negative_prompt="", output_type="latent").images
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample[0]
    pixels = torch.round(torch.clamp((decoded.double() + 1) * 127.5, 0, 255)).byte().permute(1, 2, 0).numpy()
    return latents, pixels


def _request(image: np.ndarray, mask: np.ndarray, seed: int, sampler: str, steps: int, strength: float,
             **fields) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPTS[0], seed=seed, sampler=sampler, steps=steps, guidance_scale=GUIDANCE,
                             init_image=image, mask=mask, strength=strength, **fields)


def assert_images_match(expected: np.ndarray, actual: np.ndarray, image: np.ndarray, mask: np.ndarray) -> None:
    """Inside the mask diffusers' pixels to one uint8 level (the rounding of float32 decodes that differ in their last
    bits); outside it the init image's own pixels, which ours keeps and diffusers' redraws."""
    repaint = mask >= 128
    assert np.abs(actual.astype(int) - expected.astype(int))[repaint].max() <= 1
    assert np.array_equal(actual[~repaint], image[~repaint])
    assert not np.array_equal(actual[repaint], image[repaint])


# --- ldm-import ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_inpainting_folder_imports_with_nine_unet_input_channels_and_diffusers_weights(inpainting, kind):
    from ldm_runtime.engines.torch_engine import TorchEngine

    source, checkpoint = inpainting(kind)
    model = json.loads((checkpoint / "model.json").read_text())
    assert model["unet"]["in_channels"] == 9 and model["autoencoder"]["latent_channels"] == 4
    assert model["unet"]["out_channels"] == 4
    assert TorchEngine(checkpoint, device="cpu").info.inpainting is True
    from safetensors.torch import load_file

    ours, theirs = load_file(str(checkpoint / "unet.safetensors")), component_weights(source, "unet")
    assert ours["conv_in.weight"].shape[1] == 9 and torch.equal(ours["conv_in.weight"], theirs["conv_in.weight"])


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_inpainting_single_file_imports_as_its_diffusers_folder(inpainting, kind, tmp_path, capsys):
    from safetensors.torch import load_file

    source, checkpoint = inpainting(kind)
    openclip = kind == "sd2"
    path = write_original_file(source, checkpoint, tmp_path / "inpainting.safetensors", openclip=openclip,
                               extra_text_layer=openclip)
    if kind == "sd1":  # diffusers' own single-file loader reads it back as an inpainting UNet: the layout is SD's
        from diffusers import StableDiffusionInpaintPipeline

        loaded = StableDiffusionInpaintPipeline.from_single_file(str(path), config=str(source), local_files_only=True,
                                                                 safety_checker=None, requires_safety_checker=False)
        assert loaded.unet.config.in_channels == 9
        assert torch.equal(loaded.unet.conv_in.weight, component_weights(source, "unet")["conv_in.weight"])
    prediction = ["--prediction-type", "v_prediction"] if openclip else []
    out = tmp_path / "from-file"
    code = main([str(path), "--out", str(out), "--tokenizer", str(source / "tokenizer"), *prediction,
                 "--image-size", str(IMAGE_SIZE)])
    assert code == 0, capsys.readouterr().err
    from_file, from_folder = (json.loads((folder / "model.json").read_text()) for folder in (out, checkpoint))
    assert from_file["unet"] == from_folder["unet"] and from_file["unet"]["in_channels"] == 9
    expected, actual = load_file(str(checkpoint / "unet.safetensors")), load_file(str(out / "unet.safetensors"))
    assert sorted(actual) == sorted(expected)
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


# --- the pipeline on the torch engine against diffusers ----------------------------------------------------------

@pytest.mark.parametrize(("kind", "sampler", "steps", "strength"), [
    ("sd1", "ddim", 6, 1.0), ("sd1", "euler-a", 5, 0.6), ("sd2", "ddim", 5, 0.7), ("sd2", "dpmpp-2m", 6, 1.0),
])
def test_inpainting_model_paints_as_diffusers_inpaint_pipeline(inpainting, rng, monkeypatch, kind, sampler, steps,
                                                               strength):
    from ldm_runtime.engines.torch_engine import TorchEngine

    source, checkpoint = inpainting(kind)
    image, mask, seed = random_image(rng), random_mask(rng), int(rng.integers(0, 2**31))
    expected_latents, expected_image = diffusers_inpaint(source, sampler, image, mask, seed, steps, strength,
                                                         monkeypatch)
    pipeline = Pipeline(TorchEngine(checkpoint, device="cpu"))
    request = _request(image, mask, seed, sampler, steps, strength)
    (latents,) = final_latents(pipeline, [request])
    assert relative_error(expected_latents, latents) <= LATENT_RTOL
    assert_images_match(expected_image, pipeline.generate([request])[0], image, mask)


def test_every_unet_call_takes_latents_mask_and_masked_image_latents_and_nothing_is_blended(inpainting, rng):
    from ldm_runtime.engines.torch_engine import TorchEngine

    engine = TorchEngine(inpainting("sd1")[1], device="cpu")
    calls: list[torch.Tensor] = []
    unet = engine.unet
    engine.unet = lambda latents, *rest: calls.append(latents) or unet(latents, *rest)
    pipeline = Pipeline(engine)
    image, mask = random_image(rng), random_mask(rng)
    request = _request(image, mask, int(rng.integers(0, 2**31)), "ddim", 3, 1.0)
    (state,) = pipeline.start([request])
    assert state.latent_mask is None and state.original_latents is None  # no latent blending for a 9-channel UNet
    repaint = mask >= 128
    pixels = torch.from_numpy(image.astype(np.float32) / 255 * 2 - 1).permute(2, 0, 1)[None]
    masked = engine.encode_images(pixels * torch.from_numpy(~repaint)) * engine.info.latent_scale_factor
    latent_mask = torch.from_numpy(repaint[::2, ::2].astype(np.float32))[None, None]
    while not state.done:
        before = state.latents
        (state,) = pipeline.advance([state])
        unconditional, conditional = calls[-1].chunk(2)
        for row in (unconditional, conditional):
            assert torch.equal(row[:, :4], before) and torch.equal(row[:, 4:5], latent_mask)
            assert torch.equal(row[:, 5:], masked)
    assert len(calls) == 3


def test_an_inpainting_image_alone_equals_it_in_a_batch_with_others(inpainting, rng):
    from ldm_runtime.engines.torch_engine import TorchEngine

    pipeline = Pipeline(TorchEngine(inpainting("sd2")[1], device="cpu"))
    requests = [_request(random_image(rng), random_mask(rng), int(rng.integers(0, 2**31)), sampler, steps, strength)
                for sampler, steps, strength in (("ddim", 4, 1.0), ("dpmpp-2m", 3, 0.5), ("ddim", 5, 0.8))]
    batched = pipeline.generate(requests)
    for request, image in zip(requests, batched):
        assert np.array_equal(pipeline.generate([request])[0], image)
    assert not np.array_equal(batched[0], batched[2])


@pytest.mark.parametrize(("fields", "missing"), [
    ({"init_image": None, "mask": None, "strength": None}, "init_image and mask are missing"),
    ({"mask": None}, "mask is missing"),
    ({"init_image": None, "strength": None}, "init_image is missing"),
])
def test_an_inpainting_model_refuses_a_request_without_image_or_mask_naming_what_is_missing(inpainting, rng, fields,
                                                                                             missing):
    from ldm_runtime.engines.torch_engine import TorchEngine

    pipeline = Pipeline(TorchEngine(inpainting("sd1")[1], device="cpu"))
    request = dataclasses.replace(_request(random_image(rng), random_mask(rng), 1, "ddim", 2, 1.0), **fields)
    with pytest.raises(RequestError) as raised:
        pipeline.start([request])
    message = str(raised.value)
    assert message.startswith(missing) and "inpainting model" in message and "\n" not in message
    assert raised.value.field == missing.split()[0]


def test_ldm_sample_without_init_image_on_an_inpainting_model_exits_2_in_one_line(inpainting, tmp_path, capsys):
    from ldm_runtime.sample import main as sample_main

    code = sample_main(["--model", str(inpainting("sd1")[1]), PROMPTS[0], "--steps", "2", "--engine", "torch",
                        "--device", "cpu", "--out", str(tmp_path / "image.png")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "init_image and mask are missing" in lines[0], lines
    assert not (tmp_path / "image.png").exists()


# --- ldm-export: the fp32 engine dirs --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(inpainting, tmp_path_factory) -> Path:
    """The fp32 engine dir ldm-export makes of the SD 2.x-like inpainting import (one export: the SD 2.x-like
    model, v-prediction and linear projections, stands for both)."""
    from ldm_export.engine_dir import ExportOptions, export_engine

    return export_engine(inpainting("sd2")[1], tmp_path_factory.mktemp("inpaint-engine") / "engine",
                         ExportOptions(precision="fp32"))


def test_exported_inpainting_graphs_take_nine_channels_and_passed_validation(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["model"]["inpainting"] is True
    for graph in ("unet", "unet_shallow"):
        latents = next(spec for spec in manifest["graphs"][graph]["inputs"] if spec["name"] == "latents")
        output = manifest["graphs"][graph]["outputs"][0]
        assert latents["shape"][1] == 9 and output["shape"][1] == 4, (graph, latents, output)
    validation = manifest["validation"]
    assert validation["passed"] is True and validation["sample"]["passed"] is True
    assert validation["graphs"]["unet"]["relative_error"] <= 1e-4
    assert validation["graphs"]["unet_shallow"]["relative_error"] <= 1e-4


@pytest.mark.parametrize("engine_name", ["onnxruntime", "openvino"])
def test_exported_inpainting_model_paints_as_diffusers_inpaint_pipeline(inpainting, exported, rng, monkeypatch,
                                                                        engine_name):
    from ldm_runtime.engines import load_engine

    if engine_name == "openvino":
        pytest.importorskip("openvino")
    source, _ = inpainting("sd2")
    engine = load_engine(exported, engine=engine_name, intra_op_threads=1)
    assert engine.info.name == engine_name and engine.info.inpainting is True
    image, mask, seed = random_image(rng), random_mask(rng), int(rng.integers(0, 2**31))
    expected_latents, expected_image = diffusers_inpaint(source, "ddim", image, mask, seed, 5, 0.8, monkeypatch)
    pipeline = Pipeline(engine)
    request = _request(image, mask, seed, "ddim", 5, 0.8)
    (latents,) = final_latents(pipeline, [request])
    assert relative_error(expected_latents, latents) <= ENGINE_DIR_RTOL
    assert_images_match(expected_image, pipeline.generate([request])[0], image, mask)


@pytest.mark.parametrize("engine_name", ["onnxruntime", "openvino"])
def test_exported_inpainting_model_caches_features_as_the_torch_engine_does(inpainting, exported, rng, engine_name):
    from ldm_runtime.engines import load_engine
    from ldm_runtime.engines.torch_engine import TorchEngine

    if engine_name == "openvino":
        pytest.importorskip("openvino")
    engine = load_engine(exported, engine=engine_name, intra_op_threads=1)
    assert engine.deep_cache
    request = _request(random_image(rng), random_mask(rng), int(rng.integers(0, 2**31)), "ddim", 6, 1.0,
                       cache_interval=3)
    (expected,) = final_latents(Pipeline(TorchEngine(inpainting("sd2")[1], device="cpu")), [request])
    (cached,) = final_latents(Pipeline(engine), [request])
    (whole,) = final_latents(Pipeline(engine), [dataclasses.replace(request, cache_interval=1)])
    assert relative_error(expected, cached) <= ENGINE_DIR_RTOL
    assert relative_error(whole, cached) > 10 * ENGINE_DIR_RTOL  # the shallow steps ran on cached features
