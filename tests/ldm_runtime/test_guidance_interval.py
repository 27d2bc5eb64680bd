"""A request's guidance interval: guidance only at the UNet calls whose noise level lies in (low, high], the
conditional branch alone (one UNet row, not two) at the others; an image is the same alone or in any batch, and
a bad interval is one sentence naming it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from ldm_runtime import sample
from ldm_runtime.pipeline import GenerationRequest, Pipeline, RequestError
from test_pipeline import PROMPTS, CountingEngine, checkpoint_dir, engine  # noqa: F401 (session fixtures)


def sigmas_seen(pipeline: Pipeline, request: GenerationRequest) -> np.ndarray:
    """The noise level of each UNet call's timestep for ``request`` alone."""
    counting = CountingEngine(pipeline.engine)
    Pipeline(counting).generate([request])
    timesteps = np.array([int(call["timesteps"][-1]) for call in counting.unet_calls])
    return pipeline._timestep_sigmas[timesteps]


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp-2m"])
def test_guidance_applies_only_inside_the_interval_and_the_other_calls_take_one_row(engine, sampler, rng):
    pipeline = Pipeline(engine)
    request = GenerationRequest(prompt=PROMPTS[0], seed=int(rng.integers(2**62)), sampler=sampler, steps=5,
                                guidance_scale=5.0)
    sigmas = sigmas_seen(pipeline, request)
    low, high = float(np.sort(sigmas)[1]), float(np.sort(sigmas)[-2])  # leaves out the first and the last calls
    limited = dataclasses.replace(request, guidance_interval=(low, high))
    counting = CountingEngine(engine)
    [image] = Pipeline(counting).generate([limited])
    rows = [len(call["timesteps"]) for call in counting.unet_calls]
    assert rows == [2 if low < sigma <= high else 1 for sigma in sigmas] and 1 in rows and 2 in rows, (rows, sigmas)
    everywhere, nowhere = (dataclasses.replace(request, guidance_interval=interval)
                           for interval in ((0.0, 1e6), (1e5, 1e6)))
    [image_everywhere, image_unlimited, image_nowhere, image_unguided, image_limited] = pipeline.generate(
        [everywhere, request, nowhere, dataclasses.replace(request, guidance_scale=1.0), limited])
    assert np.array_equal(image_everywhere, image_unlimited)  # an interval that holds every call changes nothing
    assert np.array_equal(image_nowhere, image_unguided)  # one that holds none is guidance off
    assert np.array_equal(image_limited, image)  # the same alone or batched with the others
    assert not np.array_equal(image_limited, image_unlimited) and not np.array_equal(image_limited, image_unguided)


@pytest.mark.parametrize("interval", [(2.0, 1.0), (-1.0, 2.0), (0.0, float("nan")), (1.0,), "0,1", (1.0, True)])
def test_a_bad_guidance_interval_is_refused_naming_it(engine, interval):
    with pytest.raises(RequestError, match=r"guidance_interval is .*; expected two noise levels \(low, high\) with "
                                           r"0 <= low < high, or none") as raised:
        Pipeline(engine).validate(GenerationRequest(prompt="a red circle", seed=1, guidance_interval=interval))
    assert raised.value.field == "guidance_interval"


def test_ldm_sample_takes_the_interval_and_records_it(checkpoint_dir, engine, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "one.png"
    assert sample.main(["a red circle", "--model", str(checkpoint_dir), "--out", str(out), "--engine", "torch",
                        "--steps", "4", "--guidance-interval", "0.5,8"]) == 0
    parameters = json.loads(Image.open(out).text["parameters"])
    assert parameters["guidance_interval"] == [0.5, 8.0]
    [expected] = Pipeline(engine).generate([GenerationRequest(prompt="a red circle", seed=0, steps=4,
                                                              guidance_interval=(0.5, 8.0))])
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), expected)


@pytest.mark.parametrize("flag, message", [("3,1", "'3,1' is not an interval with 0 <= LOW < HIGH"),
                                           ("1", "'1' is not two numbers LOW,HIGH"),
                                           ("0,inf", "'inf' is not a finite number")])
def test_a_bad_guidance_interval_flag_is_one_line_and_exit_2(checkpoint_dir, tmp_path, capsys, flag,  # noqa: F811
                                                            message):
    code = sample.main(["a red circle", "--model", str(checkpoint_dir), "--out", str(tmp_path / "x.png"),
                        "--guidance-interval", flag])
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1, error
    assert not (tmp_path / "x.png").exists()
