"""ldm-sample bounds what its flags multiply (images x height x width, x steps): a flag past what any model allows
is one line before the model is loaded; images past the pixels one run holds are one line before any sampling."""

from __future__ import annotations

import pytest

from ldm_runtime import sample
from ldm_runtime.pipeline import Pipeline
from test_pipeline import checkpoint_dir, engine  # noqa: F401 (session fixtures: the tiny checkpoint and its engine)


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = sample.main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


FLAGS_PAST_ANY_MODEL = [
    (["--steps", str(10**9)], "--steps is 1000000000, more than any model allows (10000); expected a value within "
                              "the model's own range"),
    (["--height", str(2**31)], "--height is 2147483648, more than any model allows (8192); expected a value within "
                               "the model's own range"),
    (["--width", "8193"], "--width is 8193, more than any model allows (8192); expected a value within the model's "
                          "own range"),
    (["another prompt"] * 999, "1000 prompts make 1000 images; expected at most 999 in one run"),
]


@pytest.mark.parametrize("extra, message", FLAGS_PAST_ANY_MODEL, ids=lambda value: str(value)[:40])
def test_a_flag_past_what_any_model_allows_is_one_line_before_the_model_is_loaded(extra, message, tmp_path, capsys,
                                                                                   monkeypatch):
    monkeypatch.setattr(sample, "load_engine", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    code, err = run(["--model", tmp_path, "--out", tmp_path / "out", *extra, "a red circle"], capsys)
    assert (code, err) == (2, f"ldm-sample: error: {message}\n")
    assert list(tmp_path.iterdir()) == []


def test_the_largest_flags_any_model_allows_pass_the_early_check():
    args = sample.build_parser().parse_args(["--model", "m", "--out", "o", "--steps", "10000", "--height", "8192",
                                             "--width", "8192", *["a prompt"] * 999])
    sample.check_flags(args)


def test_more_pixels_than_one_run_holds_are_one_line_before_any_sampling(checkpoint_dir, engine, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.setattr(sample, "load_engine", lambda *args, **kwargs: engine)
    monkeypatch.setattr(Pipeline, "generate", lambda *args, **kwargs: pytest.fail("sampling started"))
    monkeypatch.setattr(sample, "MAX_PIXELS", 2 * 32 * 32)  # two images of the tiny model's largest size
    prompts = ["a red circle", "a blue square", "a green triangle"]
    code, err = run(["--model", checkpoint_dir, *prompts, "--height", "32", "--width", "32", "--out",
                     tmp_path / "out"], capsys)
    assert (code, err) == (2, "ldm-sample: error: 3 images of 32x32 are 3072 pixels; expected at most 2048 in one "
                              "run (fewer prompts or a smaller --height and --width)\n")
    assert list(tmp_path.iterdir()) == []
