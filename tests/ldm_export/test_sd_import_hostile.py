"""ldm-import on hostile sources: each broken, oversized or booby-trapped folder or file, made from a tiny random
Stable Diffusion, is refused by ``main`` with exit status 2 and one stderr line that names the bad value, quickly,
before any tensor data is read, and with nothing left at --out."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import ldm_export.sd_import
from ldm_export.sd_import import import_source, main
from ldm_export.sd_single_file import EMA_PREFIX, UNET_PREFIX, _ema_key
from ldm_runtime.safetensors_header import MAX_TENSORS
from tests.conftest import base_seed
from tests.ldm_export.tiny_sd import (IMAGE_SIZE, SD2_LIKE, component_weights, write_diffusers_folder,
                                      write_original_file)

MAX_LINE_CHARS = 400  # a path or two and a sentence
DELETE = object()


@pytest.fixture(scope="module")
def sd2(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny SD 2.x-like diffusers folder, the same model as one original-layout EMA file). SD 2.x's folder has
    a DDIM scheduler config, which imports without a notice, so a refusal is the only line on stderr."""
    root = tmp_path_factory.mktemp("hostile")
    folder = write_diffusers_folder(SD2_LIKE, root / "diffusers", seed=base_seed() ^ 0x5D2)
    checkpoint = import_source(folder, root / "checkpoint")
    single = write_original_file(folder, checkpoint, root / "model.safetensors", openclip=True,
                                 extra_text_layer=True, ema=True)
    return folder, single


def _refused(capsys, source: Path, out: Path, *args: str) -> str:
    """The one stderr line of ``ldm-import source --out out args``, which must exit 2 and leave nothing behind."""
    code = main([str(source), "--out", str(out), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, lines)
    line = lines[0]
    assert line.startswith("ldm-import: error: ") and len(line) <= MAX_LINE_CHARS, line
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return line


# --- a diffusers folder --------------------------------------------------------------------------------------------

def _set(relative: str, key: str, value: Any) -> Callable[[Path], Path]:
    def mutate(folder: Path) -> Path:
        path = folder / relative
        config = json.loads(path.read_text())
        if value is DELETE:
            del config[key]
        else:
            config[key] = value
        path.write_text(json.dumps(config))
        return folder
    return mutate


def _set_raw(relative: str, key: str, text: str) -> Callable[[Path], Path]:
    """Set ``key`` to the JSON text ``text`` as written (json.dumps could not write it)."""
    def mutate(folder: Path) -> Path:
        path = folder / relative
        config = json.loads(path.read_text())
        config[key] = "@"
        path.write_text(json.dumps(config).replace('"@"', text))
        return folder
    return mutate


def _fifo(relative: str) -> Callable[[Path], Path]:
    def mutate(folder: Path) -> Path:
        path = folder / relative
        path.unlink(missing_ok=True)
        os.mkfifo(path)
        return folder
    return mutate


def _tokenizer_link(folder: Path) -> Path:
    shutil.rmtree(folder / "tokenizer")
    (folder / "tokenizer").symlink_to(Path(json.__file__).parent.parent, target_is_directory=True)  # the stdlib
    return folder


def _tokenizer_crowded(folder: Path) -> Path:
    for index in range(40):
        (folder / "tokenizer" / f"extra-{index}.txt").write_text("x")
    return folder


def _source_fifo(folder: Path) -> Path:
    os.mkfifo(folder.parent / "source.safetensors")
    return folder.parent / "source.safetensors"


FOLDER_CASES = {
    "unet-zero-channels": (_set("unet/config.json", "block_out_channels", [0, 0]), ["block_out_channels", "[0, 0]"]),
    "unet-layers-1e6": (_set("unet/config.json", "layers_per_block", 10**6), ["layers_per_block", "1000000"]),
    "unet-layers-string": (_set("unet/config.json", "layers_per_block", "2"), ["layers_per_block", '"2"']),
    "unet-sample-size-1e9": (_set("unet/config.json", "sample_size", 10**9), ["sample_size", "1000000000"]),
    "unet-groups-null": (_set("unet/config.json", "norm_num_groups", None), ["norm_num_groups", "null"]),
    "unet-heads-fractional": (_set("unet/config.json", "attention_head_dim", [1.5, 2]), ["[1.5, 2]"]),
    "unet-blocks-string": (_set("unet/config.json", "down_block_types", "CrossAttnDownBlock2D"),
                           ["down_block_types", '"CrossAttnDownBlock2D"']),
    "unet-flag-string": (_set("unet/config.json", "use_linear_projection", "false"), ['"false"']),
    "unet-huge-integer": (_set_raw("unet/config.json", "layers_per_block", "7" * 5000), ["not valid JSON"]),
    "vae-latents-string": (_set("vae/config.json", "latent_channels", "4"), ["latent_channels", '"4"']),
    "vae-scale-nan": (_set("vae/config.json", "scaling_factor", float("nan")), ["scaling_factor", "NaN"]),
    "vae-zero-channels": (_set("vae/config.json", "block_out_channels", [0, 0]), ["block_out_channels", "[0, 0]"]),
    "text-layers-1e7": (_set("text_encoder/config.json", "num_hidden_layers", 10**7),
                        ["num_hidden_layers", "10000000"]),
    "text-no-hidden-size": (_set("text_encoder/config.json", "hidden_size", DELETE), ["hidden_size"]),
    "text-eps-string": (_set("text_encoder/config.json", "layer_norm_eps", "1e-5"), ['"1e-5"']),
    "text-act-number": (_set("text_encoder/config.json", "hidden_act", 5), ["hidden_act", "5"]),
    "scheduler-offset-1e9": (_set("scheduler/scheduler_config.json", "steps_offset", 10**9),
                             ["steps_offset", "1000000000"]),
    "scheduler-timesteps-null": (_set("scheduler/scheduler_config.json", "num_train_timesteps", None),
                                 ["num_train_timesteps", "null"]),
    "scheduler-flag-string": (_set("scheduler/scheduler_config.json", "set_alpha_to_one", "no"), ['"no"']),
    "scheduler-trained-betas": (_set("scheduler/scheduler_config.json", "trained_betas",
                                     [0.0001 + 0.00002 * step for step in range(1000)]),
                                ["trained_betas", "a list of 1000 values"]),
    "index-class-list": (_set("model_index.json", "_class_name", ["StableDiffusionPipeline"]), ["_class_name"]),
    "config-nested-100000": (_set_raw("unet/config.json", "sample_size", "[" * 100_000 + "]" * 100_000),
                             ["unet/config.json", "too deeply"]),
    "config-nested-20": (_set_raw("vae/config.json", "extra", "[" * 20 + "]" * 20), ["vae/config.json", "16 levels"]),
    "config-fifo": (_fifo("text_encoder/config.json"), ["text_encoder/config.json", "named pipe"]),
    "weights-fifo": (_fifo("unet/diffusion_pytorch_model.safetensors"), ["diffusion_pytorch_model", "named pipe"]),
    "tokenizer-link": (_tokenizer_link, ["tokenizer", "symbolic link"]),
    "tokenizer-crowded": (_tokenizer_crowded, ["tokenizer", "more than 32 entries"]),
    "tokenizer-fifo": (_fifo("tokenizer/vocab.json"), ["vocab.json", "named pipe"]),
    "source-fifo": (_source_fifo, ["source.safetensors", "not a regular file"]),
}


@pytest.mark.parametrize("case", FOLDER_CASES)
def test_ldm_import_refuses_hostile_diffusers_folder_in_one_line_naming_the_value(sd2, tmp_path, capsys, case):
    mutate, named = FOLDER_CASES[case]
    source = mutate(Path(shutil.copytree(sd2[0], tmp_path / "model", symlinks=True)))
    line = _refused(capsys, source, tmp_path / "out")
    assert all(part in line for part in named), (named, line)


def test_misfit_weights_in_a_folder_are_refused_from_the_header_alone(sd2, tmp_path, capsys, monkeypatch):
    folder = Path(shutil.copytree(sd2[0], tmp_path / "model"))
    weights_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(weights_file))
    weights["conv_in.weight"] = torch.zeros(7, *weights["conv_in.weight"].shape[1:])
    save_file(weights, str(weights_file))
    _forbid_reading_tensors(monkeypatch)
    line = _refused(capsys, folder, tmp_path / "out")
    assert "conv_in.weight" in line and "(7, 4, 3, 3)" in line


# --- one original-layout file --------------------------------------------------------------------------------------

def _forbid_reading_tensors(monkeypatch) -> None:
    import safetensors
    import safetensors.torch

    def fail(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr("ldm_export.imported_checkpoint.load_tensors", fail)
    monkeypatch.setattr(safetensors, "safe_open", fail)
    monkeypatch.setattr(safetensors.torch, "load_file", fail)


def _raw_file(path: Path, header: dict[str, Any] | str, data: bytes = b"", length: int | None = None) -> Path:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def _zero_size_tensors(count: int) -> str:
    entry = '"t%d": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}'
    return "{" + ", ".join(entry % index for index in range(count)) + "}"


def _changed(single: Path, path: Path, name: str, tensor: torch.Tensor) -> Path:
    tensors = load_file(str(single))
    tensors[name] = tensor
    save_file(tensors, str(path))
    return path


def _truncated(single: Path, path: Path) -> Path:
    path.write_bytes(single.read_bytes()[:-1000])
    return path


SINGLE_FILE_CASES = {
    "first-unet-weight-1d": (lambda single, path: _changed(single, path, UNET_PREFIX + "input_blocks.0.0.weight",
                                                           torch.zeros(8)), ["input_blocks.0.0.weight", "[8]"]),
    "first-unet-weight-integer": (lambda single, path: _changed(single, path, _ema_key("input_blocks.0.0.weight"),
                                                                torch.zeros(64, 4, 3, 3, dtype=torch.int64)),
                                  ["conv_in.weight", "int64"]),
    "600000-tensors": (lambda single, path: _raw_file(path, _zero_size_tensors(600_000)), ["header of"]),
    "too-many-tensors": (lambda single, path: _raw_file(path, _zero_size_tensors(MAX_TENSORS + 1)),
                         [f"{MAX_TENSORS + 1} tensors"]),
    "truncated": (_truncated, ["truncated"]),
    "header-past-the-end": (lambda single, path: _raw_file(path, "{}", length=10**12), ["1000000000000"]),
    "header-nested-100000": (lambda single, path: _raw_file(path, '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"),
                             ["too deeply"]),
    "header-not-json": (lambda single, path: _raw_file(path, "{'a': 1}"), ["not valid JSON"]),
    "unknown-dtype": (lambda single, path: _raw_file(path, {"a": {"dtype": "F128", "shape": [1],
                                                                  "data_offsets": [0, 16]}}, bytes(16)),
                      ['"F128"']),
    "overlapping-tensors": (lambda single, path: _raw_file(path, {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), ["'b'", "back to back"]),
    "repeated-name": (lambda single, path: _raw_file(
        path, '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
              '"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4)), ['"a"', "repeats"]),
    "huge-shape-no-bytes": (lambda single, path: _raw_file(path, {"a": {"dtype": "F32", "shape": [2**40, 2**40],
                                                                        "data_offsets": [0, 0]}}),
                            ["'a'", "needs"]),
}


@pytest.mark.parametrize("case", SINGLE_FILE_CASES)
def test_ldm_import_refuses_hostile_single_file_in_one_line_naming_the_value(sd2, tmp_path, capsys, case):
    write, named = SINGLE_FILE_CASES[case]
    path = write(sd2[1], tmp_path / "model.safetensors")
    line = _refused(capsys, path, tmp_path / "out", "--tokenizer", str(sd2[0] / "tokenizer"),
                    "--prediction-type", "v_prediction", "--image-size", str(IMAGE_SIZE))
    assert all(part in line for part in named), (named, line)


def test_single_file_image_size_out_of_range_is_refused_naming_it(sd2, tmp_path, capsys):
    line = _refused(capsys, sd2[1], tmp_path / "out", "--tokenizer", str(sd2[0] / "tokenizer"),
                    "--prediction-type", "v_prediction", "--image-size", str(10**9))
    assert "--image-size 1000000000" in line


def test_large_single_file_with_wrong_key_names_is_refused_from_its_header_alone(tmp_path, capsys, monkeypatch):
    """3 GiB of fp16 tensors under names no SD file has: refused from the header, no tensor read (the file is
    sparse: its data was never written)."""
    side = 1024
    header, offset = {}, 0
    for index in range(3):
        size = side * side * 512 * 2
        header[f"transformer.h.{index}.weight"] = {"dtype": "F16", "shape": [side, side, 512],
                                                  "data_offsets": [offset, offset + size]}
        offset += size
    path = _raw_file(tmp_path / "model.safetensors", header)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size + offset)
    _forbid_reading_tensors(monkeypatch)
    line = _refused(capsys, path, tmp_path / "out", "--tokenizer", str(tmp_path))
    assert str(path) in line and "not an original-layout Stable Diffusion" in line


def test_single_file_import_reads_only_the_tensors_it_writes_one_network_at_a_time(sd2, tmp_path, monkeypatch):
    """The file holds the EMA UNet and the raw one: only the EMA copy is read, and each network's tensors are
    read in a call of their own (so one network is in memory at a time)."""
    import ldm_export.imported_checkpoint as imported_checkpoint

    calls = []
    real = imported_checkpoint.load_tensors

    def recording(path, names):
        calls.append(list(names))
        return real(path, names)

    monkeypatch.setattr(imported_checkpoint, "load_tensors", recording)
    import_source(sd2[1], tmp_path / "out", tokenizer=sd2[0] / "tokenizer", prediction_type="v_prediction",
                  image_size=IMAGE_SIZE)
    assert len(calls) == 3
    unet, vae, text = calls
    assert unet and all(name.startswith(EMA_PREFIX) for name in unet)
    assert vae and all(name.startswith("first_stage_model.") for name in vae)
    assert text and all(name.startswith("cond_stage_model.model.") for name in text)
    assert not any(".resblocks.2." in name or "text_projection" in name for name in text), "SD 2 drops the last block"
    written, expected = load_file(str(tmp_path / "out" / "unet.safetensors")), component_weights(sd2[0], "unet")
    assert sorted(written) == sorted(expected)
    assert all(torch.equal(written[name], expected[name]) for name in expected)


# --- flags a diffusers folder does not take, a tokenizer that does not load ----------------------------------------

@pytest.mark.parametrize("flags", [["--prediction-type", "v_prediction"], ["--image-size", "33"],
                                   ["--tokenizer", "nope"]], ids=lambda flags: flags[0])
def test_single_file_flags_on_a_diffusers_folder_are_refused_in_one_line(sd2, tmp_path, capsys, flags):
    line = _refused(capsys, sd2[0], tmp_path / "out", *flags)
    assert f"{sd2[0]} is a diffusers folder" in line and f"expected no {flags[0]}" in line, line
    assert "single .safetensors files only" in line


def _bpe_that_does_not_load(folder: Path) -> None:
    (folder / "vocab.json").write_text("{}")
    (folder / "merges.txt").write_text("#version: 0.2\nno such merge\n")


@pytest.mark.parametrize("fill", [lambda folder: None, _bpe_that_does_not_load], ids=["empty", "unloadable"])
def test_a_tokenizer_folder_that_does_not_load_is_refused_in_one_whole_sentence(sd2, tmp_path, capsys, fill):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    fill(folder)
    line = _refused(capsys, sd2[1], tmp_path / "out", "--tokenizer", str(folder), "--prediction-type", "v_prediction",
                    "--image-size", str(IMAGE_SIZE))
    assert str(folder) in line and line.endswith("; expected the model's CLIP tokenizer folder (vocab.json and "
                                                 "merges.txt, or tokenizer.json)"), line


# --- an --out that cannot be written, a full disk, the output's permissions ----------------------------------------

@pytest.mark.parametrize("case", ["under_a_file", "unwritable"])
def test_an_out_that_cannot_be_written_is_one_line_before_any_work(sd2, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(ldm_export.sd_import, "import_diffusers_folder", lambda *args: pytest.fail("work started"))
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    out = blocker / "out"
    if case == "unwritable":  # root ignores permission bits: /proc is not writable even for root
        locked = tmp_path / "read_only"
        locked.mkdir(mode=0o500)
        out = locked / "out" if os.geteuid() != 0 else Path("/proc/ldm-no-such-process/out")
    code = main([str(sd2[0]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"ldm-import: error: --out's folder {out.parent} ") and err.count("\n") == 1
    assert blocker.read_text() == "mine" and not os.path.lexists(out)


def _out_of_space_halfway(tensors, filename, metadata=None):
    """safetensors' save_file on a disk that fills up: part of the file lands, then its error."""
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"\x08\x07" * 1000)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_is_one_line_and_leaves_nothing_at_out(sd2, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _out_of_space_halfway)
    out = tmp_path / "out"
    line = _refused(capsys, sd2[0], out)
    assert line == (f"ldm-import: error: no space left on device writing {out} (nothing was written to {out}: free "
                    f"space and import again)")


def _modes(folder: Path) -> dict[str, int]:
    return {path.relative_to(folder).as_posix(): stat.S_IMODE(path.lstat().st_mode)
            for path in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("source, umask", [("folder", 0o022), ("single file", 0o002)],
                         ids=["folder, umask 022", "single file, umask 002"])
def test_the_import_has_the_permissions_the_umask_gives_a_new_folder_and_file(sd2, tmp_path, source, umask):
    single = {"tokenizer": sd2[0] / "tokenizer", "prediction_type": "v_prediction", "image_size": IMAGE_SIZE}
    previous = os.umask(umask)
    try:
        out = (import_source(sd2[0], tmp_path / "out") if source == "folder" else
               import_source(sd2[1], tmp_path / "out", **single))
    finally:
        os.umask(previous)
    modes = _modes(out)
    assert "unet.safetensors" in modes and "tokenizer" in modes
    assert modes == {name: (0o777 if (out / name).is_dir() else 0o666) & ~umask for name in modes}
