"""ldm-sample end to end on a tiny random-weight checkpoint: the PNGs, their metadata, the grid, and one line
with exit status 2 for every kind of bad input, with nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_runtime import sample
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from test_pipeline import checkpoint_dir, engine  # noqa: F401 (session fixtures: the tiny checkpoint and its engine)


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = sample.main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_writes_one_png_per_prompt_and_a_grid_with_the_settings_in_a_text_chunk(checkpoint_dir, engine, tmp_path,
                                                                                 capsys):
    prompts = ["a red circle", "a blue square", "a green triangle"]
    out = tmp_path / "new" / "samples"
    code, err = run(["--model", checkpoint_dir, *prompts, "--seed", 11, "--sampler", "ddim", "--steps", 3,
                     "--guidance", 3.5, "--eta", 0.25, "--negative-prompt", "blurry", "--out", out], capsys)
    assert code == 0, err
    names = ["000-seed11.png", "001-seed12.png", "002-seed13.png"]
    assert sorted(path.name for path in out.iterdir()) == sorted(names + ["grid.png"])
    requests = [GenerationRequest(prompt=prompt, seed=11 + i, sampler="ddim", steps=3, guidance_scale=3.5, eta=0.25,
                                  negative_prompt="blurry") for i, prompt in enumerate(prompts)]
    expected = Pipeline(engine).generate(requests)
    for name, request, image in zip(names, requests, expected):
        assert np.array_equal(pixels(out / name), image)
        settings = json.loads(Image.open(out / name).text["parameters"])
        assert settings["prompt"] == request.prompt and settings["seed"] == request.seed
        assert (settings["steps"], settings["guidance_scale"], settings["eta"]) == (3, 3.5, 0.25)
        assert settings["negative_prompt"] == "blurry" and settings["engine"] == "torch"
    grid = pixels(out / "grid.png")
    assert grid.shape == (2 + 2 * 18, 2 + 2 * 18, 3)  # 3 images of 16 px: 2 x 2 tiles with 2 px gaps
    assert np.array_equal(grid[20:36, 2:18], expected[2])
    assert [json.loads(Image.open(out / "grid.png").text["parameters"])[i]["seed"] for i in range(3)] == [11, 12, 13]
    assert "sampling" in err and err.strip().splitlines()[-1] == f"ldm-sample: wrote 4 PNG files to {out}"


def test_a_single_prompt_goes_to_the_png_path_given_and_twice_gives_identical_bytes(checkpoint_dir, tmp_path,
                                                                                    capsys):
    paths = [tmp_path / "first.png", tmp_path / "second.png"]
    for path in paths:
        code, err = run(["--model", checkpoint_dir, "a red circle", "--seed", 5, "--sampler", "ddim", "--steps", 2,
                         "--eta", 1, "--height", 12, "--width", 20, "--out", path], capsys)
        assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["first.png", "second.png"]
    assert pixels(paths[0]).shape == (12, 20, 3)
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_help_says_prompt_i_uses_seed_plus_i(capsys):
    with pytest.raises(SystemExit) as exited:
        sample.main(["--help"])
    assert exited.value.code == 0
    assert "prompt i uses seed + i" in capsys.readouterr().out


REQUEST_ERRORS = [
    (["--steps", "0"], "steps is 0; expected an integer from 1 to 999"),
    (["--steps", "5000"], "steps is 5000"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--guidance", "-2"], "guidance_scale is -2.0; expected a number from 0 to 100"),
    (["--guidance", "100.5"], "guidance_scale is 100.5; expected a number from 0 to 100"),
    (["--guidance", "nan"], "argument --guidance: 'nan' is not a finite number"),
    (["--eta", "inf"], "argument --eta: 'inf' is not a finite number"),
    (["--eta", "1.5"], "eta is 1.5; expected a number from 0 to 1"),
    (["--seed", "-1"], "seed is -1"),
    (["--seed", str(2**63)], f"seed is {2**63}"),
    (["--height", "18"], "height is 18; expected a multiple of 4 from 4 to 32"),
    (["--width", "4096"], "width is 4096"),
    (["--batch-size", "0"], "batch_size is 0"),
    (["--engine", "tensorflow"], "argument --engine: invalid choice: 'tensorflow'"),
]


@pytest.mark.parametrize("extra, message", REQUEST_ERRORS)
def test_bad_settings_get_one_line_exit_2_and_write_nothing(checkpoint_dir, engine, tmp_path, capsys, monkeypatch,
                                                            extra, message):
    monkeypatch.setattr(sample, "load_engine", lambda *args, **kwargs: engine)  # the shared engine: no reload
    code, err = run(["--model", checkpoint_dir, "a red circle", "--out", tmp_path / "out", *extra], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ldm-sample: error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_empty_prompt_is_named_in_the_error(checkpoint_dir, engine, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "load_engine", lambda *args, **kwargs: engine)
    code, err = run(["--model", checkpoint_dir, "a red circle", "", "--out", tmp_path / "out"], capsys)
    assert (code, err) == (2, "ldm-sample: error: prompt is ''; expected a non-empty string\n")
    assert list(tmp_path.iterdir()) == []


def test_bad_model_folders_and_devices_get_one_line_exit_2(checkpoint_dir, tmp_path, capsys):
    autoencoder_only = tmp_path / "autoencoder_only"
    autoencoder_only.mkdir()
    for name in ("model.json", "autoencoder.safetensors"):
        (autoencoder_only / name).write_bytes((checkpoint_dir / name).read_bytes())
    (tmp_path / "empty").mkdir()
    cases = [
        (["--model", tmp_path / "missing"], "does not exist"),
        (["--model", tmp_path / "empty"], "has neither model.json nor manifest.json"),
        (["--model", autoencoder_only], "has no unet.safetensors"),
        (["--model", checkpoint_dir, "--engine", "onnxruntime"], "has no manifest.json"),
        (["--model", checkpoint_dir, "--engine", "tensorrt"], "has no manifest.json; the tensorrt engine runs an "
                                                               "engine dir"),
        (["--model", checkpoint_dir, "--device", "tpu"], "device 'tpu' is not valid"),
        (["--model", checkpoint_dir, "--device", "cuda:99"], "device 'cuda:99' is not available"),
        ([], "the following arguments are required: --model"),
    ]
    for extra, message in cases:
        code, err = run([*extra, "a red circle", "--out", tmp_path / "out"], capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("ldm-sample: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_outputs_that_cannot_be_written_are_refused_before_sampling(checkpoint_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "load_engine", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cases = [
        (["one", "two", "--out", tmp_path / "two.png"], "is a .png file but 2 prompts make 2 images"),
        (["one", "--out", blocker / "samples"], f"{blocker} is a file, not a folder"),
        (["one", "two", "--out", blocker], f"{blocker} is a file, not a folder"),
    ]
    for extra, message in cases:
        code, err = run(["--model", checkpoint_dir, *extra], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_a_failed_write_leaves_no_image_and_no_new_folder(checkpoint_dir, engine, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "load_engine", lambda *args, **kwargs: engine)
    original_save = Image.Image.save
    saved = []

    def save_once_then_fail(image, path, *args, **kwargs):
        if saved:
            raise OSError(28, "No space left on device")
        saved.append(path)
        original_save(image, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_once_then_fail)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("a file from before")
    for out in (tmp_path / "new" / "out", existing):
        saved.clear()
        code, err = run(["--model", checkpoint_dir, "one", "two", "--steps", 1, "--out", out], capsys)
        assert code == 2 and err.strip().splitlines()[-1].endswith("No space left on device")
        assert len(saved) == 1
    assert sorted(os.listdir(tmp_path)) == ["existing"] and os.listdir(existing) == ["keep.txt"]
