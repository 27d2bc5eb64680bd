"""ldm-import of a diffusers folder whose scheduler_config.json is of each class we sample: model.json's
default_sampler names the sampler of that class, and sampling the import with it (a request that names none) gives
the latents of diffusers' StableDiffusionPipeline built around that class read from the same file, from the same x_T
and, for the stochastic samplers, the same per-step noise. A setting that our sampler does not compute is refused
in one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ldm_export.diffusers_scheduler import IMPORTED_STEPS
from ldm_export.sd_import import import_source, main
from ldm_runtime.noise import initial_noise, step_noise
from tests.ldm_export.test_sd_import import _kind_seed
from tests.ldm_export.tiny_sd import LATENT_SIZE, PROMPTS, SD1_LIKE, SD2_LIKE, write_diffusers_folder

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
LATENT_RTOL = 1e-5
GUIDANCE = 7.5
KINDS = {"sd1": SD1_LIKE, "sd2": SD2_LIKE}
SAMPLED_MODULES = ("scheduling_euler_ancestral_discrete", "scheduling_dpmsolver_multistep", "scheduling_lcm",
                   "scheduling_tcd")


def _config(class_name: str, prediction_type: str = "epsilon", **settings) -> dict:
    """What diffusers' ``class_name`` of SD's schedule and ``settings`` writes to scheduler_config.json."""
    import diffusers

    scheduler = getattr(diffusers, class_name)(**SD_SCHEDULE, prediction_type=prediction_type, **settings)
    return json.loads(scheduler.to_json_string())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """kind -> (its tiny diffusers folder, the diffusers pipeline loaded from it), each made on first use."""
    made: dict[str, tuple[Path, object]] = {}

    def source(kind: str):
        from diffusers import StableDiffusionPipeline

        if kind not in made:
            folder = write_diffusers_folder(KINDS[kind], tmp_path_factory.mktemp(kind) / "diffusers",
                                            _kind_seed(kind))
            pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                           requires_safety_checker=False)
            made[kind] = folder, pipe
        return made[kind]

    return source


def _folder_with_scheduler(base: Path, folder: Path, config: dict) -> Path:
    """A diffusers folder of ``base``'s components (the weights linked, the tokenizer copied: ldm-import takes no
    link to a tokenizer folder) and ``config`` as its scheduler_config.json."""
    folder.mkdir(parents=True)
    for entry in base.iterdir():
        if entry.name == "tokenizer":
            shutil.copytree(entry, folder / entry.name)
        elif entry.name != "scheduler":
            (folder / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


def _diffusers_latents(pipe, config: dict, steps: int, seed: int, monkeypatch, eta: float = 0.0) -> torch.Tensor:
    """The final latents of StableDiffusionPipeline around ``config``'s class read from ``config`` (its
    constructor's rewrites included), each stochastic step fed our noise for ``seed``; ``eta`` as the pipeline
    hands it to a scheduler whose step takes one."""
    import importlib

    import diffusers
    from diffusers import StableDiffusionPipeline

    shape = (4, LATENT_SIZE, LATENT_SIZE)
    drawn: list[tuple] = []

    def randn_tensor(noise_shape, dtype=None, **kwargs):
        assert tuple(noise_shape) == (1, *shape), noise_shape
        drawn.append(noise_shape)
        return torch.from_numpy(step_noise([seed], [len(drawn) - 1], shape)).to(dtype)

    for name in SAMPLED_MODULES:
        monkeypatch.setattr(importlib.import_module(f"diffusers.schedulers.{name}"), "randn_tensor", randn_tensor)
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    rebuilt = StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler})
    rebuilt.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(initial_noise([seed], shape))
    return rebuilt(PROMPTS[0], negative_prompt="", num_inference_steps=steps, guidance_scale=GUIDANCE,
                   latents=latents, output_type="latent", eta=eta).images


def _our_latents(checkpoint: Path, steps: int, seed: int) -> tuple[str, torch.Tensor]:
    """(the sampler a request that names none gets, its final latents) from the imported checkpoint."""
    from ldm_runtime.engines.torch_engine import TorchEngine
    from ldm_runtime.pipeline import GenerationRequest, Pipeline

    pipeline = Pipeline(TorchEngine(checkpoint, device="cpu"))
    states = pipeline.start([GenerationRequest(prompt=PROMPTS[0], seed=seed, steps=steps,
                                               guidance_scale=GUIDANCE)])
    while not states[0].done:
        states = pipeline.advance(states)
    return states[0].request.sampler, states[0].latents


def _relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    scale = float(expected.double().norm())
    assert scale > 0, "comparing against zeros proves nothing"
    return float((actual.double() - expected.double()).norm()) / scale


# (class, its settings, the model kind, the step counts, the default_sampler model.json should hold)
LEADING = dict(timestep_spacing="leading", steps_offset=1)
CASES = {
    "ddim-leading": ("DDIMScheduler", dict(LEADING, clip_sample=False, set_alpha_to_one=False), "sd1", (4, 7),
                     dict(name="ddim", timestep_spacing="leading", steps_offset=1)),
    "pndm-leading": ("PNDMScheduler", dict(LEADING, skip_prk_steps=True), "sd1", (4, 7),
                     dict(name="plms", timestep_spacing="leading", steps_offset=1)),
    "pndm-leading-offset-0": ("PNDMScheduler", dict(timestep_spacing="leading", steps_offset=0, skip_prk_steps=True),
                              "sd2", (3, 6), dict(name="plms", timestep_spacing="leading", steps_offset=1)),
    "pndm-linspace": ("PNDMScheduler", dict(timestep_spacing="linspace", skip_prk_steps=True, set_alpha_to_one=True),
                      "sd2", (4, 7), dict(name="plms", timestep_spacing="linspace", steps_offset=1)),
    "euler-leading": ("EulerDiscreteScheduler", LEADING, "sd1", (4, 7),
                      dict(name="euler", timestep_spacing="leading", steps_offset=1)),
    "euler-trailing": ("EulerDiscreteScheduler", dict(timestep_spacing="trailing"), "sd2", (4, 7),
                       dict(name="euler", timestep_spacing="trailing", steps_offset=1)),
    # linspace at step counts whose timesteps are whole (steps - 1 divides 999)
    "euler-linspace-continuous-epsilon": ("EulerDiscreteScheduler",
                                          dict(timestep_spacing="linspace", timestep_type="continuous"), "sd1",
                                          (4, 10), dict(name="euler", timestep_spacing="linspace", steps_offset=1)),
    "euler-a-linspace": ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="linspace"), "sd1", (4, 10),
                         dict(name="euler-a", timestep_spacing="linspace", steps_offset=1)),
    "euler-a-leading": ("EulerAncestralDiscreteScheduler", LEADING, "sd2", (4, 7),
                        dict(name="euler-a", timestep_spacing="leading", steps_offset=1)),
    "dpmpp-2m-linspace": ("DPMSolverMultistepScheduler", dict(timestep_spacing="linspace"), "sd1", (4, 7),
                          dict(name="dpmpp-2m", timestep_spacing="linspace", steps_offset=1)),
    "dpmpp-2m-leading-settings-that-change-nothing": (
        "DPMSolverMultistepScheduler", dict(LEADING, lower_order_final=False, euler_at_final=True,
                                            lambda_min_clipped=-5.1, use_dynamic_shifting=True, flow_shift=3.0),
        "sd1", (4, 7), dict(name="dpmpp-2m", timestep_spacing="leading", steps_offset=1)),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True), "sd2", (4, 7),
                        dict(name="dpmpp-2m-karras", timestep_spacing="linspace", steps_offset=1)),
    "dpmpp-2m-sde-leading": ("DPMSolverMultistepScheduler", dict(LEADING, algorithm_type="sde-dpmsolver++"), "sd1",
                             (4, 7), dict(name="dpmpp-2m-sde", timestep_spacing="leading", steps_offset=1)),
    "dpmpp-2m-sde-karras": ("DPMSolverMultistepScheduler",
                            dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, lambda_min_clipped=0.0),
                            "sd2", (4, 7), dict(name="dpmpp-2m-sde-karras", timestep_spacing="linspace",
                                                steps_offset=1)),
    "unipc-trailing": ("UniPCMultistepScheduler", dict(timestep_spacing="trailing"), "sd1", (4, 7),
                       dict(name="unipc", timestep_spacing="trailing", steps_offset=1)),
    "unipc-3-leading": ("UniPCMultistepScheduler", dict(LEADING, solver_order=3), "sd2", (4, 7),
                        dict(name="unipc-3", timestep_spacing="leading", steps_offset=1)),
    "lcm": ("LCMScheduler", dict(clip_sample=True), "sd1", (2, 4), dict(name="lcm")),
    "lcm-v": ("LCMScheduler", {}, "sd2", (3, 5), dict(name="lcm")),
    "tcd": ("TCDScheduler", dict(clip_sample=True, timestep_spacing="trailing"), "sd1", (2, 4), dict(name="tcd")),
    "tcd-v": ("TCDScheduler", {}, "sd2", (3, 5), dict(name="tcd")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_imported_scheduler_class_samples_its_default_sampler_as_diffusers_pipeline(case, sources, tmp_path, rng,
                                                                                      monkeypatch):
    class_name, settings, kind, step_counts, expected_default = CASES[case]
    base, pipe = sources(kind)
    config = _config(class_name, KINDS[kind].prediction_type, **settings)
    source = _folder_with_scheduler(base, tmp_path / "diffusers", config)
    lines: list[str] = []
    checkpoint = import_source(source, tmp_path / "checkpoint", log=lines.append)
    assert all("\n" not in line for line in lines) and not any("DDIM instead" in line for line in lines), lines
    written = json.loads((checkpoint / "model.json").read_text())["default_sampler"]
    assert written == {"name": None, "steps": IMPORTED_STEPS, "timestep_spacing": None, "steps_offset": None,
                       **expected_default}
    for steps in step_counts:
        seed = int(rng.integers(0, 2**31))
        expected = _diffusers_latents(pipe, config, steps, seed, monkeypatch)
        sampler, actual = _our_latents(checkpoint, steps, seed)
        assert sampler == expected_default["name"]
        error = _relative_error(expected, actual)
        assert error <= LATENT_RTOL, (case, steps, error)


def test_a_pndm_config_without_set_alpha_to_one_samples_plms_as_pndm_reads_it_and_says_so(sources, tmp_path, rng,
                                                                                           monkeypatch):
    """PNDMScheduler's default final alpha is alphas_cumprod[0] (DDIMScheduler's is 1); PLMS takes PNDM's."""
    base, pipe = sources("sd1")
    config = _config("PNDMScheduler", **LEADING, skip_prk_steps=True)
    del config["set_alpha_to_one"]
    lines: list[str] = []
    checkpoint = import_source(_folder_with_scheduler(base, tmp_path / "diffusers", config), tmp_path / "checkpoint",
                               log=lines.append)
    assert json.loads((checkpoint / "model.json").read_text())["sampler"]["set_alpha_to_one"] is False
    assert sum("set_alpha_to_one left out is read as false" in line for line in lines) == 1, lines
    seed = int(rng.integers(0, 2**31))
    expected = _diffusers_latents(pipe, config, 5, seed, monkeypatch)
    assert _relative_error(expected, _our_latents(checkpoint, 5, seed)[1]) <= LATENT_RTOL


def test_a_euler_linspace_import_says_the_unet_sees_whole_timesteps(sources, tmp_path):
    base, _ = sources("sd1")
    lines: list[str] = []
    import_source(_folder_with_scheduler(base, tmp_path / "diffusers", _config("EulerDiscreteScheduler")),
                  tmp_path / "checkpoint", log=lines.append)
    said = [line for line in lines if "'linspace' spacing gives fractional timesteps" in line]
    assert len(said) == 1 and "default_sampler.timestep_spacing" in said[0], lines


LEFT_OUT = object()  # a setting that the config leaves out
# (class, the settings refused, what the line must name)
REFUSALS = {
    "pndm-runge-kutta": ("PNDMScheduler", dict(skip_prk_steps=False), ["skip_prk_steps", "false", "set skip_prk_steps "
                                                                       "true", "DDIMScheduler"]),
    "pndm-runge-kutta-left-out": ("PNDMScheduler", dict(skip_prk_steps=LEFT_OUT), ["skip_prk_steps", "left out"]),
    "euler-karras": ("EulerDiscreteScheduler", dict(use_karras_sigmas=True), ["use_karras_sigmas", "true"]),
    "euler-log-linear": ("EulerDiscreteScheduler", dict(interpolation_type="log_linear"),
                         ["interpolation_type", '"log_linear"', '"linear"']),
    "euler-sigma-min": ("EulerDiscreteScheduler", dict(final_sigmas_type="sigma_min"),
                        ["final_sigmas_type", '"sigma_min"', '"zero"']),
    "euler-continuous-v": ("EulerDiscreteScheduler", dict(timestep_type="continuous", prediction_type="v_prediction"),
                           ["timestep_type", '"continuous"', '"discrete"']),
    "euler-a-zero-snr": ("EulerAncestralDiscreteScheduler", dict(rescale_betas_zero_snr=True),
                         ["rescale_betas_zero_snr", "true", "false"]),
    "dpm-order-3": ("DPMSolverMultistepScheduler", dict(solver_order=3), ["solver_order", "3", "2"]),
    "dpm-dpmsolver": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver"),
                      ["algorithm_type", '"dpmsolver"', '"dpmsolver++"']),
    "dpm-heun": ("DPMSolverMultistepScheduler", dict(solver_type="heun"), ["solver_type", '"heun"', '"midpoint"']),
    "dpm-thresholding": ("DPMSolverMultistepScheduler", dict(thresholding=True), ["thresholding", "true"]),
    "dpm-lu-lambdas": ("DPMSolverMultistepScheduler", dict(use_lu_lambdas=True), ["use_lu_lambdas", "true"]),
    "dpm-final-sigma-min": ("DPMSolverMultistepScheduler", dict(final_sigmas_type="sigma_min"),
                            ["final_sigmas_type", '"sigma_min"']),
    "dpm-learned-variance": ("DPMSolverMultistepScheduler", dict(variance_type="learned_range"),
                             ["variance_type", '"learned_range"', "null"]),
    "dpm-lambda-clipped": ("DPMSolverMultistepScheduler", dict(lambda_min_clipped=-1.0),
                           ["lambda_min_clipped", "-1", "-Infinity"]),
    "unipc-predict-noise": ("UniPCMultistepScheduler", dict(predict_x0=False), ["predict_x0", "false", "true"]),
    "unipc-bh1": ("UniPCMultistepScheduler", dict(solver_type="bh1"), ["solver_type", '"bh1"', '"bh2"']),
    "unipc-order-1": ("UniPCMultistepScheduler", dict(solver_order=1), ["solver_order", "1", "2 or 3"]),
    "unipc-not-lower-order-final": ("UniPCMultistepScheduler", dict(lower_order_final=False),
                                    ["lower_order_final", "false"]),
    "unipc-no-corrector": ("UniPCMultistepScheduler", dict(disable_corrector=[0]), ["disable_corrector", "[0]"]),
    "unipc-karras": ("UniPCMultistepScheduler", dict(use_karras_sigmas=True), ["use_karras_sigmas", "true"]),
    "lcm-original-steps": ("LCMScheduler", dict(original_inference_steps=25), ["original_inference_steps", "25",
                                                                               "50"]),
    "lcm-scaling": ("LCMScheduler", dict(timestep_scaling=5.0), ["timestep_scaling", "5.0", "10.0"]),
    "another-class": ("HeunDiscreteScheduler", {}, ['"HeunDiscreteScheduler"', "DPMSolverMultistepScheduler"]),
    "dpm-unknown-key": ("DPMSolverMultistepScheduler", dict(sigma_min=0.1), ['"sigma_min"']),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_scheduler_setting_our_samplers_do_not_compute_is_refused_in_one_line(case, sources, tmp_path, capsys):
    class_name, settings, named = REFUSALS[case]
    settings = dict(settings)
    base, _ = sources("sd1")
    prediction_type = settings.pop("prediction_type", "epsilon")
    if class_name == "HeunDiscreteScheduler":
        config = {**_config("DDIMScheduler"), "_class_name": class_name}
    else:
        config = _config(class_name, prediction_type)
    config.update(settings)
    config = {key: value for key, value in config.items() if value is not LEFT_OUT}
    source = _folder_with_scheduler(base, tmp_path / "diffusers", config)
    out = tmp_path / "checkpoint"
    capsys.readouterr()  # what building the tiny folder said
    code = main([str(source), "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].count("scheduler_config.json") == 1 and all(name in lines[0] for name in named), lines[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["diffusers"], "nothing is written beside --out"


def test_the_json_of_diffusers_default_lambda_min_clipped_is_accepted(sources, tmp_path):
    """diffusers writes -Infinity, which Python's JSON reads as -inf: it clips nothing."""
    base, _ = sources("sd1")
    config = _config("DPMSolverMultistepScheduler")
    assert config["lambda_min_clipped"] == -math.inf
    checkpoint = import_source(_folder_with_scheduler(base, tmp_path / "diffusers", config), tmp_path / "checkpoint")
    assert json.loads((checkpoint / "model.json").read_text())["default_sampler"]["name"] == "dpmpp-2m"


# --- the fp32 engine dir of an import, with every sampler ----------------------------------------------------------

# sampler -> (the diffusers class StableDiffusionPipeline would use for it, the settings that pick that form of it)
ENGINE_DIR_SAMPLERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp-2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc-3": ("UniPCMultistepScheduler", {"solver_order": 3}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
ENGINE_DIR_ETA = {"tcd": 0.3}  # TCD's gamma: its authors', so that its step noise counts


@pytest.fixture(scope="module")
def exported_ddim_import(sources, tmp_path_factory):
    """The SD 1.x-like folder with a DDIM "leading" config, imported and exported to an fp32 engine dir, and the
    config (what every other class is built from, as diffusers' from_config carries its keys)."""
    from ldm_export.engine_dir import ExportOptions, export_engine

    base, _ = sources("sd1")
    config = _config("DDIMScheduler", **LEADING, clip_sample=False, set_alpha_to_one=False)
    folder = tmp_path_factory.mktemp("ddim-import")
    checkpoint = import_source(_folder_with_scheduler(base, folder / "diffusers", config), folder / "checkpoint")
    return export_engine(checkpoint, folder / "engine", ExportOptions(precision="fp32")), config


@pytest.mark.parametrize("sampler", sorted(ENGINE_DIR_SAMPLERS))
def test_the_fp32_engine_dir_of_an_import_samples_each_sampler_as_diffusers_pipeline(sampler, sources,
                                                                                    exported_ddim_import, rng,
                                                                                    monkeypatch):
    """Each sampler named in a request, on onnxruntime over the fp32 engine dir, against StableDiffusionPipeline
    with the class of that sampler built from the model's scheduler_config.json."""
    from ldm_runtime.engines import load_engine
    from ldm_runtime.pipeline import GenerationRequest, Pipeline

    engine_dir, config = exported_ddim_import
    _, pipe = sources("sd1")
    class_name, settings = ENGINE_DIR_SAMPLERS[sampler]
    built = {**{key: value for key, value in config.items() if not key.startswith("_")}, **settings,
             "_class_name": class_name}
    seed, steps, eta = int(rng.integers(0, 2**31)), 4, ENGINE_DIR_ETA.get(sampler, 0.0)
    expected = _diffusers_latents(pipe, built, steps, seed, monkeypatch, eta=eta)
    pipeline = Pipeline(load_engine(engine_dir, engine="onnxruntime", intra_op_threads=1))
    states = pipeline.start([GenerationRequest(prompt=PROMPTS[0], seed=seed, sampler=sampler, steps=steps,
                                               guidance_scale=GUIDANCE, eta=eta)])
    while not states[0].done:
        states = pipeline.advance(states)
    error = _relative_error(expected, torch.from_numpy(states[0].latents))
    print(f"{sampler}: latent relative error {error:.2e}")
    assert error <= LATENT_RTOL, (sampler, error)
