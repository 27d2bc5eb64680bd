"""An imported Stable Diffusion model samples what diffusers' StableDiffusionPipeline samples with a DDIMScheduler
read from its folder, or ldm-import (or the sample) says in one line what differs.

The oracle is diffusers' pipeline built around the scheduler config (its constructor's rewrites included) on the
checkpoint's own weights, started from the x_T our pipeline draws; the final latents are compared, fp32 both ways.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_export.diffusers_scheduler import schedule_from_diffusers
from ldm_export.errors import ImportRefusedError
from ldm_export.sd_import import import_source
from ldm_runtime.noise import initial_noise
from tests.ldm_export.test_sd_import import _kind_seed
from tests.ldm_export.tiny_sd import LATENT_SIZE, PROMPTS, SD1_LIKE, SD2_LIKE, write_diffusers_folder

WHERE = Path("scheduler_config.json")
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
LATENT_RTOL = 1e-5


def _ddim_config(**settings) -> dict:
    """What a DDIMScheduler of ``settings`` writes to scheduler_config.json."""
    from diffusers import DDIMScheduler

    return json.loads(DDIMScheduler(**SD_SCHEDULE, **settings).to_json_string())


@pytest.fixture(scope="module", params=[SD1_LIKE, SD2_LIKE], ids=lambda sizes: sizes.name)
def model(request, tmp_path_factory):
    """(the diffusers pipeline loaded from a tiny SD folder, our torch engine on its import, the sizes)."""
    from diffusers import StableDiffusionPipeline

    from ldm_runtime.engines.torch_engine import TorchEngine

    sizes = request.param
    root = tmp_path_factory.mktemp(f"parity-{sizes.name}")
    source = write_diffusers_folder(sizes, root / "diffusers", _kind_seed(sizes.name))
    checkpoint = import_source(source, root / "checkpoint")
    pipe = StableDiffusionPipeline.from_pretrained(str(source), safety_checker=None, requires_safety_checker=False)
    return pipe, TorchEngine(checkpoint, device="cpu"), sizes


def _diffusers_latents(model, scheduler_config: dict, steps: int, guidance_scale: float, seed: int) -> torch.Tensor:
    """The final latents of diffusers' StableDiffusionPipeline built around a DDIMScheduler of ``scheduler_config``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe, _, sizes = model
    components = {**pipe.components, "scheduler": DDIMScheduler.from_config(scheduler_config)}
    rebuilt = StableDiffusionPipeline(**components)  # its constructor rewrites the scheduler as from_pretrained does
    rebuilt.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(initial_noise([seed], (4, LATENT_SIZE, LATENT_SIZE)))
    return rebuilt(PROMPTS[0], negative_prompt="", num_inference_steps=steps, guidance_scale=guidance_scale,
                   latents=latents, output_type="latent").images


def _our_latents(model, ddim, steps: int, guidance_scale: float, seed: int) -> torch.Tensor:
    from ldm_runtime.pipeline import GenerationRequest, Pipeline

    _, engine, _ = model
    pipeline = Pipeline(engine, ddim)
    states = pipeline.start([GenerationRequest(prompt=PROMPTS[0], seed=seed, sampler="ddim", steps=steps,
                                               guidance_scale=guidance_scale)])
    while not states[0].done:
        states = pipeline.advance(states)
    return states[0].latents


def _relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    scale = float(expected.double().norm())
    assert scale > 0, "comparing against zeros proves nothing"
    return float((actual.double() - expected.double()).norm()) / scale


def _imported_sampler(model, scheduler_config: dict, lines: list[str] | None = None):
    _, _, sizes = model
    scheduler_config = {**scheduler_config, "prediction_type": sizes.prediction_type}
    schedule, sampler, _ = schedule_from_diffusers(scheduler_config, WHERE,
                                                   (lines if lines is not None else []).append)
    assert schedule.prediction_type == sizes.prediction_type
    return scheduler_config, sampler


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_imported_scheduler_samples_diffusers_latents_for_every_spacing_offset_and_clip(model, spacing, rng):
    """Step counts that divide 1000 and that do not; steps_offset 0/1, clip_sample true/false, set_alpha_to_one."""
    settings = itertools.cycle(itertools.product((0, 1), (False, True), (False, True)))
    for steps in (4, 7):
        for _ in range(4):
            steps_offset, clip_sample, set_alpha_to_one = next(settings)
            written = _ddim_config(timestep_spacing=spacing, steps_offset=steps_offset, clip_sample=clip_sample,
                                   set_alpha_to_one=set_alpha_to_one)
            written, sampler = _imported_sampler(model, written)
            seed = int(rng.integers(0, 2**31))
            expected = _diffusers_latents(model, written, steps, 7.5, seed)
            actual = _our_latents(model, sampler, steps, 7.5, seed)
            error = _relative_error(expected, actual)
            assert error <= LATENT_RTOL, (spacing, steps, steps_offset, clip_sample, set_alpha_to_one, error)


@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_imported_model_samples_diffusers_latents_with_guidance(model, guidance_scale, rng):
    written, sampler = _imported_sampler(model, _ddim_config(steps_offset=1, clip_sample=False,
                                                             set_alpha_to_one=False))
    seed = int(rng.integers(0, 2**31))
    expected = _diffusers_latents(model, written, 6, guidance_scale, seed)
    assert _relative_error(expected, _our_latents(model, sampler, 6, guidance_scale, seed)) <= LATENT_RTOL


def test_guidance_below_one_is_the_formula_and_the_sample_says_diffusers_turns_it_off(model, rng, caplog):
    """diffusers samples guidance 0.5 as guidance 1 (no guidance); ours leans toward the unconditional prediction."""
    written, sampler = _imported_sampler(model, _ddim_config(steps_offset=1, clip_sample=False,
                                                             set_alpha_to_one=False))
    seed = int(rng.integers(0, 2**31))
    expected = _diffusers_latents(model, written, 6, 0.5, seed)
    with caplog.at_level(logging.WARNING, logger="ldm_runtime.pipeline"):
        below_one = _our_latents(model, sampler, 6, 0.5, seed)
    lines = [record.getMessage() for record in caplog.records if record.name == "ldm_runtime.pipeline"]
    assert len(lines) == 1 and "guidance_scale 0.5 is below 1" in lines[0] and "guidance_scale 1" in lines[0]
    assert "\n" not in lines[0]
    assert _relative_error(expected, below_one) > 1e-3
    assert _relative_error(expected, _our_latents(model, sampler, 6, 1.0, seed)) <= LATENT_RTOL


def test_the_guidance_line_is_said_once_per_pipeline_and_not_at_one_or_above(model, caplog):
    from ldm_runtime.pipeline import GenerationRequest, Pipeline

    _, engine, _ = model
    pipeline = Pipeline(engine)
    with caplog.at_level(logging.WARNING, logger="ldm_runtime.pipeline"):
        for scale in (1.0, 7.5):
            pipeline.start([GenerationRequest(prompt=PROMPTS[0], seed=1, steps=1, guidance_scale=scale)])
        for scale in (0.0, 0.5):
            pipeline.start([GenerationRequest(prompt=PROMPTS[0], seed=1, steps=1, guidance_scale=scale)])
    lines = [record.getMessage() for record in caplog.records if record.name == "ldm_runtime.pipeline"]
    assert len(lines) == 1 and "guidance_scale 0 is below 1" in lines[0]


def test_import_of_a_folder_whose_scheduler_differs_says_each_difference_in_one_line(tmp_path, rng):
    """clip_sample true and steps_offset 0 are read as StableDiffusionPipeline reads them; linspace steps as diffusers
    does; model.json records it, and sampling the checkpoint gives diffusers' latents."""
    from diffusers import StableDiffusionPipeline

    from ldm_runtime.engines.torch_engine import TorchEngine

    source = write_diffusers_folder(SD1_LIKE, tmp_path / "diffusers", _kind_seed("sd1"))
    written = _ddim_config(timestep_spacing="linspace", steps_offset=0, clip_sample=True, set_alpha_to_one=True)
    (source / "scheduler" / "scheduler_config.json").write_text(json.dumps(written))
    lines: list[str] = []
    checkpoint = import_source(source, tmp_path / "checkpoint", log=lines.append)
    sampler = json.loads((checkpoint / "model.json").read_text())["sampler"]
    assert (sampler["clip_sample"], sampler["steps_offset"], sampler["previous_timestep"]) == (False, 1, "diffusers")
    said = [line for line in lines if "scheduler_config.json" in line]
    assert all("\n" not in line for line in said)
    assert any("clip_sample true is read as false" in line for line in said), said
    assert any("'linspace' spacing steps from t to t - 1000 // steps" in line and "\"listed\"" in line
               for line in said), said
    assert not any("steps_offset" in line for line in said), "steps_offset only acts on the 'leading' spacing"

    pipe = StableDiffusionPipeline.from_pretrained(str(source), safety_checker=None, requires_safety_checker=False)
    engine = TorchEngine(checkpoint, device="cpu")
    seed = int(rng.integers(0, 2**31))
    expected = _diffusers_latents((pipe, engine, SD1_LIKE), written, 7, 7.5, seed)
    actual = _our_latents((pipe, engine, SD1_LIKE), None, 7, 7.5, seed)
    assert _relative_error(expected, actual) <= LATENT_RTOL


# --- schedule_from_diffusers: classes and keys -----------------------------------------------------------------

def test_leading_steps_offset_zero_is_read_as_one_and_said():
    lines: list[str] = []
    _, sampler, _ = schedule_from_diffusers(_ddim_config(steps_offset=0, clip_sample=False), WHERE, lines.append)
    assert sampler.steps_offset == 1 and sampler.previous_timestep == "diffusers"
    assert len(lines) == 1 and "steps_offset 0 is read as 1" in lines[0] and "sampler.steps_offset" in lines[0]


def test_a_scheduler_config_without_clip_sample_is_read_as_the_pipeline_reads_it():
    """DDIMScheduler's default clip_sample is true, which StableDiffusionPipeline rewrites to false."""
    lines: list[str] = []
    _, sampler, _ = schedule_from_diffusers({"_class_name": "DDIMScheduler", **SD_SCHEDULE, "steps_offset": 1}, WHERE,
                                            lines.append)
    assert sampler.clip_sample is False
    assert len(lines) == 1 and "clip_sample left out (DDIMScheduler: true) is read as false" in lines[0]


@pytest.mark.parametrize("class_name, sampler_name", [("PNDMScheduler", "plms"), ("EulerDiscreteScheduler", "euler")])
def test_the_ddim_settings_of_another_class_are_what_ddim_reads_of_it_and_its_sampler_is_the_default(class_name,
                                                                                                    sampler_name):
    """SD 1.x ships a PNDM config, SD 2.0 an Euler one, each with the other's leftover keys; a request that names
    ddim samples as DDIMScheduler.from_config of that file."""
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    scheduler = {"PNDMScheduler": PNDMScheduler, "EulerDiscreteScheduler": EulerDiscreteScheduler}[class_name]
    config = {**json.loads(scheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="trailing").to_json_string()),
              "clip_sample": False, "skip_prk_steps": True}
    lines: list[str] = []
    schedule, sampler, defaults = schedule_from_diffusers(config, WHERE, lines.append)
    assert schedule.beta_schedule == "scaled_linear" and sampler.timestep_spacing == "trailing"
    assert (sampler.steps_offset, sampler.clip_sample, sampler.previous_timestep) == (1, False, "diffusers")
    assert (defaults.name, defaults.timestep_spacing, defaults.steps_offset) == (sampler_name, "trailing", 1)
    assert not any("DDIM instead" in line for line in lines), lines


@pytest.mark.parametrize("config, named", [
    ({"_class_name": "KDPM2DiscreteScheduler"}, '"KDPM2DiscreteScheduler"'),
    ({"_class_name": ["DDIMScheduler"]}, '["DDIMScheduler"]'),
    ({"_class_name": "DDIMScheduler", "timestep_offset_mode": "shifted"}, '"timestep_offset_mode"'),
    ({"_class_name": "DDIMScheduler", "use_karras_sigmas": True}, '"use_karras_sigmas"'),
    ({"_class_name": "DDIMScheduler", "thresholding": True}, "thresholding"),
    ({"_class_name": "DDIMScheduler", "steps_offset": 1.5}, "1.5"),
    ({"_class_name": "DDIMScheduler", "clip_sample": "false"}, "'false'"),
    ({"_class_name": "DDIMScheduler", "timestep_spacing": "karras"}, "karras"),
    ({"_class_name": "DDIMScheduler", "_use_default_values": "clip_sample"}, "_use_default_values"),
])
def test_a_scheduler_config_not_known_here_is_refused_in_one_line(config, named):
    with pytest.raises(ImportRefusedError) as caught:
        schedule_from_diffusers(config, WHERE)
    message = str(caught.value)
    assert named in message and str(WHERE) in message and "\n" not in message, message
