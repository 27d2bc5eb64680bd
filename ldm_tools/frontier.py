"""``ldm-eval frontier``: images per second against quality for a list of sampling configurations, in one run.

    ldm-eval frontier --model models/shapes-demo runs/demo-fp32 --json frontier.json --plot frontier.png \\
        --configs onnxruntime/fp32/{ddim:10,ddim:25,euler:6} onnxruntime/fp32/euler:6/gi=0.5-20 \\
        --baseline onnxruntime/fp32/ddim:25 --bar adherence-drop=0.02,fid-ratio=1.05

A configuration is ``ENGINE/PRECISION/SAMPLER:STEPS``, then any of ``/cache=N`` (DeepCache: the whole UNet one
step in N, the shallow part between; ``cache=N:quadratic`` for the paper's non-uniform schedule), ``/gi=LOW-HIGH``
(guidance only at the UNet calls whose noise level lies in (LOW, HIGH]; without it, at every call), ``/g=X`` (the
guidance scale, instead of the run's; 1 runs no unconditional row), ``/eta=X``
(DDIM's eta or TCD's gamma; without it, 0) and ``/model=NAME`` (the folders ``--variant NAME=FOLDER`` names
instead of ``--model``'s: a model distilled from it, such as ``ldm-train lcm`` writes, judged on the same prompts
and seeds). The torch engine runs the checkpoint dir among ``--model`` at PRECISION fp32, bf16 or fp16 (its
dtype); onnxruntime and tensorrt run the engine dir among ``--model`` exported at PRECISION; openvino runs the fp32
engine dir (else the only one) at PRECISION fp32 or bf16 (its inference precision).

Every configuration samples the same ``--num-prompts`` held-out prompts of ldm-eval (prompt i: seed ``--seed`` + i)
at its ``/g=``, else ``--guidance``, else its model's default guidance (the guidance a distilled model has in it is
its own), and is judged by:

- the reference distance, on any model: ``latent_rms``, the RMS of its final latents (as the UNet sees them)
  against a reference run's, and ``image_psnr_db``, the mean PSNR of its images against the reference's. The
  reference samples the same prompts and seeds at the same guidance with ``--reference-steps`` steps of the
  deterministic ``--reference-sampler`` in fp32, guidance at every call, no cache: a close solution of the same ODE,
  so the distance says how far a cheap setting lands from the sample it approximates;
- ldm-eval's judge (``--judge``; auto: where the attribute classifier draws at the model's image size, as for the
  demo model): adherence per attribute and the in-domain FID.

Speed: images per second of ``Pipeline.generate`` (text encoder, UNet, decoder) on ``--speed-images`` prompts in
batches of ``--batch-size`` (the same for every engine), after the sampling above has warmed every engine up; the
median of ``--repeats`` rounds in which the configurations take turns (each round in a rotated order), so that a
drift in the machine's load falls on all of them alike.

First image (``--first-image``, the default): per engine and precision, a new process loads the engine and makes
one image of that engine's first configuration, timed from the moment the process starts (imports included, as
ldm-bench times a worker's first image), twice in a row with one new compile cache folder: cold (the folder empty,
so the openvino engine compiles every graph) and warm (the folder as the cold run left it). Measured after the
timed rounds, once this process has let go of its engines.

The frontier of a quality metric is the configurations no other beats on both images/s and that metric. The bar
(``--bar``) holds terms relative to ``--baseline`` (``adherence-drop``: every attribute's adherence at most this
below the baseline's; ``fid-ratio``: FID at most this times the baseline's; ``latent-rms-ratio``: latent RMS at most
this times the baseline's) and absolute ones (``latent-rms``: at most; ``psnr-db``: at least); the fastest
configuration that meets every term is named, overall and per engine (whatever model it runs), beside the fastest
DDIM and the fastest without cache or guidance interval. A configuration its engine refuses (one that cannot load
here, a cache interval on an engine without feature caching) is reported as skipped, with the reason.

FID over a few hundred images is mostly its small-sample floor: ``fid_real_floor``, real images against as many
other real ones, is what a perfect generator scores at that count, and it shrinks about as 1/N (on the demo model
223 at 200 prompts, 47 at 1000). A ``fid-ratio`` bar then allows much more on the part of FID above the floor than
its nominal ratio; the summary holds that ratio (``fid_ratio_above_floor``: (ratio x baseline - floor) / (baseline -
floor)), and the report says so where it is more than three times as loose, with the prompt count that tightens it.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from ldm_runtime.command_line import OneLineArgumentParser, finite_float, report_user_error
from ldm_runtime.config import CACHE_SCHEDULES, ETA_SAMPLERS, MAX_CACHE_INTERVAL, MAX_GUIDANCE_SCALE, is_guidance_scale
from ldm_runtime.engines import CHECKPOINT_MARKER, ENGINE_DIR_MARKER, engine_for_flags, load_engine
from ldm_runtime.engines.compile_cache import CACHE_ENV
from ldm_runtime.errors import RequestError, UserError
from ldm_runtime.files import write_text_atomic
from ldm_runtime.manifest import load_manifest
from ldm_runtime.noise import MAX_SEED
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from ldm_runtime.schedulers import SAMPLER_NAMES
from ldm_tools.evaluate import (
    DEFAULT_CLASSIFIER,
    MAX_PSNR_DB,
    add_device_flag,
    add_prompt_seed_flags,
    check_writable_file,
    heldout_prompts,
    load_judge,
    real_image_sets,
    score_samples,
)

PROG = "ldm-eval frontier"
# the precisions each engine can be asked for (torch and triton: the networks' dtype; onnxruntime and tensorrt: the
# engine dir's; openvino: its inference precision)
ENGINE_PRECISIONS = {"torch": ("fp32", "bf16", "fp16"), "triton": ("fp16", "bf16", "fp32"),
                     "onnxruntime": ("fp32", "fp16"), "tensorrt": ("fp32", "fp16"), "openvino": ("fp32", "bf16")}
CHECKPOINT_ENGINES = ("torch", "triton")
DETERMINISTIC_SAMPLERS = ("ddim", "euler", "dpmpp-2m", "dpmpp-2m-karras", "unipc", "unipc-3", "plms")
CONFIG_SYNTAX = "ENGINE/PRECISION/SAMPLER:STEPS[/cache=N[:SCHEDULE]][/gi=LOW-HIGH][/g=X][/eta=X][/model=NAME]"
BAR_TERMS = ("adherence-drop", "fid-ratio", "latent-rms", "latent-rms-ratio", "psnr-db")
RELATIVE_TERMS = ("adherence-drop", "fid-ratio", "latent-rms-ratio")  # against --baseline's values
RATIO_TERMS = ("fid-ratio", "latent-rms-ratio")
JUDGE_TERMS = ("adherence-drop", "fid-ratio")  # the shapes judge's
REFERENCE_TERMS = ("latent-rms", "latent-rms-ratio", "psnr-db")
# quality metrics: (label, +1 where higher is better, -1 where lower is)
METRICS = {"adherence": ("adherence, every attribute", 1), "fid_in_domain": ("in-domain FID", -1),
           "latent_rms": ("RMS of final latents against the reference", -1),
           "image_psnr_db": ("PSNR against the reference's images (dB)", 1)}
# a guidance interval that holds every noise level: guidance at every call, also on a model whose default_sampler
# names an interval (a request's None would take that default)
EVERY_NOISE_LEVEL = (0.0, sys.float_info.max)


class FrontierError(UserError, ValueError):
    """A flag of ``ldm-eval frontier`` names something unusable; the message is one sentence for the CLI."""


@dataclass(frozen=True)
class SamplingConfig:
    """One point of the frontier: where it runs and how it samples (the ``GenerationRequest`` fields)."""

    engine: str
    precision: str
    sampler: str
    steps: int
    cache_interval: int = 1
    cache_schedule: str = "uniform"
    guidance_interval: tuple[float, float] | None = None  # None: guidance at every call
    model: str | None = None  # a --variant's name; None: --model
    eta: float = 0.0  # DDIM's eta or TCD's gamma
    guidance_scale: float | None = None  # None: the run's (--guidance, else the model's default)

    @property
    def name(self) -> str:
        """The configuration as ``parse_config`` reads it back, without options that change nothing."""
        return f"{self.engine_key}/{self.sampling}"

    @property
    def sampling(self) -> str:
        """The configuration without its engine and precision: ``euler:6/cache=2/gi=0.5-20``."""
        text = f"{self.sampler}:{self.steps}"
        if self.cache_interval > 1:
            text += f"/cache={self.cache_interval}" + (":quadratic" if self.cache_schedule == "quadratic" else "")
        if self.guidance_interval is not None:
            text += f"/gi={self.guidance_interval[0]:g}-{self.guidance_interval[1]:g}"
        if self.guidance_scale is not None:
            text += f"/g={self.guidance_scale:g}"
        if self.eta:
            text += f"/eta={self.eta:g}"
        if self.model is not None:
            text += f"/model={self.model}"
        return text

    @property
    def engine_key(self) -> str:
        """The engine and precision: what the summary compares configurations within."""
        return f"{self.engine}/{self.precision}"

    @property
    def load_key(self) -> str:
        """The engine, precision and model: one loaded engine each."""
        return self.engine_key + (f"@{self.model}" if self.model is not None else "")

    @property
    def sampler_alone(self) -> bool:
        """Whether only the sampler and its steps save work: no feature caching, guidance at every call (not scale 1,
        which runs no unconditional row)."""
        return self.cache_interval == 1 and self.guidance_interval is None and self.guidance_scale != 1.0

    def guidance_for(self, run_guidance_scale: float) -> float:
        """The guidance scale this configuration samples at: its ``/g=``, else the run's."""
        return run_guidance_scale if self.guidance_scale is None else self.guidance_scale

    def request(self, prompt: str, seed: int, guidance_scale: float) -> GenerationRequest:
        """The request for ``prompt`` at ``seed``; ``guidance_scale`` is the run's (``guidance_for``)."""
        return GenerationRequest(prompt=prompt, seed=seed, sampler=self.sampler, steps=self.steps,
                                 guidance_scale=self.guidance_for(guidance_scale),
                                 guidance_interval=self.guidance_interval or EVERY_NOISE_LEVEL,
                                 cache_interval=self.cache_interval, cache_schedule=self.cache_schedule,
                                 eta=self.eta)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.name, "engine": self.engine, "precision": self.precision, "sampler": self.sampler,
                "steps": self.steps, "cache_interval": self.cache_interval, "cache_schedule": self.cache_schedule,
                "guidance_interval": list(self.guidance_interval) if self.guidance_interval else None,
                "model": self.model, "eta": self.eta, "config_guidance_scale": self.guidance_scale}


def number_or_nan(text: str) -> float:
    """``text`` as a float, NaN where it is none (the checks after it then refuse it in their own words)."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def parse_config(text: str) -> SamplingConfig:
    """``"onnxruntime/fp32/ddim:10/cache=2/gi=0.5-8"`` -> ``SamplingConfig``; ``FrontierError`` naming ``text``."""

    def bad(why: str) -> FrontierError:
        return FrontierError(f"configuration {text!r} {why}; expected {CONFIG_SYNTAX}")

    parts = text.strip().split("/")
    if len(parts) < 3:
        raise bad("has fewer than three parts")
    engine, precision, sampling, *options = parts
    if engine not in ENGINE_PRECISIONS:
        raise bad(f"names engine {engine!r}, not one of {', '.join(ENGINE_PRECISIONS)}")
    if precision not in ENGINE_PRECISIONS[engine]:
        raise bad(f"names precision {precision!r}, which the {engine} engine does not have (it has "
                  f"{', '.join(ENGINE_PRECISIONS[engine])})")
    sampler, _, steps = sampling.partition(":")
    if sampler not in SAMPLER_NAMES:
        raise bad(f"names sampler {sampler!r}, not one of {', '.join(SAMPLER_NAMES)}")
    if not steps.isdigit() or int(steps) < 1:
        raise bad(f"has steps {steps!r}, not a positive integer")
    values: dict[str, Any] = {}
    for option in options:
        key, equals, value = option.partition("=")
        if not equals or key not in ("cache", "gi", "g", "eta", "model"):
            raise bad(f"has option {option!r}, not one of cache=N[:SCHEDULE], gi=LOW-HIGH, g=X, eta=X, model=NAME")
        if key in values:
            raise bad(f"gives {key}= twice")
        if key == "cache":
            interval, colon, schedule = value.partition(":")
            if not interval.isdigit() or not 1 <= int(interval) <= MAX_CACHE_INTERVAL:
                raise bad(f"has cache interval {interval!r}, not an integer from 1 to {MAX_CACHE_INTERVAL}")
            if colon and schedule not in CACHE_SCHEDULES:
                raise bad(f"has cache schedule {schedule!r}, not one of {', '.join(CACHE_SCHEDULES)}")
            values[key] = (int(interval), schedule or "uniform")
        elif key == "eta":
            eta = number_or_nan(value)
            if not 0 <= eta <= 1:
                raise bad(f"has eta {value!r}, not a number from 0 to 1")
            if eta and sampler not in ETA_SAMPLERS:
                raise bad(f"gives eta to the {sampler} sampler, which takes none (only {' and '.join(ETA_SAMPLERS)} "
                          f"do)")
            values[key] = eta
        elif key == "g":
            scale = number_or_nan(value)
            if not is_guidance_scale(scale):
                raise bad(f"has guidance scale {value!r}, not a number from 0 to {MAX_GUIDANCE_SCALE:g}")
            values[key] = scale
        elif key == "model":
            if not value.strip():
                raise bad("has an empty model name")
            values[key] = value.strip()
        else:
            ends = value.split("-")
            low, high = (number_or_nan(end) for end in ends) if len(ends) == 2 else (math.nan, math.nan)
            if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < high):
                raise bad(f"has guidance interval {value!r}, not two noise levels LOW-HIGH with 0 <= LOW < HIGH")
            values[key] = (low, high)
    cache_interval, cache_schedule = values.get("cache", (1, "uniform"))
    return SamplingConfig(engine, precision, sampler, int(steps), cache_interval,
                          cache_schedule if cache_interval > 1 else "uniform", values.get("gi"), values.get("model"),
                          values.get("eta", 0.0), values.get("g"))


def parse_bar(text: str) -> dict[str, float]:
    """``"adherence-drop=0.02,fid-ratio=1.05"`` -> ``{"adherence-drop": 0.02, "fid-ratio": 1.05}``."""
    bar: dict[str, float] = {}
    for term in text.split(","):
        key, equals, value = term.strip().partition("=")
        number = number_or_nan(value) if equals else math.nan
        if key in bar:
            raise FrontierError(f"--bar term {term.strip()!r} gives {key} a second time; expected each term once")
        if key not in BAR_TERMS or not math.isfinite(number):
            raise FrontierError(f"--bar term {term.strip()!r} is not one of {', '.join(BAR_TERMS)} given once as "
                                f"NAME=NUMBER")
        if number < 0 or (key in RATIO_TERMS and number == 0):
            raise FrontierError(f"--bar term {term.strip()!r} is negative{' or zero' if key in RATIO_TERMS else ''}; "
                                f"expected a {'positive' if key in RATIO_TERMS else 'non-negative'} number")
        bar[key] = number
    return bar


# --- the frontier and the bar: pure functions of the measured results ---------------------------------------


def pareto_front(speeds: Sequence[float], qualities: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point beats, fastest first. Point i is ``speeds[i]`` and the quality vector
    ``qualities[i]``, higher better in every coordinate (negate a metric where lower is better); j beats i when it
    is at least as good in every coordinate and better in one. Equal points are all kept."""
    points = [(float(speed), *map(float, quality)) for speed, quality in zip(speeds, qualities)]
    assert len(points) == len(speeds) == len(qualities)

    def beats(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    front = [i for i, point in enumerate(points) if not any(beats(other, point) for other in points)]
    return sorted(front, key=lambda i: -points[i][0])


def metric_value(result: dict[str, Any], metric: str) -> float | None:
    """A result's value of ``metric`` (one of ``METRICS``; adherence: every attribute), None where not measured."""
    value = result.get("adherence", {}).get("all") if metric == "adherence" else result.get(metric)
    return None if value is None else float(value)


def meets_bar(result: dict[str, Any], baseline: dict[str, Any] | None, bar: dict[str, float]) -> bool:
    """Whether ``result`` meets every term of ``bar`` (``parse_bar``); relative terms read ``baseline``'s values
    (an attribute the baseline's prompts never state, NaN, is not judged)."""
    if any(term in RELATIVE_TERMS for term in bar) and (baseline is None or baseline.get("status") != "ok"):
        return False
    if "adherence-drop" in bar:
        for attribute, floor in baseline["adherence"].items():
            if not math.isnan(floor) and result["adherence"][attribute] < floor - bar["adherence-drop"] - 1e-9:
                return False
    if "fid-ratio" in bar and result["fid_in_domain"] > baseline["fid_in_domain"] * bar["fid-ratio"]:
        return False
    if "latent-rms" in bar and result["latent_rms"] > bar["latent-rms"]:
        return False
    if "latent-rms-ratio" in bar and result["latent_rms"] > baseline["latent_rms"] * bar["latent-rms-ratio"]:
        return False
    return not ("psnr-db" in bar and result["image_psnr_db"] < bar["psnr-db"])


def fid_ratio_above_floor(fid_ratio: float, baseline_fid: float, floor: float) -> float | None:
    """The ratio a ``fid-ratio`` bar allows on the part of FID above the small-sample ``floor`` (real images against
    real images at the same count): (ratio x baseline - floor) / (baseline - floor); None where the baseline is not
    above the floor."""
    if not baseline_fid > floor:
        return None
    return (fid_ratio * baseline_fid - floor) / (baseline_fid - floor)


def summarize(results: list[dict[str, Any]], baseline_name: str | None, bar: dict[str, float],
              fid_floor: float | None = None) -> dict[str, Any]:
    """The frontier of every measured metric, and with a bar, the fastest configuration that meets it overall and
    per engine, beside the fastest DDIM and the fastest sampler alone (no cache, no guidance interval) that do.
    Marks each result's ``on_frontier`` (metrics) and ``meets_bar``. With ``fid_floor`` (the judge's
    ``fid_real_floor``) and a ``fid-ratio`` term, also ``fid_ratio_above_floor`` (``fid_ratio_above_floor()``)."""
    done = [result for result in results if result["status"] == "ok"]
    frontier: dict[str, list[str]] = {}
    for metric, (_, sign) in METRICS.items():
        measured = [result for result in done if metric_value(result, metric) is not None]
        if not measured:
            continue
        front = pareto_front([result["images_per_s"] for result in measured],
                             [[sign * metric_value(result, metric)] for result in measured])
        frontier[metric] = [measured[i]["config"] for i in front]
    for result in done:
        result["on_frontier"] = [metric for metric, names in frontier.items() if result["config"] in names]
    summary: dict[str, Any] = {"frontier": frontier, "bar": bar, "baseline": baseline_name}
    if not bar:
        return summary
    baseline = next((result for result in results if result["config"] == baseline_name), None)
    for result in done:
        result["meets_bar"] = meets_bar(result, baseline, bar)
    if "fid-ratio" in bar and fid_floor is not None and baseline is not None and baseline["status"] == "ok":
        loose = fid_ratio_above_floor(bar["fid-ratio"], baseline["fid_in_domain"], fid_floor)
        summary["fid_floor"] = fid_floor
        summary["fid_ratio_above_floor"] = None if loose is None else round(loose, 4)
    passing = [result for result in done if result["meets_bar"]]

    def fastest(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
        return max(candidates, key=lambda result: result["images_per_s"], default=None)

    def ratio(top: dict[str, Any] | None, other: dict[str, Any] | None) -> float | None:
        return None if top is None or other is None else round(top["images_per_s"] / other["images_per_s"], 3)

    best = fastest(passing)
    summary["fastest_within_bar"] = best and best["config"]
    summary["speedup_over_baseline"] = ratio(best, baseline if baseline and baseline["status"] == "ok" else None)
    summary["by_engine"] = {}
    for key in dict.fromkeys(result["engine_key"] for result in done):
        group = [result for result in passing if result["engine_key"] == key]
        top = fastest(group)
        # what the fastest is judged against: --model's own settings (a --variant's are ways to save work too)
        own = [result for result in group if result.get("model") is None]
        ddim = fastest([result for result in own if result["sampler"] == "ddim"])
        alone = fastest([result for result in own if result["sampler_alone"]])
        summary["by_engine"][key] = {
            "fastest": top and top["config"], "images_per_s": top and top["images_per_s"],
            "fastest_ddim": ddim and ddim["config"], "speedup_over_fastest_ddim": ratio(top, ddim),
            "fastest_sampler_alone": alone and alone["config"], "speedup_over_sampler_alone": ratio(top, alone)}
    return summary


# --- measuring ------------------------------------------------------------------------------------------------


class RecordingEngine:
    """``engine`` with its work recorded: the latents each ``decode`` is given (a batch's final latents, host float32)
    and the UNet rows it runs whole and, under feature caching, shallow. Everything else passes through."""

    def __init__(self, engine):
        self._engine = engine
        self.decoded: list[np.ndarray] = []
        self.whole_rows = 0
        self.shallow_rows = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def decode(self, latents):
        self.decoded.append(np.asarray(self._engine.to_host(latents), dtype=np.float32))
        return self._engine.decode(latents)

    def unet(self, latents, *args):
        self.whole_rows += int(latents.shape[0])
        return self._engine.unet(latents, *args)

    def unet_with_deep_features(self, latents, *args):
        self.whole_rows += int(latents.shape[0])
        return self._engine.unet_with_deep_features(latents, *args)

    def unet_shallow(self, latents, *args):
        self.shallow_rows += int(latents.shape[0])
        return self._engine.unet_shallow(latents, *args)


@dataclass
class Sampled:
    """What one configuration made: ``images`` (N, H, W, 3) uint8, ``latents`` (N, C, h, w) float32 as the UNet
    sees them, and the UNet rows per image it ran whole and shallow."""

    images: np.ndarray
    latents: np.ndarray
    whole_rows_per_image: float
    shallow_rows_per_image: float


def sample(engine, requests: list[GenerationRequest], batch_size: int, progress: bool = False) -> Sampled:
    """``requests`` through ``Pipeline.generate`` at ``batch_size`` (``progress``: its bar over UNet calls), with
    their final latents. ``RequestError`` where the engine or sampler refuses them."""
    recorder = RecordingEngine(engine)
    images = Pipeline(recorder).generate(requests, batch_size=batch_size, progress=progress)
    latents = np.concatenate(recorder.decoded) * np.float32(engine.info.latent_scale_factor)
    assert len(latents) == len(requests), (len(latents), len(requests))
    return Sampled(np.stack(images), latents, recorder.whole_rows / len(requests),
                   recorder.shallow_rows / len(requests))


def reference_distance(sampled: Sampled, reference: Sampled) -> dict[str, float]:
    """``latent_rms``: the RMS over every element of the final latents' difference; ``image_psnr_db``: the mean
    per-image PSNR (pixels in [0, 1], at most ``MAX_PSNR_DB``) against the reference's images."""
    difference = sampled.latents.astype(np.float64) - reference.latents.astype(np.float64)
    mse = np.mean(((sampled.images.astype(np.float64) - reference.images.astype(np.float64)) / 255.0) ** 2,
                  axis=(1, 2, 3))
    psnr = np.minimum(10.0 * np.log10(1.0 / np.maximum(mse, 1e-30)), MAX_PSNR_DB)
    return {"latent_rms": float(np.sqrt(np.mean(difference ** 2))), "image_psnr_db": float(np.mean(psnr))}


def time_configs(runs: list[tuple[str, Pipeline, list[GenerationRequest]]], batch_size: int, repeats: int,
                 warm_up: bool = True) -> dict[str, list[float]]:
    """Images per second of each ``(name, pipeline, requests)``: a warm-up batch each (unless ``warm_up`` is
    False: they ran batches of this size just before), then ``repeats`` rounds in which every run takes one turn,
    round r starting at run r (mod their count)."""
    for _, pipeline, requests in runs if warm_up else []:
        pipeline.generate(requests[:batch_size], batch_size=batch_size)
    rates: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    with tqdm(total=repeats * len(runs), desc="timing", unit="run", dynamic_ncols=True, file=sys.stderr) as bar:
        for round_index in range(repeats):
            start = round_index % len(runs)
            for name, pipeline, requests in runs[start:] + runs[:start]:
                started = time.perf_counter()
                pipeline.generate(requests, batch_size=batch_size)
                rates[name].append(len(requests) / (time.perf_counter() - started))
                bar.update(1)
    return rates


# --- settings, folders and engines ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FrontierSettings:
    """Flags of ``ldm-eval frontier``; one source of truth for their defaults."""

    model: tuple[str, ...]
    configs: tuple[SamplingConfig, ...]
    json: str
    variants: dict[str, tuple[str, ...]] = field(default_factory=dict)  # --variant NAME=FOLDER
    plot: str | None = None
    baseline: SamplingConfig | None = None
    bar: dict[str, float] = field(default_factory=dict)
    judge: str = "auto"
    classifier: str = str(DEFAULT_CLASSIFIER)
    num_prompts: int = 200
    seed: int = 0
    data_seed: int = 0
    guidance: float | None = None  # None: each configuration's model's default
    batch_size: int = 16
    speed_images: int | None = None  # None: two batches
    repeats: int = 3
    reference_steps: int = 200
    reference_sampler: str = "ddim"
    reference_engine: str | None = None  # None: the first configuration's engine
    device: str = "auto"
    threads: int | None = None
    first_image: bool = True

    @property
    def all_configs(self) -> tuple[SamplingConfig, ...]:
        """The configurations, the baseline first where ``--configs`` does not name it."""
        if self.baseline is None or self.baseline in self.configs:
            return self.configs
        return (self.baseline, *self.configs)

    @property
    def reference(self) -> SamplingConfig | None:
        if self.reference_steps == 0:
            return None
        engine = self.reference_engine or self.configs[0].engine
        return SamplingConfig(engine, "fp32", self.reference_sampler, self.reference_steps)

    def validate(self) -> None:
        for name in ("num_prompts", "batch_size", "speed_images", "repeats"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FrontierError(f"--{name.replace('_', '-')} is {value}; expected a positive integer")
        if self.reference_steps < 0:
            raise FrontierError(f"--reference-steps is {self.reference_steps}; expected a positive integer, or 0 "
                                f"for no reference run")
        if self.reference_sampler not in DETERMINISTIC_SAMPLERS:
            raise FrontierError(f"--reference-sampler is {self.reference_sampler!r}; expected a deterministic "
                                f"sampler: {', '.join(DETERMINISTIC_SAMPLERS)}")
        if self.reference_engine is not None and "fp32" not in ENGINE_PRECISIONS.get(self.reference_engine, ()):
            raise FrontierError(f"--reference-engine is {self.reference_engine!r}; expected an engine that runs fp32: "
                                f"{', '.join(e for e, p in ENGINE_PRECISIONS.items() if 'fp32' in p)}")
        if self.guidance is not None and not is_guidance_scale(self.guidance):
            raise FrontierError(f"--guidance is {self.guidance:g}; expected a number from 0 to {MAX_GUIDANCE_SCALE:g}")
        if not 0 <= self.seed <= MAX_SEED - self.num_prompts:
            raise FrontierError(f"--seed is {self.seed}; expected an integer from 0 to {MAX_SEED - self.num_prompts} "
                                f"(2**63 - --num-prompts: prompt i uses seed + i)")
        unknown = [config.name for config in self.all_configs if config.model not in (None, *self.variants)]
        if unknown:
            raise FrontierError(f"configuration {unknown[0]} names a model that no --variant NAME=FOLDER gives "
                                f"(variants: {', '.join(self.variants) or 'none'})")
        used = {config.model for config in self.all_configs}
        unused = [name for name in self.variants if name not in used]
        if unused:
            raise FrontierError(f"--variant {unused[0]}={self.variants[unused[0]][0]} names a model no configuration "
                                f"runs; expected a configuration with /model={unused[0]} in --configs or --baseline")
        repeated = [config.name for index, config in enumerate(self.configs) if config in self.configs[:index]]
        if repeated:
            raise FrontierError(f"--configs names {repeated[0]} twice; expected each configuration once")
        if any(term in RELATIVE_TERMS for term in self.bar) and self.baseline is None:
            raise FrontierError(f"--bar {','.join(self.bar)} has terms relative to a baseline; expected --baseline "
                                f"CONFIG too")
        if self.judge == "none" and any(term in JUDGE_TERMS for term in self.bar):
            raise FrontierError("--bar with adherence-drop or fid-ratio needs the shapes judge; expected --judge "
                                "shapes or auto")
        if self.reference is None and any(term in REFERENCE_TERMS for term in self.bar):
            raise FrontierError("--bar with latent-rms, latent-rms-ratio or psnr-db needs the reference run; expected "
                                "--reference-steps above 0")
        if self.plot is not None and self.judge == "none" and self.reference is None:
            raise FrontierError(f"--plot {self.plot} has no quality metric to plot images/s against with --judge none "
                                f"and --reference-steps 0; expected --reference-steps above 0 or a judge")
        check_writable_file("--json", Path(self.json))
        if self.plot is not None:
            check_writable_file("--plot", Path(self.plot))


@dataclass(frozen=True)
class ModelFolders:
    """The folders of ``--model``: at most one checkpoint dir, and engine dirs by their manifest's precision."""

    checkpoint: Path | None
    engine_dirs: dict[str, Path]

    @classmethod
    def from_paths(cls, paths: Sequence[str]) -> ModelFolders:
        checkpoint, engine_dirs = None, {}
        for text in paths:
            folder = Path(text)
            if (folder / CHECKPOINT_MARKER).is_file():
                if checkpoint is not None:
                    raise FrontierError(f"--model names two checkpoint dirs ({checkpoint}, {folder}); expected one")
                checkpoint = folder
            elif (folder / ENGINE_DIR_MARKER).is_file():
                try:
                    precision = load_manifest(folder).precision
                except UserError as error:
                    raise FrontierError(f"--model {folder} cannot be opened: {error}") from None
                if precision in engine_dirs:
                    raise FrontierError(f"--model names two {precision} engine dirs ({engine_dirs[precision]}, "
                                        f"{folder}); expected one per precision")
                engine_dirs[precision] = folder
            else:
                raise FrontierError(f"--model {text} is neither a checkpoint dir ({CHECKPOINT_MARKER}) nor an engine "
                                    f"dir ({ENGINE_DIR_MARKER})")
        return cls(checkpoint, engine_dirs)

    def folder_for(self, config: SamplingConfig) -> Path:
        """The folder ``config``'s engine runs; ``FrontierError`` where ``--model`` has none for it."""
        if config.engine in CHECKPOINT_ENGINES:
            if self.checkpoint is None:
                raise FrontierError(f"configuration {config.name} runs on {config.engine}, which needs a checkpoint "
                                    f"dir ({CHECKPOINT_MARKER}) among --model")
            return self.checkpoint
        if config.engine == "openvino" and self.engine_dirs:
            return self.engine_dirs.get("fp32") or next(iter(self.engine_dirs.values()))
        if config.precision not in self.engine_dirs:
            held = ", ".join(self.engine_dirs) or "none"
            raise FrontierError(f"configuration {config.name} runs on {config.engine} at {config.precision}, which "
                                f"needs an engine dir exported at {config.precision} among --model (engine dirs "
                                f"there: {held})")
        return self.engine_dirs[config.precision]


def model_folders(settings: FrontierSettings) -> dict[str | None, ModelFolders]:
    """The folders of ``--model`` (None) and of each ``--variant`` (its name)."""
    folders: dict[str | None, ModelFolders] = {None: ModelFolders.from_paths(settings.model)}
    for name, paths in settings.variants.items():
        try:
            folders[name] = ModelFolders.from_paths(paths)
        except FrontierError as error:
            raise FrontierError(f"--variant {name}: {error}") from None
    return folders


def load_engines(keys: list[SamplingConfig], folders: dict[str | None, ModelFolders], device: str,
                 threads: int | None) -> dict[str, Any]:
    """One engine per engine, precision and model of ``keys`` (``SamplingConfig.load_key``): the engine, or the
    reason (a string) it cannot load here."""
    engines: dict[str, Any] = {}
    for config in keys:
        if config.load_key in engines:
            continue
        folder = folders[config.model].folder_for(config)
        try:
            if config.engine in CHECKPOINT_ENGINES:
                import torch

                if threads is not None:
                    torch.set_num_threads(threads)
                dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
                engines[config.load_key] = load_engine(folder, engine=config.engine, device=device,
                                                       dtype=dtypes[config.precision])
            else:
                precision = config.precision if config.engine == "openvino" else None
                name, options = engine_for_flags(folder, config.engine, device, precision, threads)
                engines[config.load_key] = load_engine(folder, engine=name, device=device, **options)
        except UserError as error:
            engines[config.load_key] = f"the {config.engine} engine cannot run {folder} at {config.precision} " \
                                       f"here: {error}"
    return engines


def _first_image_child(connection, config: SamplingConfig, folders: dict[str | None, ModelFolders], device: str,
                       threads: int | None, request: GenerationRequest, cache_dir: str) -> None:
    """In a new process: load ``config``'s engine with its compile cache in ``cache_dir``, make ``request``'s image,
    report ("ok", None) or ("error", the reason in one line)."""
    os.environ[CACHE_ENV] = cache_dir
    try:
        engine = load_engines([config], folders, device, threads)[config.load_key]
        if isinstance(engine, str):
            raise FrontierError(engine)
        Pipeline(engine).generate([request], batch_size=1)
    except BaseException as error:  # the parent reports it beside the figures
        from ldm_tools.bench.workers import one_line

        connection.send(("error", one_line(error)))
        return
    connection.send(("ok", None))


def first_image_seconds(config: SamplingConfig, folders: dict[str | None, ModelFolders], device: str,
                        threads: int | None,
                        request: GenerationRequest) -> dict[str, Any]:
    """Seconds from a new process's start to ``request``'s image on ``config``'s engine, with its compile cache in a
    new folder (cold), then again in the folder the first left (warm): {"cold_s", "warm_s"}, or {"error"}."""
    from ldm_tools.bench.workers import exit_reason

    context = multiprocessing.get_context("spawn")
    cache_dir = tempfile.mkdtemp(prefix="ldm-frontier-cache-")
    seconds: dict[str, Any] = {}
    try:
        for kind in ("cold_s", "warm_s"):
            receiver, sender = context.Pipe(duplex=False)
            started = time.perf_counter()
            process = context.Process(target=_first_image_child, daemon=True, name=f"{PROG} first image",
                                      args=(sender, config, folders, device, threads, request, cache_dir))
            process.start()
            sender.close()
            try:
                status, value = receiver.recv()
            except EOFError:  # it died without a word
                process.join()
                status, value = "error", exit_reason(process.exitcode)
            elapsed = time.perf_counter() - started
            process.join()
            if status != "ok":
                return {"error": value}
            seconds[kind] = round(elapsed, 3)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return seconds


def machine_info() -> dict[str, Any]:
    """The CPU (model name and its SIMD flags), cores and library versions the figures were measured with."""
    from importlib import metadata

    from ldm_tools.bench.workers import cpu_info

    cpu, flags = cpu_info()
    simd = sorted(flag for flag in flags if flag in ("avx", "avx2", "fma", "f16c") or flag.startswith(("avx512", "amx"))
                  or "vnni" in flag)
    versions = {}
    for package in ("torch", "onnxruntime", "openvino", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cpu_flags": simd, "cores": os.cpu_count(), "python": platform.python_version(),
            "versions": versions, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


# --- the whole run ----------------------------------------------------------------------------------------------


def run_frontier(settings: FrontierSettings) -> dict[str, Any]:
    """Sample, judge and time every configuration; the report (what ``--json`` receives)."""
    settings.validate()
    folders = model_folders(settings)
    configs = list(settings.all_configs)
    for config in configs:
        folders[config.model].folder_for(config)  # every configuration has its folder before anything loads
    reference_config = settings.reference
    engines = load_engines(configs + ([reference_config] if reference_config else []), folders, settings.device,
                           settings.threads)
    if reference_config is not None and isinstance(engines[reference_config.load_key], str):
        raise FrontierError(f"the reference run cannot load: {engines[reference_config.load_key]}")
    loaded = [engine for engine in engines.values() if not isinstance(engine, str)]
    if not loaded:
        raise FrontierError(f"no configuration's engine loads here: {next(iter(engines.values()))}")
    image_size = loaded[0].info.image_size
    other_size = next((key for key, engine in engines.items()
                       if not isinstance(engine, str) and engine.info.image_size != image_size), None)
    if other_size is not None:
        raise FrontierError(f"{other_size} draws {engines[other_size].info.image_size} px images and "
                            f"{next(iter(engines))} {image_size} px; expected every --model and --variant to draw "
                            f"at the same size")
    # each configuration's guidance: --guidance, else its model's default (a distilled model's is its own)
    guidance = {key: settings.guidance if settings.guidance is not None else Pipeline(engine).default_guidance_scale
                for key, engine in engines.items() if not isinstance(engine, str)}
    count = settings.num_prompts
    captions, truths = heldout_prompts(count, image_size, settings.data_seed)
    seeds = [settings.seed + index for index in range(count)]
    judge = resolve_judge(settings, image_size)
    if settings.plot is not None and judge is None and reference_config is None:
        raise FrontierError(f"--plot {settings.plot} has no quality metric to plot images/s against: --judge "
                            f"{settings.judge} has no classifier for {image_size} px images and --reference-steps is "
                            f"0; expected --reference-steps above 0")

    # every engine takes the same batch: the smallest that all of them hold
    batch_size = min([settings.batch_size] + [engine.info.max_images for engine in loaded])

    def requests_of(config: SamplingConfig, number: int = count) -> list[GenerationRequest]:
        return [config.request(captions[index % count], settings.seed + index, guidance[config.load_key])
                for index in range(number)]

    reference = None
    if reference_config is not None:
        print(f"{PROG}: the reference run, {reference_config.name}", file=sys.stderr, flush=True)
        try:
            reference = sample(engines[reference_config.load_key], requests_of(reference_config), batch_size,
                               progress=True)
        except RequestError as error:
            raise FrontierError(f"the reference run {reference_config.name} cannot sample: {error}") from None

    results: list[dict[str, Any]] = []
    fid_floor = None
    kept: list[tuple[SamplingConfig, dict[str, Any]]] = []
    for config in tqdm(configs, desc="sampling", unit="config", dynamic_ncols=True, file=sys.stderr):
        result = {**config.to_dict(), "engine_key": config.engine_key, "sampler_alone": config.sampler_alone}
        results.append(result)
        engine = engines[config.load_key]
        if isinstance(engine, str):
            result.update(status="skipped", reason=engine)
            continue
        try:
            sampled = sample(engine, requests_of(config), batch_size)
        except RequestError as error:
            result.update(status="skipped", reason=f"the {config.engine} engine refuses it: {error}")
            continue
        result.update(status="ok", guidance_scale=config.guidance_for(guidance[config.load_key]),
                      whole_unet_rows_per_image=round(sampled.whole_rows_per_image, 3),
                      shallow_unet_rows_per_image=round(sampled.shallow_rows_per_image, 3))
        if reference is not None:
            result.update({name: round(value, 6) for name, value in reference_distance(sampled, reference).items()})
        if judge is not None:
            classifier, real_reference, real_floor = judge
            scores = score_samples(sampled.images, truths, captions, real_reference, real_floor, classifier)
            result.update(adherence={name: round(float(value), 4) for name, value in scores["adherence"].items()},
                          fid_in_domain=round(float(scores["fid_in_domain"]), 3))
            fid_floor = round(float(scores["fid_real_floor"]), 3)  # the same for every configuration
        kept.append((config, result))

    if kept:
        speed_images = settings.speed_images or 2 * settings.batch_size
        pipelines = {key: Pipeline(engine) for key, engine in engines.items() if not isinstance(engine, str)}
        runs = [(config.name, pipelines[config.load_key], requests_of(config, speed_images)) for config, _ in kept]
        # the sampling above ran full batches of this size (and warmed every engine up) where there are enough prompts
        rates = time_configs(runs, batch_size, settings.repeats, warm_up=count < batch_size)
        for config, result in kept:
            median = float(np.median(rates[config.name]))
            result.update(images_per_s=round(median, 3), images_per_s_rounds=[round(r, 3) for r in rates[config.name]],
                          images_per_s_spread=round((max(rates[config.name]) - min(rates[config.name])) / median, 3))
        del pipelines, runs

    first_images: dict[str, Any] = {}
    if settings.first_image:
        # the new processes get the machine to themselves: this one lets go of its engines (GBs at SD's size) first
        del engine  # the sampling loop's last
        engines.clear()
        loaded.clear()
        gc.collect()
        engine_configs: dict[str, SamplingConfig] = {}
        for config, _ in kept:
            engine_configs.setdefault(config.load_key, config)  # each engine's first configuration
        for key, config in tqdm(engine_configs.items(), desc="first image", unit="engine", dynamic_ncols=True,
                                file=sys.stderr):
            first_images[key] = {"config": config.name, **first_image_seconds(
                config, folders, settings.device, settings.threads, requests_of(config, 1)[0])}
        for config, result in kept:
            result["first_image"] = {name: value for name, value in first_images[config.load_key].items()
                                     if name != "config"}

    baseline_name = settings.baseline.name if settings.baseline else None
    summary = summarize(results, baseline_name, settings.bar, fid_floor)
    return {
        "machine": machine_info(),
        "settings": {
            "model": list(settings.model), "variants": {name: list(paths) for name, paths in settings.variants.items()},
            "configs": [config.name for config in configs],
            "baseline": baseline_name, "bar": settings.bar, "judge": "shapes" if judge else "none",
            "num_prompts": count, "seeds": f"{seeds[0]}..{seeds[-1]}", "data_seed": settings.data_seed,
            "guidance": settings.guidance, "batch_size": batch_size,
            "speed_images": settings.speed_images or 2 * settings.batch_size, "repeats": settings.repeats,
            "reference": reference_config.name if reference_config else None, "device": settings.device,
            "threads": settings.threads, "first_image": settings.first_image,
        },
        "fid_real_floor": fid_floor,
        "first_image": first_images,
        "results": results,
        "summary": summary,
    }


def resolve_judge(settings: FrontierSettings, image_size: int):
    """(classifier, real reference images, real floor images) where the shapes judge runs, else None."""
    if settings.judge == "none":
        return None
    if settings.judge == "auto" and not (Path(settings.classifier) / "classifier.json").is_file():
        return None
    classifier, _ = load_judge(settings.classifier)
    if classifier.config.image_size != image_size:
        if settings.judge == "auto" and not any(term in JUDGE_TERMS for term in settings.bar):
            return None
        raise FrontierError(f"--judge {settings.judge} judges {classifier.config.image_size} px images with "
                            f"{settings.classifier}; the model draws {image_size} px ones")
    if settings.num_prompts < 2:
        raise FrontierError("--num-prompts is 1; the shapes judge's FID needs at least 2")
    return (classifier, *real_image_sets(settings.num_prompts, image_size, settings.data_seed))


# --- what a person reads: the table, the summary and the plot ---------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """The results as a markdown table, the skipped configurations, the frontiers and the bar's verdict."""
    results, summary = report["results"], report["summary"]
    judged = any("adherence" in result for result in results)
    referenced = any("latent_rms" in result for result in results)
    header = ["configuration", "UNet rows / image (whole + shallow)", "images/s (spread)"]
    header += ["shape / colour / all", "FID"] if judged else []
    header += ["latent RMS", "PSNR (dB)"] if referenced else []
    header += ["frontier"] if summary["frontier"] else []
    header += ["meets the bar"] if summary["bar"] else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        if result["status"] != "ok":
            continue
        row = [result["config"], f"{result['whole_unet_rows_per_image']:g} + {result['shallow_unet_rows_per_image']:g}",
               f"{result['images_per_s']:.2f} ({result['images_per_s_spread']:.0%})"]
        if judged:
            adherence = result["adherence"]
            row += [f"{adherence['shape']:.3f} / {adherence['color']:.3f} / {adherence['all']:.3f}",
                    f"{result['fid_in_domain']:.1f}"]
        if referenced:
            row += [f"{result['latent_rms']:.4f}", f"{result['image_psnr_db']:.1f}"]
        row += [", ".join(result["on_frontier"])] if summary["frontier"] else []
        row += ["yes" if result["meets_bar"] else ""] if summary["bar"] else []
        lines.append("| " + " | ".join(row) + " |")
    lines += [f"skipped {result['config']}: {result['reason']}" for result in results if result["status"] != "ok"]
    for key, first in report.get("first_image", {}).items():
        lines.append(f"first image on {key} (a new process, one image of {first['config']}): "
                     + (f"cold {first['cold_s']:.1f} s, warm {first['warm_s']:.1f} s" if "error" not in first
                        else f"not measured: {first['error']}"))
    speeds = {result["config"]: result.get("images_per_s") for result in results}
    for metric, names in summary["frontier"].items():
        lines.append(f"frontier, images/s against {METRICS[metric][0]}: "
                     + ", ".join(f"{name} ({speeds[name]:.2f})" for name in names))
    if summary["bar"]:
        terms = ",".join(f"{term}={value:g}" for term, value in summary["bar"].items())
        against = f" against {summary['baseline']}" if summary["baseline"] else ""
        best = summary["fastest_within_bar"]
        if best is None:
            lines.append(f"bar {terms}{against}: no configuration meets it")
        else:
            times = summary["speedup_over_baseline"]
            lines.append(f"bar {terms}{against}: the fastest configuration within it is {best} ({speeds[best]:.2f} "
                         f"images/s" + (f", {times:.2f}x the baseline's)" if times else ")"))
        lines += fid_floor_lines(summary, results, report["settings"]["num_prompts"])
        for key, group in summary["by_engine"].items():
            if group["fastest"] is None:
                lines.append(f"  {key}: none meets it")
                continue
            parts = [f"  {key}: {group['fastest']}"]
            for what, name, ratio in (("fastest DDIM", group["fastest_ddim"], group["speedup_over_fastest_ddim"]),
                                      ("fastest sampler alone", group["fastest_sampler_alone"],
                                       group["speedup_over_sampler_alone"])):
                parts.append(f"{ratio:.2f}x the {what} ({name})" if name else f"no {what} meets it")
            lines.append(", ".join(parts))
    return "\n".join(lines)


def fid_floor_lines(summary: dict[str, Any], results: list[dict[str, Any]], num_prompts: int) -> list[str]:
    """A line on the FID bar where the small-sample floor makes it more than three times as loose as its ratio says
    (the baseline's FID more than three times its part above the floor): how loose, and about how many prompts make
    it at most twice as loose (the floor shrinking as 1/N, the part above it taken as fixed)."""
    ratio, floor = summary["bar"].get("fid-ratio"), summary.get("fid_floor")
    if ratio is None or ratio <= 1 or floor is None:
        return []
    loose = summary["fid_ratio_above_floor"]
    if loose is None:
        return [f"  FID: the baseline's FID is not above the floor of {floor:.1f} (real images against as many real "
                f"ones at {num_prompts} prompts): the fid-ratio term compares sampling noise; use more --num-prompts"]
    baseline = next(result for result in results if result["config"] == summary["baseline"])["fid_in_domain"]
    above = baseline - floor
    if baseline <= 3 * above:
        return []
    return [f"  FID: at {num_prompts} prompts the floor (real images against as many real ones) is {floor:.1f}, "
            f"{floor / baseline:.0%} of the baseline's FID: fid-ratio={ratio:g} allows {loose - 1:.0%} on the part "
            f"above it, not {ratio - 1:.0%}; about {math.ceil(num_prompts * floor / above)} prompts make it at most "
            f"twice {ratio - 1:.0%} (the floor shrinks about as 1/N)"]


def plot_frontier(report: dict[str, Any], path: Path) -> None:
    """One panel per quality metric measured (adherence, FID, latent RMS): every configuration's images/s against
    it, coloured by engine and precision, its frontier as a line, the bar dashed, the fastest within it starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    summary = report["summary"]
    done = [result for result in report["results"] if result["status"] == "ok"]
    metrics = [metric for metric in ("adherence", "fid_in_domain", "latent_rms") if metric in summary["frontier"]]
    if not metrics:
        raise FrontierError(f"--plot {path} has nothing to plot: no configuration was measured against a quality "
                            f"metric ({'every one was skipped' if not done else 'no judge and no reference run'})")
    figure, axes_list = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 5.2), squeeze=False)
    groups = list(dict.fromkeys(result["engine_key"] for result in done))
    colours = {key: plt.get_cmap("tab10")(index % 10) for index, key in enumerate(groups)}
    markers = {(True, True): "o", (False, True): "s", (True, False): "^", (False, False): "D"}
    baseline = next((r for r in done if r["config"] == summary["baseline"]), None)
    bar = summary["bar"]
    rms_limits = [bar["latent-rms"]] if "latent-rms" in bar else []
    rms_limits += [baseline["latent_rms"] * bar["latent-rms-ratio"]] if baseline and "latent-rms-ratio" in bar else []
    thresholds = {"adherence": baseline and "adherence-drop" in bar and baseline["adherence"]["all"]
                  - bar["adherence-drop"],
                  "fid_in_domain": baseline and "fid-ratio" in bar and baseline["fid_in_domain"] * bar["fid-ratio"],
                  "latent_rms": min(rms_limits, default=None)}
    for axes, metric in zip(axes_list[0], metrics):
        for result in done:
            kind = (result["cache_interval"] == 1, result["guidance_interval"] is None)
            axes.scatter(result["images_per_s"], metric_value(result, metric), color=colours[result["engine_key"]],
                         marker=markers[kind], s=28, zorder=3)
            label = result["config"].split("/", 2)[2]
            axes.annotate(label, (result["images_per_s"], metric_value(result, metric)), fontsize=6,
                          xytext=(3, 3), textcoords="offset points")
        front = [next(r for r in done if r["config"] == name) for name in summary["frontier"][metric]]
        axes.step([r["images_per_s"] for r in front], [metric_value(r, metric) for r in front], where="post",
                  color="black", linewidth=1, alpha=0.6, label="frontier")
        if thresholds[metric]:
            axes.axhline(thresholds[metric], color="grey", linestyle="--", linewidth=1, label="the bar")
        best = next((r for r in done if r["config"] == summary.get("fastest_within_bar")), None)
        if best is not None:
            axes.scatter(best["images_per_s"], metric_value(best, metric), marker="*", s=220, facecolor="none",
                         edgecolor="red", linewidth=1.2, zorder=4, label=f"fastest within the bar: {best['config']}")
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.tick_params(axis="x", which="minor", labelsize=7)
        axes.set_xlabel("images/s (median of the rounds)")
        axes.set_ylabel(METRICS[metric][0] + (" (higher is better)" if METRICS[metric][1] > 0 else
                                              " (lower is better)"))
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7, loc="best")
    handles = [plt.Line2D([], [], color=colours[key], marker="o", linestyle="", label=key) for key in groups]
    handles += [plt.Line2D([], [], color="grey", marker=marker, linestyle="", label=text)
                for marker, text in (("o", "sampler alone"), ("^", "guidance interval"), ("s", "cache"),
                                     ("D", "cache and guidance interval"))]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    machine, settings = report["machine"], report["settings"]
    models = ", ".join([*settings["model"], *(f"{name}={','.join(paths)}"
                                              for name, paths in settings.get("variants", {}).items())])
    title = (f"Images/s against quality: {models}, {settings['num_prompts']} prompts, batch {settings['batch_size']}, "
             f"on {machine['cpu']} ({machine['cores']} cores)")
    figure.suptitle(textwrap.fill(title, width=int(12 * figure.get_figwidth())), fontsize=9)  # long --variant lists
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110)
    plt.close(figure)


# --- the command line ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    defaults = FrontierSettings(model=(), configs=(), json="")
    parser = OneLineArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", required=True, metavar="FOLDER",
                        help="the model's checkpoint dir (for torch) and engine dirs (for onnxruntime, openvino, "
                             "tensorrt; one per precision)")
    parser.add_argument("--configs", nargs="+", required=True, metavar="CONFIG", help=CONFIG_SYNTAX)
    parser.add_argument("--json", required=True, help="report file to write")
    parser.add_argument("--plot", default=None, help="also write the frontier's plot here (PNG)")
    parser.add_argument("--baseline", default=None, metavar="CONFIG",
                        help="the configuration relative bar terms compare with (added to --configs if not there)")
    parser.add_argument("--bar", default=None, metavar="TERM=VALUE,...",
                        help=f"quality terms the fastest configuration must meet: {', '.join(BAR_TERMS)}")
    parser.add_argument("--judge", choices=("auto", "shapes", "none"), default=defaults.judge,
                        help="ldm-eval's adherence and FID: shapes, none, or auto (where the classifier draws at the "
                             "model's image size)")
    parser.add_argument("--classifier", default=defaults.classifier, help="classifier dir of the shapes judge")
    parser.add_argument("--num-prompts", type=int, default=defaults.num_prompts,
                        help="held-out prompts every configuration samples")
    add_prompt_seed_flags(parser, defaults)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FOLDER",
                        help="a folder of another model (one distilled from --model) that configurations naming "
                             "/model=NAME run; repeat it for its checkpoint dir and engine dirs")
    parser.add_argument("--guidance", type=finite_float, default=defaults.guidance,
                        help="classifier-free guidance scale of every configuration and the reference (default: "
                             "each one's model's default_sampler.guidance_scale, else 5)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="images per pipeline call, the same for every configuration")
    parser.add_argument("--speed-images", type=int, default=defaults.speed_images,
                        help="images per timed run (default: two batches)")
    parser.add_argument("--repeats", type=int, default=defaults.repeats,
                        help="timed rounds; images/s is their median")
    parser.add_argument("--reference-steps", type=int, default=defaults.reference_steps,
                        help="steps of the reference run (0: no reference run)")
    parser.add_argument("--reference-sampler", default=defaults.reference_sampler,
                        help=f"the reference run's sampler, one of {', '.join(DETERMINISTIC_SAMPLERS)}")
    parser.add_argument("--reference-engine", default=None,
                        help="the engine of the reference run, in fp32 (default: the first configuration's)")
    add_device_flag(parser, defaults)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of every engine (default: each engine's own, e.g. OMP_NUM_THREADS)")
    parser.add_argument("--first-image", action=argparse.BooleanOptionalAction, default=defaults.first_image,
                        help="time each engine's first image in a new process, with its compile cache cold and warm")
    return parser


def settings_from_args(args: argparse.Namespace) -> FrontierSettings:
    values = vars(args)
    values["model"] = tuple(args.model)
    variants: dict[str, tuple[str, ...]] = {}
    for text in values.pop("variant"):
        name, equals, folder = text.partition("=")
        if not equals or not name.strip() or not folder:
            raise FrontierError(f"--variant {text!r} is not NAME=FOLDER")
        variants[name.strip()] = variants.get(name.strip(), ()) + (folder,)
    values["variants"] = variants
    values["configs"] = tuple(parse_config(text) for text in args.configs)
    values["baseline"] = parse_config(args.baseline) if args.baseline is not None else None
    values["bar"] = parse_bar(args.bar) if args.bar is not None else {}
    if args.threads is not None and args.threads < 1:
        raise FrontierError(f"--threads is {args.threads}; expected a positive integer")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise FrontierError("--plot needs matplotlib, which is not installed here (pip install 'ldm-runtime[bench]')")
    return FrontierSettings(**values)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from_args(build_parser().parse_args(argv))
        report = run_frontier(settings)
        try:
            write_text_atomic(Path(settings.json), json.dumps(report, indent=1) + "\n")
        except OSError as error:
            raise FrontierError(f"--json {settings.json} cannot be written ({error.strerror or error})") from None
        print(format_report(report))
        skipped = [result for result in report["results"] if result["status"] != "ok"]
        if len(skipped) == len(report["results"]):
            raise FrontierError(f"every configuration was skipped (the reasons are listed above and in "
                                f"{settings.json}); expected at least one that runs here")
        if settings.plot is not None:
            try:
                plot_frontier(report, Path(settings.plot))
            except OSError as error:
                raise FrontierError(f"--plot {settings.plot} cannot be written ({error.strerror or error})") from None
    except UserError as error:
        return report_user_error(PROG, error)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(f"{PROG}: wrote {settings.json}" + (f" and {settings.plot}" if settings.plot else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
