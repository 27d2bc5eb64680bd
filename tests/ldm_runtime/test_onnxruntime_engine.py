"""The onnxruntime engine on the tiny checkpoint's fp32 export: it matches the eager torch engine call by call,
tokenizes as training did, samples without importing torch, and refuses a damaged engine dir and batches or
sizes outside the exported ranges."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ldm_runtime.engines import load_engine
from ldm_runtime.engines.onnxruntime_engine import ALLOW_SPINNING, OnnxRuntimeEngine
from ldm_runtime.manifest import EngineDirError, OutOfRangeError, check_tensorrt_plans, load_manifest
from tests.ldm_export.tiny_checkpoint import TINY_CONFIG, shared_tiny_engine
from tests.ldm_runtime.file_damage import MISMATCHED_GRAPH_ENTRIES, copy_with_manifest_edited

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "two blue squares on a green background in the top left corner of the image", ""]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    checkpoint, engine_dir, code, output = shared_tiny_engine(tmp_path_factory, "fp32")
    assert code == 0, output
    return checkpoint, engine_dir


@pytest.fixture(scope="module")
def engine(exported):
    return OnnxRuntimeEngine(exported[1], intra_op_threads=1)


@pytest.fixture(scope="module")
def torch_engine(exported):
    from ldm_runtime.engines.torch_engine import TorchEngine

    return TorchEngine(exported[0], device="cpu", unet_chunk_size=None)


def relative_error(actual, expected) -> float:
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(actual, dtype=np.float64) - expected) / np.linalg.norm(expected))


def test_engine_info_comes_from_the_manifest(engine):
    info = engine.info
    assert (info.name, info.latent_channels, info.latent_factor) == ("onnxruntime", 4, 2)
    assert (info.image_size, info.min_image_size, info.max_image_size, info.image_size_multiple) == (16, 16, 32, 4)
    assert info.max_batch_size == 8 and info.text_max_length == TINY_CONFIG.text_encoder.max_length
    assert info.latent_scale_factor == TINY_CONFIG.latent_scale_factor
    assert info.schedule["beta_schedule"] == "scaled_linear"


def test_sessions_threads_sleep_between_calls_unless_asked_to_spin(engine, exported):
    # every graph is a session with its own threads: spinning ones hold the cores the next graph's need
    assert {name: session.get_session_options().get_session_config_entry(ALLOW_SPINNING)
            for name, session in engine.sessions.items()} == dict.fromkeys(engine.sessions, "0")
    spinning = OnnxRuntimeEngine(exported[1], intra_op_threads=1, spinning=True)
    assert {session.get_session_options().get_session_config_entry(ALLOW_SPINNING)
            for session in spinning.sessions.values()} == {"1"}


def test_tokenizer_matches_the_training_tokenizer(engine, torch_engine):
    input_ids, attention_mask = engine.tokenize(PROMPTS)
    expected_ids, expected_mask = torch_engine.text_encoder.tokenize(PROMPTS)
    np.testing.assert_array_equal(input_ids, expected_ids.numpy())
    np.testing.assert_array_equal(attention_mask, expected_mask.numpy())
    assert attention_mask[1].all() and not attention_mask[0].all()  # one prompt truncated, one padded


def test_every_call_matches_the_torch_engine(engine, torch_engine, rng):
    import torch

    context, mask = engine.encode_text(PROMPTS[:2])
    expected_context, expected_mask = torch_engine.encode_text(PROMPTS[:2])
    assert relative_error(context, expected_context) < 1e-4
    np.testing.assert_array_equal(mask, expected_mask.numpy())

    latents = rng.standard_normal((2, 4, 8, 12)).astype(np.float32)
    timesteps = np.array([17, 901])
    noise_pred = engine.unet(latents, timesteps, context, mask)
    expected = torch_engine.unet(torch.from_numpy(latents), timesteps, expected_context, expected_mask)
    assert noise_pred.dtype == np.float32 and relative_error(noise_pred, expected) < 1e-4

    images = engine.decode(latents)
    assert images.shape == (2, 3, 16, 24)
    assert relative_error(images, torch_engine.decode(torch.from_numpy(latents))) < 1e-4
    encoded = engine.encode_images(np.clip(images, -1, 1))
    assert relative_error(encoded, torch_engine.encode_images(torch.from_numpy(np.clip(images, -1, 1)))) < 1e-4


def test_rows_at_different_timesteps_share_one_unet_call(engine, rng):
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context, mask = engine.encode_text(PROMPTS[:2])
    together = engine.unet(latents, np.array([5, 700]), context, mask)
    for row, timestep in enumerate((5, 700)):
        alone = engine.unet(latents[row:row + 1], np.array([timestep]), context[row:row + 1], mask[row:row + 1])
        assert relative_error(together[row:row + 1], alone) < 1e-5


def test_engine_samples_without_importing_torch(exported):
    script = (
        "import sys\n"
        "from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine\n"
        "from ldm_runtime.pipeline import GenerationRequest, Pipeline\n"
        f"engine = OnnxRuntimeEngine({str(exported[1])!r}, intra_op_threads=1)\n"
        "images = Pipeline(engine).generate([GenerationRequest(prompt='a red circle', seed=3, steps=3),\n"
        "                                    GenerationRequest(prompt='a blue square', seed=4, steps=3)])\n"
        "assert [image.shape for image in images] == [(16, 16, 3)] * 2, [image.shape for image in images]\n"
        "assert images[0].std() > 0\n"
        "print('torch imported:', 'torch' in sys.modules, 'ldm_train imported:', 'ldm_train' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "torch imported: False ldm_train imported: False" in result.stdout


def test_load_engine_opens_an_engine_dir_with_onnxruntime(exported):
    assert isinstance(load_engine(exported[1], engine="onnxruntime", device="cpu", intra_op_threads=1),
                      OnnxRuntimeEngine)


def test_graph_whose_sha256_differs_is_refused_naming_it(exported, tmp_path):
    damaged = tmp_path / "engine"
    shutil.copytree(exported[1], damaged)
    data = bytearray((damaged / "vae_decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "vae_decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(EngineDirError, match="vae_decoder.onnx does not match the sha256"):
        OnnxRuntimeEngine(damaged)


def test_missing_graph_or_manifest_is_refused(exported, tmp_path):
    incomplete = tmp_path / "engine"
    shutil.copytree(exported[1], incomplete)
    (incomplete / "unet.onnx").unlink()
    with pytest.raises(EngineDirError, match="unet.onnx is missing"):
        OnnxRuntimeEngine(incomplete)
    (incomplete / "manifest.json").unlink()
    with pytest.raises(EngineDirError, match="has no manifest.json"):
        OnnxRuntimeEngine(incomplete)


@pytest.mark.parametrize("edit, message", [(edit, message) for _, edit, message in MISMATCHED_GRAPH_ENTRIES],
                         ids=[name for name, _, _ in MISMATCHED_GRAPH_ENTRIES])
def test_a_graph_entry_that_does_not_describe_its_graph_is_refused_as_the_engine_loads(edit, message, exported,
                                                                                      tmp_path):
    edited = copy_with_manifest_edited(exported[1], tmp_path / "engine", edit)
    with pytest.raises(EngineDirError, match=message) as error:
        OnnxRuntimeEngine(edited, intra_op_threads=1)
    assert "\n" not in str(error.value)


def test_a_graph_entry_that_does_not_describe_its_graph_is_one_line_from_ldm_sample(exported, tmp_path, capsys):
    from ldm_runtime import sample

    _, edit, message = MISMATCHED_GRAPH_ENTRIES[0]
    edited = copy_with_manifest_edited(exported[1], tmp_path / "engine", edit)
    code = sample.main(["--model", str(edited), "--engine", "onnxruntime", "a red circle", "--steps", "2", "--out",
                        str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("ldm-sample: error: "), err
    assert re.search(message, err) and not (tmp_path / "out").exists(), err


def test_manifest_of_another_format_version_is_refused(exported, tmp_path):
    other = tmp_path / "engine"
    shutil.copytree(exported[1], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["format_version"] = 99
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineDirError, match="format_version 99"):
        load_manifest(other)


def test_batch_outside_the_exported_range_is_refused_naming_it(engine, rng):
    latents = rng.standard_normal((9, 4, 8, 8)).astype(np.float32)
    context = np.zeros((9, TINY_CONFIG.text_encoder.max_length, 32), dtype=np.float32)
    mask = np.ones(context.shape[:2], dtype=bool)
    with pytest.raises(OutOfRangeError, match=r"UNet batch size 9 is outside the engine's exported range 1\.\.8"):
        engine.unet(latents, np.full(9, 10), context, mask)
    with pytest.raises(OutOfRangeError, match=r"1\.\.8"):
        engine.encode_text(["a red circle"] * 9)


@pytest.mark.parametrize("height, width", [(40, 16), (12, 16), (16, 18)])
def test_image_size_outside_the_exported_range_is_refused_naming_it(engine, height, width, rng):
    images = rng.uniform(-1, 1, (1, 3, height, width)).astype(np.float32)
    with pytest.raises(OutOfRangeError, match=rf"{height}x{width} .* 16\.\.32 in multiples of 4 px"):
        engine.encode_images(images)
    latents = rng.standard_normal((1, 4, height // 2, width // 2)).astype(np.float32)
    with pytest.raises(OutOfRangeError, match="16..32 in multiples of 4"):
        engine.decode(latents)


def test_bad_engine_options_are_refused(exported):
    with pytest.raises(ValueError, match="graph_optimization_level 'fastest'"):
        OnnxRuntimeEngine(exported[1], graph_optimization_level="fastest")
    with pytest.raises(ValueError, match="intra_op_threads"):
        OnnxRuntimeEngine(exported[1], intra_op_threads=0)
    with pytest.raises(ValueError, match="device 'tpu'"):
        OnnxRuntimeEngine(exported[1], device="tpu")


def test_tensorrt_plans_of_another_gpu_or_version_are_refused(exported):
    manifest = load_manifest(exported[1])
    with pytest.raises(EngineDirError, match="holds no TensorRT plans"):
        check_tensorrt_plans(manifest, "10.3.0", "NVIDIA H100 80GB HBM3", "9.0")
    built = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
             "plans": {}}
    with_plans = type(manifest)(**{**manifest.__dict__, "tensorrt": built})
    check_tensorrt_plans(with_plans, "10.3.0", "NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(EngineDirError, match="built for gpu name 'NVIDIA H100 80GB HBM3'.*--rebuild-plans"):
        check_tensorrt_plans(with_plans, "10.3.0", "NVIDIA A100-SXM4-80GB", "8.0")
    with pytest.raises(EngineDirError, match="tensorrt version '10.3.0' but this machine has '10.7.0'"):
        check_tensorrt_plans(with_plans, "10.7.0", "NVIDIA H100 80GB HBM3", "9.0")
