"""model.json's ``default_sampler``: a request that names no sampler or steps gets the model's, else the project's
(``DEFAULT_SAMPLER``, ``DEFAULT_STEPS``); its timestep spacing and offset reach every sampler but DDIM; ldm-export
carries it into the manifest, ldm-sample and ldm-eval record what was used, and a bad value is one line naming the
field, before anything is built."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_runtime import sample
from ldm_runtime.config import (
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    OTHER_SAMPLER_STEPS,
    SAMPLER_NAMES,
    ConfigError,
    ModelConfig,
    SamplerDefaults,
)
from ldm_runtime.engines.torch_engine import TorchEngine
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from ldm_train.checkpoint import write_random_checkpoint
from test_pipeline import PROMPTS, TINY_CONFIG


def checkpoint_with(folder: Path, defaults: SamplerDefaults) -> Path:
    write_random_checkpoint(folder, dataclasses.replace(TINY_CONFIG, default_sampler=defaults), 0)
    return folder


@pytest.fixture(scope="module")
def euler_checkpoint(tmp_path_factory) -> Path:
    """The tiny model, its folder naming euler at 3 steps with the "trailing" spacing."""
    return checkpoint_with(tmp_path_factory.mktemp("euler_default"),
                           SamplerDefaults(name="euler", steps=3, timestep_spacing="trailing", steps_offset=0))


def test_a_request_naming_nothing_gets_the_models_default_sampler_steps_and_spacing(euler_checkpoint, rng):
    pipeline = Pipeline(TorchEngine(euler_checkpoint, device="cpu"))
    assert (pipeline.default_sampler, pipeline.default_steps) == ("euler", 3)
    assert pipeline.sigma_samplers["euler"].timestep_spacing == "trailing"
    assert pipeline.sigma_samplers["dpmpp-2m"].timestep_spacing == "trailing"
    seed = int(rng.integers(2**62))
    unnamed = GenerationRequest(prompt=PROMPTS[0], seed=seed)
    named = GenerationRequest(prompt=PROMPTS[0], seed=seed, sampler="euler", steps=3)
    assert pipeline.resolve(unnamed) == dataclasses.replace(named, cache_interval=1, cache_schedule="uniform",
                                                            guidance_scale=5.0)
    [image_unnamed, image_named, image_ddim] = pipeline.generate(
        [unnamed, named, dataclasses.replace(named, sampler="ddim")])
    assert np.array_equal(image_unnamed, image_named)
    assert not np.array_equal(image_named, image_ddim)  # the default is not ddim's image
    # the spacing reaches the trajectory: trailing starts at T - 1 and steps T / 3
    np.testing.assert_array_equal(pipeline.sigma_samplers["euler"].trajectory(3).timesteps, [999, 666, 332])
    # a request naming another sampler and no steps gets OTHER_SAMPLER_STEPS (the model's steps are its default
    # sampler's), one naming only its steps keeps the model's sampler
    assert pipeline.resolve(dataclasses.replace(unnamed, sampler="ddim")).steps == OTHER_SAMPLER_STEPS
    assert pipeline.resolve(dataclasses.replace(unnamed, sampler="euler")).steps == 3
    assert pipeline.resolve(dataclasses.replace(unnamed, steps=7)).sampler == "euler"


def test_a_model_that_names_no_default_gets_the_projects(rng):
    defaults = SamplerDefaults.from_dict({})
    assert (defaults.sampler, defaults.sampler_steps) == (DEFAULT_SAMPLER, DEFAULT_STEPS)
    assert DEFAULT_SAMPLER in SAMPLER_NAMES
    assert {defaults.steps_for(name) for name in SAMPLER_NAMES if name != DEFAULT_SAMPLER} == {OTHER_SAMPLER_STEPS}
    # a model naming a sampler but no steps: DEFAULT_STEPS is Euler's, not that sampler's
    assert SamplerDefaults(name="unipc").steps_for("unipc") == OTHER_SAMPLER_STEPS
    old = json.loads(TINY_CONFIG.to_json())
    del old["default_sampler"]  # model.json written before it was recorded
    assert ModelConfig.from_dict(old).default_sampler == SamplerDefaults()


@pytest.mark.parametrize("bad, message", [
    ({"name": "heun"}, "default_sampler.name is 'heun'; expected one of ddim, euler"),
    ({"name": 3}, "default_sampler.name is 3; expected one of"),
    ({"steps": 0}, "default_sampler.steps is 0; expected an integer from 1 to 10000 or null"),
    ({"steps": True}, "default_sampler.steps is True; expected an integer"),
    ({"steps": 2.5}, "default_sampler.steps is 2.5; expected an integer"),
    ({"timestep_spacing": "uniform"}, "default_sampler.timestep_spacing is 'uniform'; expected one of linspace, "
                                      "leading, trailing or null"),
    ({"steps_offset": -1}, "default_sampler.steps_offset is -1; expected an integer from 0"),
    ({"sampler": "euler"}, "unknown keys ['sampler']"),
    ({"guidance_scale": -1}, "default_sampler.guidance_scale is -1; expected a number from 0 to 100 or null"),
    ({"guidance_scale": True}, "default_sampler.guidance_scale is True; expected a number"),
    ({"guidance_scale": 1e9}, "default_sampler.guidance_scale is 1000000000.0; expected a number from 0 to 100"),
])
def test_a_bad_default_sampler_in_model_json_is_one_line_naming_the_field(bad, message):
    data = json.loads(TINY_CONFIG.to_json())
    data["default_sampler"] = bad
    with pytest.raises(ConfigError) as raised:
        ModelConfig.from_dict(data).validate()
    assert message in str(raised.value) and "\n" not in str(raised.value), str(raised.value)


def test_default_steps_past_the_schedule_are_refused_naming_the_field():
    config = dataclasses.replace(TINY_CONFIG, default_sampler=SamplerDefaults(steps=1001))
    with pytest.raises(ConfigError, match=r"default_sampler.steps is 1001; expected an integer from 1 to 1000"):
        config.validate()


def test_ldm_export_carries_the_default_into_the_manifest_and_the_engine_dir_samples_it(euler_checkpoint, tmp_path,
                                                                                      rng):
    from ldm_export.cli import main as export_main
    from ldm_runtime.engines import load_engine

    out = tmp_path / "engine"
    assert export_main([str(euler_checkpoint), "--out", str(out), "--engine", "fp32", "--skip-validation",
                        "--batch-range", "1:2:4"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["default_sampler"] == {"name": "euler", "steps": 3, "timestep_spacing": "trailing",
                                           "steps_offset": 0}
    engine_dir = Pipeline(load_engine(out, engine="onnxruntime"))
    eager = Pipeline(TorchEngine(euler_checkpoint, device="cpu"))
    assert (engine_dir.default_sampler, engine_dir.default_steps) == ("euler", 3)
    request = GenerationRequest(prompt=PROMPTS[1], seed=int(rng.integers(2**62)))
    [from_engine_dir], [from_eager] = engine_dir.generate([request]), eager.generate([request])
    assert np.abs(from_engine_dir.astype(int) - from_eager.astype(int)).max() <= 2  # fp32 graphs against eager

    manifest["default_sampler"] = {"name": "heun"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    code = sample.main(["a red circle", "--model", str(out), "--out", str(tmp_path / "x.png"), "--engine",
                        "onnxruntime"])
    assert code == 2 and not (tmp_path / "x.png").exists()


def test_ldm_sample_records_the_sampler_and_steps_it_used(euler_checkpoint, tmp_path, capsys):
    out = tmp_path / "one.png"
    assert sample.main(["a red circle", "--model", str(euler_checkpoint), "--out", str(out), "--engine", "torch"]) == 0
    parameters = json.loads(Image.open(out).text["parameters"])
    assert (parameters["sampler"], parameters["steps"]) == ("euler", 3)


def test_a_model_naming_guidance_1_runs_no_unconditional_row_unless_a_request_asks(tmp_path, capsys, rng):
    """A model distilled with its guidance in it (ldm-train lcm) records guidance 1: a request naming none runs the
    conditional branch alone; ldm-sample takes it too, and a request naming a scale keeps its own."""
    from ldm_tools.frontier import RecordingEngine

    folder = checkpoint_with(tmp_path / "distilled", SamplerDefaults(name="lcm", steps=2, guidance_scale=1.0))
    assert json.loads((folder / "model.json").read_text())["default_sampler"]["guidance_scale"] == 1.0
    engine = RecordingEngine(TorchEngine(folder, device="cpu"))
    pipeline = Pipeline(engine)
    seed = int(rng.integers(2**62))
    request = GenerationRequest(prompt=PROMPTS[0], seed=seed)
    assert pipeline.default_guidance_scale == 1.0 and pipeline.resolve(request).guidance_scale == 1.0
    [unnamed] = pipeline.generate([request])
    assert engine.whole_rows == 2  # 2 steps, one row each
    [named] = pipeline.generate([dataclasses.replace(request, guidance_scale=1.0)])
    assert np.array_equal(unnamed, named)
    pipeline.generate([dataclasses.replace(request, guidance_scale=3.0)])
    assert engine.whole_rows == 2 + 2 + 4  # guided: two rows a step
    assert Pipeline(TorchEngine(checkpoint_with(tmp_path / "plain", SamplerDefaults()), device="cpu")
                    ).default_guidance_scale == 5.0  # DEFAULT_GUIDANCE_SCALE where the model names none

    out = tmp_path / "one.png"
    assert sample.main(["a red circle", "--model", str(folder), "--out", str(out), "--engine", "torch"]) == 0
    assert json.loads(Image.open(out).text["parameters"])["guidance_scale"] == 1.0
    assert sample.main(["a red circle", "--model", str(folder), "--out", str(out), "--engine", "torch",
                        "--guidance", "2"]) == 0
    assert json.loads(Image.open(out).text["parameters"])["guidance_scale"] == 2.0
