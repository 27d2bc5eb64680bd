"""ldm-import of one original-layout Stable Diffusion .safetensors file (SD 1.x CLIP, SD 2.x OpenCLIP, EMA).

The files are written here from tiny random diffusers pipelines; diffusers' own single-file loader reading them
back to the pipeline's weights is the oracle that they are laid out as real SD files are."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from ldm_export.diffusers_scheduler import IMPORTED_STEPS
from ldm_export.sd_import import import_source, main
from tests.conftest import base_seed
from tests.ldm_export.tiny_sd import (IMAGE_SIZE, SD1_LIKE, SD2_LIKE, component_weights, write_diffusers_folder,
                                      write_original_file)


@pytest.fixture(scope="module", params=[SD1_LIKE, SD2_LIKE], ids=lambda sizes: sizes.name)
def folder_import(request, tmp_path_factory):
    """(the diffusers folder, its ldm-import, the sizes)."""
    sizes = request.param
    root = tmp_path_factory.mktemp(f"single-{sizes.name}")
    seed = int.from_bytes(hashlib.sha256(f"{base_seed()}:single:{sizes.name}".encode()).digest()[:4], "little")
    source = write_diffusers_folder(sizes, root / "diffusers", seed)
    return source, import_source(source, root / "checkpoint"), sizes


def _args(sizes) -> list[str]:
    prediction = ["--prediction-type", sizes.prediction_type] if sizes is SD2_LIKE else []
    return [*prediction, "--image-size", str(IMAGE_SIZE)]


def test_written_original_file_loads_in_diffusers_single_file_loader_as_the_pipeline(folder_import, tmp_path):
    from diffusers import StableDiffusionPipeline

    source, checkpoint, sizes = folder_import
    path = write_original_file(source, checkpoint, tmp_path / "model.safetensors", openclip=sizes is SD2_LIKE,
                               extra_text_layer=False)
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(source), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    for component in ("unet", "vae", "text_encoder"):
        expected = component_weights(source, component)
        state = getattr(loaded, component).state_dict()
        for name, tensor in expected.items():
            assert torch.equal(state[name], tensor), (component, name)


def test_single_file_import_equals_the_diffusers_folder_import(folder_import, tmp_path, capsys):
    source, checkpoint, sizes = folder_import
    path = write_original_file(source, checkpoint, tmp_path / "model.safetensors", openclip=sizes is SD2_LIKE,
                               extra_text_layer=True)
    out = tmp_path / "from-file"
    code = main([str(path), "--out", str(out), "--tokenizer", str(source / "tokenizer"), *_args(sizes)])
    assert code == 0, capsys.readouterr().err
    from_file, from_folder = (json.loads((folder / "model.json").read_text()) for folder in (out, checkpoint))
    # a single file names no scheduler class: a request that names no sampler gets DDIM, its imported steps
    assert from_file.pop("default_sampler") == {"name": "ddim", "steps": IMPORTED_STEPS, "timestep_spacing": None,
                                                "steps_offset": None}
    assert from_folder.pop("default_sampler")["name"] == ("plms" if sizes is SD1_LIKE else "ddim")
    assert from_file == from_folder
    for stem in ("unet", "autoencoder", "text_encoder"):
        expected, actual = load_file(str(checkpoint / f"{stem}.safetensors")), load_file(str(out / f"{stem}.safetensors"))
        assert sorted(actual) == sorted(expected), stem
        for name in expected:
            assert torch.equal(actual[name], expected[name]), (stem, name)
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_single_file_import_takes_the_ema_weights_where_the_file_holds_both(folder_import, tmp_path, capsys):
    source, checkpoint, sizes = folder_import
    if sizes is not SD1_LIKE:
        pytest.skip("the EMA layout does not depend on the text encoder")
    path = write_original_file(source, checkpoint, tmp_path / "model.safetensors", openclip=False,
                               extra_text_layer=False, ema=True)
    out = tmp_path / "from-file"
    assert main([str(path), "--out", str(out), "--tokenizer", str(source / "tokenizer"), *_args(sizes)]) == 0
    assert "EMA" in capsys.readouterr().err
    expected, actual = load_file(str(checkpoint / "unet.safetensors")), load_file(str(out / "unet.safetensors"))
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_single_file_sd2_without_prediction_type_or_tokenizer_is_refused_in_one_line(folder_import, tmp_path,
                                                                                     capsys):
    source, checkpoint, sizes = folder_import
    if sizes is not SD2_LIKE:
        pytest.skip("only SD 2.x files leave the prediction type unsaid")
    path = write_original_file(source, checkpoint, tmp_path / "model.safetensors", openclip=True,
                               extra_text_layer=True)
    assert main([str(path), "--out", str(tmp_path / "a"), "--tokenizer", str(source / "tokenizer")]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert "--prediction-type" in line
    assert main([str(path), "--out", str(tmp_path / "b"), "--prediction-type", "v_prediction"]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert "--tokenizer" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
