"""A diffusers scheduler_config.json -> our noise schedule, DDIM settings and default sampler.

``schedule_from_diffusers`` reads a config of each diffusers scheduler class that a sampler of ``SAMPLER_NAMES``
matches step for step (``SCHEDULER_CLASSES``) as diffusers' StableDiffusionPipeline samples with that class built
from the file: the class's own defaults for the keys the file leaves out, the pipeline's rewrites (steps_offset 1
and clip_sample false, for every class whose config holds them), and the spacing and offset that class reads. A
setting that changes the numbers and that our sampler does not compute, a class not listed, or a key that class
does not know is an ``ImportRefusedError`` in one sentence. Plain dicts and numpy: neither torch nor diffusers is
imported.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ldm_export.errors import ImportRefusedError
from ldm_runtime.config import ConfigError, DDIMConfig, SamplerDefaults, ScheduleConfig
from ldm_runtime.files import describe

# The steps of a request to an imported model that names none (StableDiffusionPipeline's default is 50); the
# project's DEFAULT_STEPS is chosen for its own small models
IMPORTED_STEPS = 25
from ldm_runtime.schedulers.schedule import NoiseSchedule

# diffusers' DDIMScheduler defaults: the DDIM settings (model.json's "sampler") are what DDIMScheduler.from_config
# takes from the file, so every class's config is read for these keys too
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                      "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0,
                      "set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 1.0}
SCHEDULER_REFUSED = {"trained_betas": None, "thresholding": False, "rescale_betas_zero_snr": False}
# DDIMScheduler's keys that act only with thresholding, which is refused
SCHEDULER_THRESHOLDING_KEYS = ("dynamic_thresholding_ratio", "sample_max_value")
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
# SD 2.x configs of every class keep PNDM's key
LEFTOVER_KEYS = ("skip_prk_steps",)
OFF = (False, None)  # a flag left false (diffusers reads null as false)


@dataclass(frozen=True)
class SchedulerClass:
    """How one diffusers scheduler class's config maps to our samplers (the keys as diffusers 0.42 names them).

    ``implemented``: each key whose value changes the numbers, and the values our sampler computes (refused
    otherwise). ``ignored``: the class's other keys, which leave the numbers unchanged at any value (each acts only
    with a setting refused here, or not at all in StableDiffusionPipeline). ``defaults``: the class's defaults
    where they differ from DDIMScheduler's or from the first implemented value. ``spaced``: it reads
    timestep_spacing and steps_offset."""

    sampler: str
    implemented: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    spaced: bool = True


SCHEDULER_CLASSES = {
    "DDIMScheduler": SchedulerClass("ddim"),
    "PNDMScheduler": SchedulerClass(
        "plms", implemented={"skip_prk_steps": (True,)},
        defaults={"skip_prk_steps": False, "set_alpha_to_one": False}),
    "EulerDiscreteScheduler": SchedulerClass(
        "euler", implemented={"interpolation_type": ("linear",), "use_karras_sigmas": OFF,
                              "use_exponential_sigmas": OFF, "use_beta_sigmas": OFF, "timestep_type": ("discrete",),
                              "final_sigmas_type": ("zero",)},
        ignored=("sigma_min", "sigma_max"), defaults={"timestep_spacing": "linspace"}),
    "EulerAncestralDiscreteScheduler": SchedulerClass("euler-a", defaults={"timestep_spacing": "linspace"}),
    "DPMSolverMultistepScheduler": SchedulerClass(
        "dpmpp-2m", implemented={"solver_order": (2,), "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
                                 "solver_type": ("midpoint",), "use_karras_sigmas": (False, True, None),
                                 "use_exponential_sigmas": OFF, "use_beta_sigmas": OFF, "use_lu_lambdas": OFF,
                                 "use_flow_sigmas": OFF, "final_sigmas_type": ("zero",), "variance_type": (None,)},
        # with a final sigma of 0, the last step is first order whatever lower_order_final and euler_at_final say,
        # and a second-order solver has no other step they change
        ignored=("lower_order_final", "euler_at_final", "lambda_min_clipped", "flow_shift", "use_dynamic_shifting",
                 "time_shift_type"),
        defaults={"timestep_spacing": "linspace"}),
    "UniPCMultistepScheduler": SchedulerClass(
        "unipc", implemented={"solver_order": (2, 3), "predict_x0": (True,), "solver_type": ("bh2",),
                              "lower_order_final": (True,), "disable_corrector": ([],), "solver_p": (None,),
                              "use_karras_sigmas": OFF, "use_exponential_sigmas": OFF, "use_beta_sigmas": OFF,
                              "use_flow_sigmas": OFF, "final_sigmas_type": ("zero",), "use_dynamic_shifting": OFF},
        ignored=("flow_shift", "time_shift_type", "sigma_min", "sigma_max", "shift_terminal"),
        defaults={"timestep_spacing": "linspace"}),
    "LCMScheduler": SchedulerClass(
        "lcm", implemented={"original_inference_steps": (50,), "timestep_scaling": (10.0,)},
        # clip_sample is read as false by the pipeline; the final alpha is never reached (the last step stays put)
        ignored=("clip_sample", "clip_sample_range", "set_alpha_to_one", "steps_offset", "timestep_spacing"),
        defaults={"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False},
        spaced=False),
    "TCDScheduler": SchedulerClass(
        "tcd", implemented={"original_inference_steps": (50,)},
        # its step neither clips nor reaches the final alpha, and its timesteps are LCM's whatever the spacing
        ignored=("clip_sample", "clip_sample_range", "set_alpha_to_one", "steps_offset", "timestep_spacing",
                 "timestep_scaling"),
        defaults={"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False},
        spaced=False),
}
# what a refused setting of a class can be replaced with, where that is not just the expected value
REFUSAL_HINTS = {
    ("PNDMScheduler", "skip_prk_steps"): "PNDM's Runge-Kutta warm-up steps are not implemented; set skip_prk_steps "
                                         "true (PLMS, as Stable Diffusion 1.x ships it) or save a DDIMScheduler "
                                         "config there",
}


def _sampler_name(class_name: str, settings: dict[str, Any]) -> str:
    """The sampler of ``SAMPLER_NAMES`` that computes what ``class_name`` with ``settings`` (its implemented keys)
    computes."""
    if class_name == "DPMSolverMultistepScheduler":
        sde = settings["algorithm_type"] == "sde-dpmsolver++"
        return "dpmpp-2m" + ("-sde" if sde else "") + ("-karras" if settings["use_karras_sigmas"] else "")
    if class_name == "UniPCMultistepScheduler":
        return "unipc" if settings["solver_order"] == 2 else f"unipc-{settings['solver_order']}"
    return SCHEDULER_CLASSES[class_name].sampler


def _same(value: Any, option: Any) -> bool:
    """Whether a parsed JSON ``value`` is ``option``: a flag or null exactly, a number of either type by value."""
    if isinstance(option, bool) or option is None:
        return value is option
    if isinstance(option, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == option
    return bool(value == option)


def _as_read(config: dict[str, Any], key: str, default: Any, class_name: str) -> str:
    """How a message names ``key``'s value: the value, or that the file leaves it out and what the class takes."""
    return describe(config[key]) if key in config else f"left out ({class_name}: {describe(default)})"


def _check_implemented(config: dict[str, Any], class_name: str, schedule: ScheduleConfig,
                       where: Path) -> dict[str, Any]:
    """The implemented keys of ``class_name`` as it reads them from ``config``; ``ImportRefusedError`` naming the
    first whose value our sampler does not compute."""
    spec = SCHEDULER_CLASSES[class_name]
    settings = {}
    for key, allowed in spec.implemented.items():
        default = spec.defaults.get(key, allowed[0])
        value = config.get(key, default)
        if key == "timestep_type" and schedule.prediction_type == "epsilon":
            continue  # diffusers' continuous timesteps act only on v-prediction
        if not any(_same(value, option) for option in allowed):
            expected = " or ".join(describe(option) for option in allowed)
            why = REFUSAL_HINTS.get((class_name, key), f"ldm-import samples it with {expected} only")
            raise ImportRefusedError(f"{where}: the {class_name}'s {key} is "
                                     f"{_as_read(config, key, default, class_name)}; {why}")
        settings[key] = value
    if class_name == "DPMSolverMultistepScheduler":
        _check_lambda_min_clipped(config.get("lambda_min_clipped", -math.inf), settings, schedule, where)
    return settings


def _check_lambda_min_clipped(value: Any, settings: dict[str, Any], schedule: ScheduleConfig, where: Path) -> None:
    """DPM-Solver's lambda_min_clipped leaves the numbers as they are where it clips no timestep of ``schedule``
    (or with Karras sigmas, which it does not touch); ``ImportRefusedError`` where it clips one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ImportRefusedError(f"{where}: the scheduler's lambda_min_clipped is {describe(value)}; expected a "
                                 f"number (diffusers: -Infinity)")
    alphas_cumprod = NoiseSchedule.from_config(schedule).alphas_cumprod
    lowest = float(np.min(0.5 * np.log(alphas_cumprod / (1.0 - alphas_cumprod))))
    if value > lowest and not settings["use_karras_sigmas"]:
        raise ImportRefusedError(f"{where}: the scheduler's lambda_min_clipped {value:g} clips this schedule's last "
                                 f"timesteps, which ldm's DPM-Solver++ does not; expected at most {lowest:.4g} "
                                 f"(diffusers: -Infinity)")


def schedule_from_diffusers(config: dict[str, Any], where: Path, log: Callable[[str], None] = lambda line: None,
                            ) -> tuple[ScheduleConfig, DDIMConfig, SamplerDefaults]:
    """scheduler_config.json -> (our ScheduleConfig, our DDIMConfig, our SamplerDefaults).

    The schedule is the file's class's reading. The DDIM settings are what StableDiffusionPipeline samples with a
    DDIMScheduler read from the file: DDIMScheduler's reading of the keys, the pipeline's rewrites (steps_offset 1,
    clip_sample false) and diffusers' step to t - T // N (``previous_timestep`` "diffusers"); a PNDM file's
    set_alpha_to_one is PNDMScheduler's reading, as PLMS takes it from there. The default sampler is the file's
    class (``SCHEDULER_CLASSES``), with the timestep_spacing the file gives (None: that sampler's own default, as
    diffusers' from_config carries no key a file leaves out) and steps_offset 1, for the classes that read them.

    ``log`` gets one line for each way the default sampler's numbers differ from what the file says or from what
    diffusers computes, with the model.json setting that changes it where there is one.
    """
    class_name = config.get("_class_name", "DDIMScheduler")
    if not isinstance(class_name, str) or class_name not in SCHEDULER_CLASSES:
        raise ImportRefusedError(f"{where} describes a {describe(class_name)}; ldm-import reads "
                                 f"{', '.join(SCHEDULER_CLASSES)} configs (save one of those there)")
    spec = SCHEDULER_CLASSES[class_name]
    known = {*SCHEDULER_DEFAULTS, *SCHEDULER_REFUSED, *SCHEDULER_THRESHOLDING_KEYS, *LEFTOVER_KEYS,
             *spec.implemented, *spec.ignored}
    unknown = sorted(key for key in config if not key.startswith("_") and key not in known)
    if unknown:
        raise ImportRefusedError(f"{where}: the scheduler's key {describe(unknown[0])} is not one ldm-import reads "
                                 f"for a {class_name}; expected some of {sorted(known)}")
    defaulted = config.get("_use_default_values", [])
    if not isinstance(defaulted, list) or not all(isinstance(key, str) for key in defaulted):
        raise ImportRefusedError(f"{where}: _use_default_values is {describe(defaulted)}; expected a list of key "
                                 f"names")
    config = {key: value for key, value in config.items() if key not in defaulted}  # as diffusers' from_config
    for key, allowed in SCHEDULER_REFUSED.items():
        if config.get(key, allowed) != allowed:
            raise ImportRefusedError(f"{where}: the scheduler's {key} is {describe(config[key])}; ldm-import takes "
                                     f"Stable Diffusion 1.x/2.x models, which have {describe(allowed)}")
    class_defaults = {**SCHEDULER_DEFAULTS, **spec.defaults}
    ddim_settings = {key: config.get(key, default) for key, default in SCHEDULER_DEFAULTS.items()}
    if class_name == "PNDMScheduler":  # PLMS's final alpha is the DDIM setting's
        ddim_settings["set_alpha_to_one"] = config.get("set_alpha_to_one", class_defaults["set_alpha_to_one"])
    beta_schedule = config.get("beta_schedule", class_defaults["beta_schedule"])
    if beta_schedule not in ("scaled_linear", "linear"):
        raise ImportRefusedError(f"{where}: beta_schedule {describe(beta_schedule)} is not one of 'scaled_linear', "
                                 f"'linear'")
    try:
        schedule = ScheduleConfig(**{key: config.get(key, class_defaults[key]) for key in SCHEDULE_KEYS})
        schedule.validate()
        as_written = DDIMConfig(timestep_spacing=ddim_settings["timestep_spacing"],
                                steps_offset=ddim_settings["steps_offset"],
                                set_alpha_to_one=ddim_settings["set_alpha_to_one"],
                                clip_sample=ddim_settings["clip_sample"],
                                clip_sample_range=ddim_settings["clip_sample_range"])
    except (ConfigError, ValueError) as error:
        raise ImportRefusedError(f"{where}: {error}") from None
    sampler_name = _sampler_name(class_name, _check_implemented(config, class_name, schedule, where))
    try:
        defaults = SamplerDefaults(name=sampler_name, steps=IMPORTED_STEPS,
                                   timestep_spacing=config.get("timestep_spacing") if spec.spaced else None,
                                   steps_offset=1 if spec.spaced else None)
    except ValueError as error:
        raise ImportRefusedError(f"{where}: {error}") from None
    ddim = dataclasses.replace(as_written, steps_offset=1, clip_sample=False, previous_timestep="diffusers")
    _say_differences(config, class_name, schedule, as_written, sampler_name, log, where)
    return schedule, ddim, defaults


def _say_differences(config: dict[str, Any], class_name: str, schedule: ScheduleConfig, as_written: DDIMConfig,
                     sampler_name: str, log: Callable[[str], None], where: Path) -> None:
    """One line to ``log`` for each way the default sampler differs from the file or from diffusers."""
    spec = SCHEDULER_CLASSES[class_name]
    class_defaults = {**SCHEDULER_DEFAULTS, **spec.defaults}
    spacing = config.get("timestep_spacing", class_defaults["timestep_spacing"])
    steps_offset = config.get("steps_offset", 0)
    offset_key = "sampler.steps_offset" if sampler_name == "ddim" else "default_sampler.steps_offset"
    if spec.spaced and steps_offset != 1 and spacing == "leading":
        log(f"{where}: steps_offset {steps_offset} is read as 1, as diffusers' StableDiffusionPipeline does (set "
            f"{offset_key} in model.json to sample with {steps_offset})")
    if class_name == "PNDMScheduler" and "set_alpha_to_one" not in config:
        log(f"{where}: set_alpha_to_one left out is read as false, as PNDMScheduler reads it (DDIMScheduler would "
            f"read true); model.json's sampler.set_alpha_to_one is the final alpha of both plms and ddim")
    if class_name in ("DDIMScheduler", "LCMScheduler") and config.get("clip_sample", class_defaults["clip_sample"]):
        how = "true" if "clip_sample" in config else "left out (DDIMScheduler: true)"
        change = " (set sampler.clip_sample in model.json to clip)" if sampler_name == "ddim" else ""
        log(f"{where}: clip_sample {how} is read as false, as diffusers' StableDiffusionPipeline does{change}")
    if sampler_name == "ddim" and as_written.timestep_spacing != "leading":
        log(f"{where}: the {as_written.timestep_spacing!r} spacing steps from t to t - "
            f"{schedule.num_train_timesteps} // steps as diffusers' DDIMScheduler does, not always to the next "
            f"timestep it visits (set sampler.previous_timestep \"listed\" in model.json for exact DDIM steps)")
    if sampler_name in ("euler", "euler-a") and spacing == "linspace":
        log(f"{where}: the 'linspace' spacing gives fractional timesteps for most step counts (those where "
            f"steps - 1 does not divide {schedule.num_train_timesteps - 1}); ldm's UNet sees the nearest integer, "
            f"diffusers' the fraction (set default_sampler.timestep_spacing \"trailing\" or \"leading\" in "
            f"model.json for whole ones)")
    if spec.spaced and spacing == "trailing":
        ours = "ldm's plms refuses those step counts" if sampler_name == "plms" else \
            "ldm takes exactly the steps asked for"
        log(f"{where}: for some step counts (61 of 1000 timesteps, for one) diffusers' 'trailing' spacing takes an "
            f"extra last step at timestep -1; {ours}")
