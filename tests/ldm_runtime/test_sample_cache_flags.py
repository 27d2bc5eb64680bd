"""ldm-sample's --cache-interval and --cache-schedule: they reach the pipeline and the PNG's parameters, the model's
defaults where they are left out; a bad value is one line and exit 2, before the model is loaded where the flag alone
decides it, and a cache interval above 1 on an engine that cannot cache names cache_interval."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from ldm_runtime import sample
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from test_pipeline import checkpoint_dir, engine  # noqa: F401 (session fixtures: the tiny checkpoint and its engine)


class EngineWithoutDeepCache:
    """``engine`` as an engine that cannot cache the UNet's features across steps (no ``deep_cache``)."""

    deep_cache = False

    def __init__(self, engine):
        self.engine, self.info = engine, engine.info

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def run(argv: list, capsys) -> tuple[int, str]:
    code = sample.main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one error line of ``err`` (a note about the engine, said before it, may precede it), and the last."""
    lines = err.splitlines()
    assert "Traceback" not in err and [line.startswith("ldm-sample: error: ") for line in lines].count(True) == 1, err
    assert lines[-1].startswith("ldm-sample: error: "), err
    return lines[-1]


@pytest.mark.parametrize("flags, message", [
    (["--cache-interval", "101"], "--cache-interval is 101; expected an integer from 1 to 100"),
    (["--cache-interval", "two"], "argument --cache-interval: invalid int value: 'two'"),
    (["--cache-schedule", "cubic"], "argument --cache-schedule: invalid choice: 'cubic' (choose from "),
])
def test_a_bad_cache_flag_is_one_line_and_exit_2_before_the_model_is_loaded(flags, message, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setattr(sample, "load_engine", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    code, err = run(["--model", tmp_path, "--out", tmp_path / "out", *flags, "a red circle"], capsys)
    assert code == 2 and err.startswith(f"ldm-sample: error: {message}") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("interval, message", [
    (0, "cache_interval is 0; expected an integer from 1 to 100 (1: the whole UNet at every step)"),
    (-3, "cache_interval is -3; expected an integer from 1 to 100"),
])
def test_a_cache_interval_below_1_is_one_line_naming_it(checkpoint_dir, engine, interval, message,  # noqa: F811
                                                        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "load_engine", lambda *args, **kwargs: engine)
    code, err = run(["--model", checkpoint_dir, "--out", tmp_path / "x.png", "--cache-interval", interval,
                     "a red circle"], capsys)
    assert code == 2 and error_line(err).startswith(f"ldm-sample: error: {message}"), err
    assert not (tmp_path / "x.png").exists()


def test_a_cache_interval_above_1_on_an_engine_that_cannot_cache_names_it(checkpoint_dir, engine,  # noqa: F811
                                                                         tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "load_engine", lambda *args, **kwargs: EngineWithoutDeepCache(engine))
    code, err = run(["--model", checkpoint_dir, "--out", tmp_path / "x.png", "--cache-interval", "2",
                     "a red circle"], capsys)
    assert code == 2
    line = error_line(err)
    assert line.startswith("ldm-sample: error: cache_interval is 2; the torch engine cannot cache the UNet's "
                           "features across steps") and line.endswith("; expected 1"), err
    assert not (tmp_path / "x.png").exists()


def test_cache_interval_1_with_either_schedule_is_the_default_image_and_the_png_records_them(
        checkpoint_dir, engine, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(sample, "load_engine", lambda *args, **kwargs: engine)
    common = ["--model", checkpoint_dir, "--steps", "3", "--seed", "5", "a red circle"]
    assert run([*common, "--out", tmp_path / "default.png"], capsys)[0] == 0
    default = Image.open(tmp_path / "default.png")
    assert (json.loads(default.text["parameters"])["cache_interval"],
            json.loads(default.text["parameters"])["cache_schedule"]) == (1, "uniform")  # the tiny model's: none
    for schedule in ("uniform", "quadratic"):
        out = tmp_path / f"{schedule}.png"
        assert run([*common, "--out", out, "--cache-interval", "1", "--cache-schedule", schedule], capsys)[0] == 0
        parameters = json.loads(Image.open(out).text["parameters"])
        assert (parameters["cache_interval"], parameters["cache_schedule"]) == (1, schedule)
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(default))


def test_cache_interval_2_is_the_pipelines_cached_image_and_the_png_records_it(checkpoint_dir, engine,  # noqa: F811
                                                                              tmp_path, capsys, monkeypatch):
    if not getattr(engine, "deep_cache", False):
        pytest.skip("the torch engine cannot cache the UNet's features across steps (it has no deep_cache)")
    monkeypatch.setattr(sample, "load_engine", lambda *args, **kwargs: engine)
    out = tmp_path / "cached.png"
    assert run(["--model", checkpoint_dir, "--steps", "6", "--seed", "5", "--cache-interval", "2",
                "--cache-schedule", "quadratic", "--out", out, "a red circle"], capsys)[0] == 0
    parameters = json.loads(Image.open(out).text["parameters"])
    assert (parameters["cache_interval"], parameters["cache_schedule"]) == (2, "quadratic")
    request = GenerationRequest(prompt="a red circle", seed=5, steps=6, cache_schedule="quadratic")
    [cached, whole] = Pipeline(engine).generate([dataclasses.replace(request, cache_interval=2), request])
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), cached)
    assert not np.array_equal(cached, whole)
