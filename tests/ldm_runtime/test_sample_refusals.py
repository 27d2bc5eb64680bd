"""What a user can get wrong in ldm-sample, each one line and exit 2 (130 for Ctrl-C) with --out as it was: a
prompt that is not UTF-8, a guidance scale past the bound or images that come out not finite, a file in the way of
an image, an --init-image or --mask that is not a regular file, an empty --out."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ldm_runtime import pipeline as pipeline_module
from ldm_runtime import sample
from ldm_runtime.pipeline import GenerationRequest, Pipeline, RequestError
from test_pipeline import checkpoint_dir, engine  # noqa: F401 (session fixtures: the tiny checkpoint and its engine)


def run(argv: list, capsys) -> tuple[int, str]:
    code = sample.main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def run_interrupted(argv: list, capsys) -> tuple[int, str]:
    try:
        return run(argv, capsys)
    except KeyboardInterrupt:  # not let through to pytest, which would stop the whole session
        pytest.fail("KeyboardInterrupt escaped ldm-sample's main")


def no_loading(monkeypatch) -> None:
    monkeypatch.setattr(sample, "load_engine", lambda *args, **kwargs: pytest.fail("the model was loaded"))


# ---------------------------------------------------------------- prompts that are not UTF-8

@pytest.mark.parametrize("flags, message", [
    (["a \udcff red"], r"prompt is 'a \xff red', which is not valid UTF-8 text; expected UTF-8 text"),
    (["a red circle", "--negative-prompt", "it's \udcfe\\"],
     r"negative_prompt is 'it\'s \xfe\\', which is not valid UTF-8 text; expected UTF-8 text"),
])
def test_a_prompt_that_is_not_utf8_is_one_line_before_the_model_is_loaded(flags, message, tmp_path, capsys,
                                                                         monkeypatch):
    no_loading(monkeypatch)
    code, err = run(["--model", tmp_path, *flags, "--steps", 1, "--out", tmp_path / "out.png"], capsys)
    assert (code, err) == (2, f"ldm-sample: error: {message}\n")
    assert list(tmp_path.iterdir()) == []


def test_the_pipeline_refuses_a_lone_surrogate_in_either_prompt(engine):
    pipeline = Pipeline(engine)
    for fields, message in [
        ({"prompt": "\ud800 and \udcc3"}, r"prompt is '\ud800 and \xc3', which is not valid UTF-8 text"),
        ({"prompt": "a circle", "negative_prompt": "x\udc80"}, r"negative_prompt is 'x\x80', which is not valid"),
    ]:
        with pytest.raises(RequestError) as raised:
            pipeline.validate(GenerationRequest(seed=0, **fields))
        assert str(raised.value).startswith(message) and raised.value.field == next(reversed(fields))
    pipeline.validate(GenerationRequest(prompt="un cercle rouge \u00e9\U0001f534", seed=0))


# ---------------------------------------------------------------- Ctrl-C

def test_ctrl_c_while_sampling_is_one_line_exit_130_and_leaves_out_as_it_was(checkpoint_dir, engine, tmp_path,
                                                                             capsys, monkeypatch):
    monkeypatch.setattr(sample, "load_engine", lambda *args, **kwargs: engine)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "generate", interrupted)
    out = tmp_path / "out.png"
    out.write_bytes(b"an image from before")
    code, err = run_interrupted(["--model", checkpoint_dir, "a red circle", "--steps", 1, "--out", out], capsys)
    assert (code, err) == (130, f"ldm-sample: interrupted; nothing was written to {out}\n")
    assert os.listdir(tmp_path) == ["out.png"] and out.read_bytes() == b"an image from before"


def test_sigterm_while_sampling_is_taken_as_ctrl_c_and_its_handler_is_put_back(checkpoint_dir, tmp_path):
    # in a process of its own: a pytest-xdist worker's own way with signals is not what a user's shell gives
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import signal, sys
        from ldm_runtime import sample
        from ldm_runtime.pipeline import Pipeline
        Pipeline.generate = lambda *args, **kwargs: signal.raise_signal(signal.SIGTERM)
        before = signal.getsignal(signal.SIGTERM)
        code = sample.main(["--model", {str(checkpoint_dir)!r}, "a red circle", "--steps", "1", "--out", {str(out)!r},
                            "--engine", "torch"])
        print(code, signal.getsignal(signal.SIGTERM) is before)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.stdout.split() == ["130", "True"], (result.stdout, result.stderr)
    assert result.stderr.splitlines()[-1] == f"ldm-sample: interrupted; nothing was written to {out}"
    assert not out.exists()


def test_ctrl_c_while_writing_leaves_no_image_and_no_new_folder(checkpoint_dir, engine, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setattr(sample, "load_engine", lambda *args, **kwargs: engine)
    original = sample.png_bytes
    calls = []

    def interrupted_on_the_second(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(sample, "png_bytes", interrupted_on_the_second)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "000-seed0.png").write_bytes(b"an image from before")
    for out in (tmp_path / "new" / "out", existing):
        calls.clear()
        code, err = run_interrupted(["--model", checkpoint_dir, "one", "two", "--steps", 1, "--out", out], capsys)
        assert (code, err.splitlines()[-1]) == (130, f"ldm-sample: interrupted; nothing was written to {out}")
    assert os.listdir(tmp_path) == ["existing"] and os.listdir(existing) == ["000-seed0.png"]
    assert (existing / "000-seed0.png").read_bytes() == b"an image from before"


# ---------------------------------------------------------------- guidance and images that are not finite

def test_guidance_past_the_models_bound_is_one_line(checkpoint_dir, engine, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "load_engine", lambda *args, **kwargs: engine)
    monkeypatch.setattr(Pipeline, "generate", lambda *args, **kwargs: pytest.fail("sampling started"))
    code, err = run(["--model", checkpoint_dir, "a red circle", "--guidance", "1e30", "--out", tmp_path / "o.png"],
                    capsys)
    assert (code, err) == (2, "ldm-sample: error: guidance_scale is 1e+30; expected a number from 0 to 100\n")
    Pipeline(engine).validate(GenerationRequest(prompt="a red circle", seed=0, guidance_scale=100))
    assert list(tmp_path.iterdir()) == []


def test_images_that_are_not_finite_are_one_line_and_no_file(checkpoint_dir, engine, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setattr(sample, "load_engine", lambda *args, **kwargs: engine)
    decode = engine.decode
    monkeypatch.setattr(engine, "decode", lambda latents: decode(latents) * float("inf"))
    out = tmp_path / "out"
    code, err = run(["--model", checkpoint_dir, "a red circle", "a blue square", "--seed", 3, "--guidance", 7.5,
                     "--steps", 1, "--out", out], capsys)
    assert (code, err.splitlines()[-1]) == (
        2, "ldm-sample: error: prompt 'a red circle' with seed 3 decoded to pixels that are not finite (NaN or "
           "infinity), likely because guidance_scale 7.5 is too large; expected lower scales")
    assert list(tmp_path.iterdir()) == []


def test_images_that_are_not_finite_name_the_adapters_scales_too(engine):
    request = GenerationRequest(prompt="a", seed=1, guidance_scale=5.0, lora=(("style", 3.0), ("ink", -1.5)))
    error = pipeline_module._not_finite_error(request)
    assert error.field == "lora" and "likely because guidance_scale 5 or an adapter's scale (style:3, ink:-1.5) is " \
                                      "too large" in str(error)


# ---------------------------------------------------------------- files in the way of an image

def test_a_folder_in_the_way_of_an_image_is_refused_before_loading_and_replaces_nothing(tmp_path, capsys,
                                                                                      monkeypatch):
    no_loading(monkeypatch)
    out = tmp_path / "partial"
    (out / "001-seed1.png").mkdir(parents=True)
    (out / "000-seed0.png").write_bytes(b"an image from before")
    code, err = run(["--model", tmp_path, "a", "b", "--steps", 1, "--out", out], capsys)
    assert (code, err) == (2, f"ldm-sample: error: cannot write the images to {out}: {out / '001-seed1.png'} is a "
                              f"folder, not a regular file; expected nothing there or a file to replace (move it "
                              f"away)\n")
    assert (out / "000-seed0.png").read_bytes() == b"an image from before"


def test_a_folder_that_appears_while_sampling_replaces_no_earlier_image(tmp_path):
    out = tmp_path / "partial"
    out.mkdir()
    (out / "000-seed0.png").write_bytes(b"an image from before")
    (out / "002-seed2.png").symlink_to(out / "000-seed0.png")  # a symlink to a regular file may be replaced
    plan = sample.plan_output(str(out), [0, 1, 2])
    (out / "grid.png").mkdir()
    images = [np.zeros((8, 8, 3), np.uint8)] * 3
    with pytest.raises(sample.SampleError, match=f"{out / 'grid.png'} is a folder, not a regular file"):
        sample.write_outputs(plan, images, [{}] * 3)
    assert sorted(os.listdir(out)) == ["000-seed0.png", "002-seed2.png", "grid.png"]
    assert (out / "000-seed0.png").read_bytes() == b"an image from before"


# ---------------------------------------------------------------- --init-image and --mask that are no files

@pytest.mark.timeout(30)  # a read of the pipe would block for ever: fail instead
@pytest.mark.parametrize("flag", ["--init-image", "--mask"])
def test_a_named_pipe_as_an_edit_image_is_refused_without_reading_it(flag, checkpoint_dir, tmp_path, capsys,
                                                                     monkeypatch):
    no_loading(monkeypatch)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    image = tmp_path / "image.png"
    image.write_bytes(sample.png_bytes(np.zeros((16, 16, 3), np.uint8), {}))
    edit = ["--init-image", pipe] if flag == "--init-image" else ["--init-image", image, "--mask", pipe]
    code, err = run(["--model", checkpoint_dir, "a red circle", *edit, "--out", tmp_path / "out.png"], capsys)
    assert (code, err) == (2, f"ldm-sample: error: {flag} {pipe} is a named pipe, not a regular file; expected a "
                              f"PNG, JPEG or WebP image file\n")
    assert not (tmp_path / "out.png").exists()


# ---------------------------------------------------------------- --out

def test_an_empty_out_is_refused_and_writes_nothing_here(tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    monkeypatch.chdir(tmp_path)
    code, err = run(["--model", tmp_path / "model", "a red circle", "--out", ""], capsys)
    assert (code, err) == (2, "ldm-sample: error: --out is ''; expected a folder or, for a single prompt, a .png "
                              "file\n")
    assert list(tmp_path.iterdir()) == []
