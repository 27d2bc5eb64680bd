"""ldm-import: tiny random Stable Diffusion pipelines (diffusers folders) -> checkpoint dirs that sample like
diffusers' own StableDiffusionPipeline + DDIMScheduler on the same weights, prompt, guidance and initial latents."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_export.errors import ImportRefusedError
from ldm_export.sd_import import import_source, main
from ldm_runtime.noise import initial_noise
from tests.conftest import base_seed
from tests.ldm_export.tiny_sd import IMAGE_SIZE, LATENT_SIZE, PROMPTS, SD1_LIKE, SD2_LIKE, write_diffusers_folder

STEPS = 6
GUIDANCE = 7.5


def _kind_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{base_seed()}:{name}".encode()).digest()[:4], "little")


@pytest.fixture(scope="module", params=[SD1_LIKE, SD2_LIKE], ids=lambda sizes: sizes.name)
def imported(request, tmp_path_factory):
    """(the diffusers folder, the checkpoint dir ldm-import made of it, the sizes)."""
    sizes = request.param
    root = tmp_path_factory.mktemp(sizes.name)
    source = write_diffusers_folder(sizes, root / "diffusers", _kind_seed(sizes.name))
    return source, import_source(source, root / "checkpoint"), sizes


def _diffusers_pipeline(source: Path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(source), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_image(pipe, prompt: str, seed: int) -> np.ndarray:
    """(H, W, 3) float in [0, 1] from diffusers, started from the x_T that our pipeline draws for ``seed``."""
    latents = torch.from_numpy(initial_noise([seed], (4, LATENT_SIZE, LATENT_SIZE)))
    output = pipe(prompt, negative_prompt="", num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents,
                  output_type="np")
    return output.images[0]


def psnr_db(expected: np.ndarray, actual: np.ndarray) -> float:
    """PSNR of ``actual`` against ``expected``, both in [0, 1]."""
    mse = float(np.mean((expected.astype(np.float64) - actual.astype(np.float64)) ** 2))
    return 10.0 * np.log10(1.0 / max(mse, 1e-30))


def _relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def _our_images(checkpoint: Path, seeds: list[int], engine=None) -> list[np.ndarray]:
    from ldm_runtime.engines.torch_engine import TorchEngine
    from ldm_runtime.pipeline import GenerationRequest, Pipeline

    engine = engine or TorchEngine(checkpoint, device="cpu")
    requests = [GenerationRequest(prompt=prompt, seed=seed, sampler="ddim", steps=STEPS, guidance_scale=GUIDANCE)
                for prompt, seed in zip(PROMPTS, seeds)]
    return [image.astype(np.float64) / 255.0 for image in Pipeline(engine).generate(requests)]


def test_imported_model_json_carries_stable_diffusion_settings(imported):
    source, checkpoint, sizes = imported
    model = json.loads((checkpoint / "model.json").read_text())
    assert model["text_encoder"]["kind"] == "clip" and model["text_encoder"]["mask_padding"] is False
    assert model["text_encoder"]["hidden_act"] == sizes.hidden_act
    assert model["schedule"]["prediction_type"] == sizes.prediction_type
    assert model["schedule"]["beta_schedule"] == "scaled_linear"
    assert model["sampler"]["steps_offset"] == 1 and model["sampler"]["set_alpha_to_one"] is False
    assert model["latent_scale_factor"] == pytest.approx(sizes.scaling_factor)
    assert model["unet"]["use_linear_projection"] is sizes.use_linear_projection
    assert model["unet"]["upcast_attention"] is sizes.upcast_attention
    heads = sizes.attention_head_dim
    assert model["unet"]["level_heads"] == (list(heads) if isinstance(heads, tuple) else [])
    assert model["image_size"] == IMAGE_SIZE
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "autoencoder.safetensors", "model.json", "text_encoder.safetensors", "tokenizer", "train_state.json",
        "unet.safetensors"]


def test_imported_checkpoint_records_the_sha256_of_every_file_and_names_nothing_outside_itself(imported):
    source, checkpoint, _ = imported
    state = json.loads((checkpoint / "train_state.json").read_text())
    files = sorted(path.relative_to(checkpoint).as_posix() for path in checkpoint.rglob("*")
                   if path.is_file() and path.name != "train_state.json")
    assert state["stage"] == "import" and sorted(state["files"]) == files
    assert any(name.startswith("tokenizer/") for name in files)
    for name, digest in state["files"].items():
        assert hashlib.sha256((checkpoint / name).read_bytes()).hexdigest() == digest, name
    for path in checkpoint.rglob("*"):
        if path.is_file() and path.suffix != ".safetensors":
            text = path.read_text()
            assert str(source) not in text and str(source.parent) not in text, path


@pytest.mark.parametrize("name", ["unet.safetensors", "text_encoder.safetensors", "tokenizer/tokenizer.json"])
def test_imported_checkpoint_with_a_changed_file_is_refused_naming_it(imported, name, tmp_path, capsys, rng):
    _sd1_only(imported)
    import shutil

    from ldm_runtime.sample import main as sample_main

    copy = tmp_path / "checkpoint"
    shutil.copytree(imported[1], copy)
    data = bytearray((copy / name).read_bytes())
    data[int(rng.integers(len(data) // 2, len(data)))] ^= 0x01  # past the safetensors header: only a digest sees it
    (copy / name).write_bytes(bytes(data))
    code = sample_main(["--model", str(copy), PROMPTS[0], "--steps", "1", "--out", str(tmp_path / "image.png"),
                        "--engine", "torch", "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and name in lines[0] and "sha256" in lines[0], lines
    assert not (tmp_path / "image.png").exists()


def test_imported_networks_match_diffusers_fp32_relative_error_1e4(imported, rng):
    from ldm_export.source import load_checkpoint_to_export

    source, checkpoint, sizes = imported
    pipe = _diffusers_pipeline(source)
    ours = load_checkpoint_to_export(checkpoint)
    latents = torch.from_numpy(rng.standard_normal((2, 4, LATENT_SIZE, LATENT_SIZE)).astype(np.float32))
    timesteps = torch.from_numpy(rng.integers(0, 1000, 2))
    with torch.no_grad():
        input_ids = pipe.tokenizer(list(PROMPTS[:2]), padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids
        context, context_mask = ours.text_encoder.encode(list(PROMPTS[:2]))
        expected_context = pipe.text_encoder(input_ids)[0]
        assert bool(context_mask.all()), "Stable Diffusion attends to the padding tokens too"
        assert _relative_error(expected_context, context) <= 1e-4

        expected = pipe.unet(latents, timesteps, encoder_hidden_states=expected_context).sample
        actual = ours.unet(latents, timesteps, expected_context, context_mask)
        assert _relative_error(expected, actual) <= 1e-4

        expected_images = pipe.vae.decode(latents).sample
        assert _relative_error(expected_images, ours.autoencoder.decode(latents)) <= 1e-4


def test_imported_checkpoint_samples_like_diffusers_stable_diffusion_pipeline_40db(imported, rng):
    source, checkpoint, sizes = imported
    seeds = [int(seed) for seed in rng.integers(0, 2**31, len(PROMPTS))]
    pipe = _diffusers_pipeline(source)
    expected = [_diffusers_image(pipe, prompt, seed) for prompt, seed in zip(PROMPTS, seeds)]
    actual = _our_images(checkpoint, seeds)
    for prompt, want, got in zip(PROMPTS, expected, actual):
        assert want.shape == got.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert float(np.std(want)) > 1e-3, "a flat reference image proves nothing"
        assert psnr_db(want, got) >= 40.0, (prompt, psnr_db(want, got))


# --- refusals: one line, a non-zero exit, nothing written ------------------------------------------------------

def _sd1_only(imported) -> None:
    if imported[2] is not SD1_LIKE:
        pytest.skip("the folder's model does not matter here: one of the two is enough")


def _run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return code, lines[0]


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_import_refuses_pickled_file_without_opening_it(tmp_path, capsys, suffix):
    source = tmp_path / f"model{suffix}"
    source.write_bytes(b"not even a pickle: it must never be read")
    code, line = _run_cli(capsys, str(source), "--out", str(tmp_path / "out"))
    assert code == 2 and "never unpickles" in line and "safetensors" in line
    assert not (tmp_path / "out").exists()


def test_import_refuses_diffusers_folder_with_only_pickled_weights(imported, tmp_path, capsys):
    _sd1_only(imported)
    source, _, _ = imported
    copy = tmp_path / "pickled"
    import shutil

    shutil.copytree(source, copy)
    (copy / "unet" / "diffusion_pytorch_model.safetensors").rename(copy / "unet" / "diffusion_pytorch_model.bin")
    code, line = _run_cli(capsys, str(copy), "--out", str(tmp_path / "out"))
    assert code == 2 and "diffusion_pytorch_model.bin" in line and "never unpickles" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("pipeline_class", "named"), [
    ("StableDiffusionXLPipeline", "SDXL"), ("StableDiffusion3Pipeline", "Stable Diffusion 3"),
    ("FluxPipeline", "Flux"), ("StableDiffusionUpscalePipeline", "upscaler"),
])
def test_import_names_unsupported_model_kinds(tmp_path, capsys, pipeline_class, named):
    source = tmp_path / "model"
    source.mkdir()
    (source / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    code, line = _run_cli(capsys, str(source), "--out", str(tmp_path / "out"))
    assert code == 2 and named in line and pipeline_class in line


def test_import_names_unet_input_channels_that_are_neither_text_to_image_nor_inpainting(imported, tmp_path,
                                                                                          capsys):
    _sd1_only(imported)
    source, _, _ = imported
    import shutil

    copy = tmp_path / "five-channels"
    shutil.copytree(source, copy)
    config_path = copy / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["in_channels"] = 5
    config_path.write_text(json.dumps(config))
    code, line = _run_cli(capsys, str(copy), "--out", str(tmp_path / "out"))
    assert code == 2 and "unet.in_channels is 5; expected 4" in line and "or 9" in line
    assert not (tmp_path / "out").exists()


def test_import_names_lora_files(tmp_path, capsys):
    from safetensors.torch import save_file

    folder = tmp_path / "lora"
    folder.mkdir()
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2)}, str(folder / "pytorch_lora_weights.safetensors"))
    code, line = _run_cli(capsys, str(folder), "--out", str(tmp_path / "out"))
    assert code == 2 and "LoRA" in line


def test_import_names_tensor_whose_shape_does_not_fit_with_both_shapes(imported, tmp_path, capsys):
    _sd1_only(imported)
    from safetensors.torch import load_file, save_file

    source, _, _ = imported
    import shutil

    copy = tmp_path / "misshapen"
    shutil.copytree(source, copy)
    weights_path = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(weights_path))
    name = "conv_in.weight"
    original = tuple(weights[name].shape)
    weights[name] = torch.zeros(original[0] + 1, *original[1:])
    save_file(weights, str(weights_path))
    code, line = _run_cli(capsys, str(copy), "--out", str(tmp_path / "out"))
    assert code == 2 and name in line
    assert str((original[0] + 1, *original[1:])) in line and str(original) in line
    assert not (tmp_path / "out").exists()


def test_import_refuses_existing_out(imported, tmp_path, capsys):
    _sd1_only(imported)
    source, _, _ = imported
    (tmp_path / "out").mkdir()
    code, line = _run_cli(capsys, str(source), "--out", str(tmp_path / "out"))
    assert code == 2 and "already exists" in line


@pytest.mark.parametrize(("key", "named"), [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "LoRA"),
    ("conditioner.embedders.1.model.ln_final.weight", "SDXL"),
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "Stable Diffusion 3"),
    ("double_blocks.0.img_attn.qkv.weight", "Flux"),
])
def test_import_names_unsupported_single_file_kinds(tmp_path, capsys, key, named):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(2, 2)}, str(path))
    code, line = _run_cli(capsys, str(path), "--out", str(tmp_path / "out"))
    assert code == 2 and named in line




def test_ldm_import_cli_writes_a_checkpoint_that_ldm_sample_takes(imported, tmp_path, capsys):
    _sd1_only(imported)
    from ldm_runtime.sample import main as sample_main

    source, _, _ = imported
    assert main([str(source), "--out", str(tmp_path / "checkpoint")]) == 0
    assert "wrote" in capsys.readouterr().err
    out_png = tmp_path / "image.png"
    code = sample_main(["--model", str(tmp_path / "checkpoint"), PROMPTS[0], "--steps", "2", "--out", str(out_png),
                        "--engine", "torch", "--device", "cpu"])
    assert code in (0, None) and out_png.is_file()


# --- the exported engine dir (ldm-export) against diffusers -----------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """precision -> the engine dir ldm-export makes of the SD 2.x-like import, exported once per precision and
    shared by the engines that run it."""
    engine_dirs: dict[str, Path] = {}

    def engine_dir_for(checkpoint: Path, precision: str) -> Path:
        from ldm_export.engine_dir import ExportOptions, export_engine

        if precision not in engine_dirs:
            folder = tmp_path_factory.mktemp(f"engine-{precision}") / "engine"
            engine_dirs[precision] = export_engine(checkpoint, folder, ExportOptions(precision=precision))
        return engine_dirs[precision]

    return engine_dir_for


@pytest.mark.parametrize("engine_name", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_exported_import_samples_like_diffusers(imported, exported, rng, precision, engine_name):
    """Both engines of an engine dir: fp32 >= 40 dB and, for the SD 2.x-like model (v-prediction, fp32
    attention), fp16 >= 30 dB with no NaN; each takes the model's scheduler settings and unmasked attention."""
    from ldm_runtime.engines import load_engine

    source, checkpoint, sizes = imported
    if sizes is not SD2_LIKE:
        pytest.skip("exports are slow for CI: the SD 2.x-like model (v-prediction, linear projections, fp32 "
                    "attention, where half precision breaks first) stands for both")
    if engine_name == "openvino":
        pytest.importorskip("openvino")
    engine_dir = exported(checkpoint, precision)
    if precision == "fp16":
        _assert_attention_in_fp32(engine_dir / "unet.onnx")
    engine = load_engine(engine_dir, engine=engine_name, intra_op_threads=1)
    assert engine.info.name == engine_name
    assert engine.info.sampler["steps_offset"] == 1 and engine.info.sampler["set_alpha_to_one"] is False
    seeds = [int(seed) for seed in rng.integers(0, 2**31, len(PROMPTS))]
    pipe = _diffusers_pipeline(source)
    expected = [_diffusers_image(pipe, prompt, seed) for prompt, seed in zip(PROMPTS, seeds)]
    actual = _our_images(engine_dir, seeds, engine=engine)
    floor = 40.0 if precision == "fp32" else 30.0
    for prompt, want, got in zip(PROMPTS, expected, actual):
        assert np.isfinite(got).all()
        assert psnr_db(want, got) >= floor, (prompt, psnr_db(want, got))


def _assert_attention_in_fp32(path: Path) -> None:
    """Every attention of an fp16 UNet graph of an upcast_attention model multiplies in fp32 (q·kᵀ and ·v)."""
    import onnx
    from onnx import TensorProto

    from ldm_export.fp16 import attention_nodes

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {value.name: value.type.tensor_type.elem_type for value in model.graph.value_info}
    named = set(attention_nodes(model))
    products = [node for node in model.graph.node if node.name in named and node.op_type == "MatMul"]
    softmaxes = [node for node in model.graph.node if node.op_type == "Softmax"]
    assert softmaxes and len(products) == 2 * len(softmaxes), (len(products), len(softmaxes))
    assert all(types[node.output[0]] == TensorProto.FLOAT for node in products)
    assert any(types.get(node.output[0]) == TensorProto.FLOAT16 for node in model.graph.node
               if node.op_type == "Conv"), "the rest of the graph is fp16"
