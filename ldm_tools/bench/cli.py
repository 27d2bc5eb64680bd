"""``ldm-bench`` command line: check the arguments, make the folders, run the workers round robin, report.

Bad input of any kind is one line ``ldm-bench: error: ...`` on stderr and exit status 2, before any engine
is loaded. An engine that was to run and failed (a damaged engine dir, a crash mid-run) keeps its row in the table
and makes the exit status 1; one this machine cannot run (a library not installed) is only noted. torch and the
training code are imported only in the child processes that need them.

The engines run in groups that fit the memory budget (``memory``): eager PyTorch, the baseline, starts first and
stays resident, and is timed in the rounds of every group, so each engine's ratios are against the baseline's
figures from its own rounds (the same machine state); in the plan its measured size replaces its estimate.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ldm_runtime.checkpoint import load_model_config
from ldm_runtime.command_line import OneLineArgumentParser, check_writable_folder, report_user_error
from ldm_runtime.config import MAX_IMAGE_SIZE, preset
from ldm_runtime.engines import CHECKPOINT_MARKER, ENGINE_DIR_MARKER
from ldm_runtime.engines.base import DEFAULT_MAX_BATCH_SIZE
from ldm_runtime.errors import UserError
from ldm_runtime.files import sha256_file
from ldm_runtime.guidance import UNET_ROWS_PER_IMAGE, guided_images, guided_unet_rows
from ldm_runtime.manifest import load_manifest
from ldm_runtime.pipeline import DEFAULT_GUIDANCE_SCALE
from ldm_runtime.schedulers import SAMPLER_NAMES
from ldm_tools.bench.diffusers_peers import PIPELINE_PEER, pipeline_refusal, pipeline_sampler_refusal
from ldm_tools.bench.memory import (AUTO_MARGIN, Workload, activation_mib, available_memory_mib, estimate_rss_mib,
                                    plan_groups)
from ldm_tools.bench.report import (
    WIDE_SPREAD,
    format_profiles,
    format_table,
    group_label,
    result_rows,
    write_json,
    write_plot,
)
from ldm_tools.bench.sources import (PRESET_NAMES, SourceError, export_onnxruntime_engine, run_in_child,
                                     write_preset_checkpoint)
from ldm_tools.bench.workers import (BASELINE, DEFAULT_PEERS, ENGINE_DIR_PEERS, PEERS, Worker, WorkerFailed, WorkerSpec,
                                     cpu_info, native_bf16_refusal)

PROG = "ldm-bench"
TORCH_MAX_BATCH = guided_images(DEFAULT_MAX_BATCH_SIZE)  # images per request the torch engines take
OUR_ENGINES = (*ENGINE_DIR_PEERS, "triton")  # the runtime's engines over compiled graphs or its own kernels
# what a user would run instead, UNet for UNet
FAST_PEERS = ("torch.compile", "torch-bf16", "torch.compile-bf16", "diffusers")
CPU_LATENT_SIZE = {"sd15": 16}  # the default --latent-size where a preset's own is too large for a CPU (sd15: 64)


class BenchError(UserError):
    """A flag or model folder ``ldm-bench`` cannot use, or a source it could not prepare."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time each engine against eager PyTorch on the same weights, interleaved round robin: guided "
                    "UNet steps/s, images/s and latency of one text-to-image request, time to first image, peak "
                    "memory. Prints a table; --json and --plot write the JSON and a PNG.",
        epilog="Engines: torch (eager PyTorch, the baseline, always run), torch.compile (the same model under "
               "torch.compile), diffusers (diffusers' UNet2DConditionModel with our UNet's configuration and "
               "weights), diffusers-pipeline (diffusers' whole StableDiffusionPipeline end to end, with the scheduler "
               "that matches --sampler (ddim: the model's DDIM settings), the same steps and guidance; run by default "
               "on a Stable Diffusion checkpoint from ldm-import), "
               "onnxruntime (an engine dir; exported in a temporary folder when --model is a checkpoint), "
               "openvino and openvino-bf16 (the same engine dir on OpenVINO at fp32, or bf16 where the CPU has native "
               "bf16; compiled with no cache, so the first image includes compiling), torch-bf16 (eager PyTorch under "
               "bf16 autocast, where the CPU has native bf16), torch.compile-bf16 (torch.compile of the UNet under "
               "bf16 autocast, likewise; not run by default), triton (the Triton kernels in fp16 with CUDA graphs; a "
               "CUDA GPU only). A peer this machine cannot run is skipped, with the reason in the notes.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="DIR", help="a checkpoint dir (ldm-train) or an engine dir (ldm-export)")
    source.add_argument("--preset", choices=PRESET_NAMES,
                        help="random weights of a preset's size: shapes (the demo model) or sd15 (Stable Diffusion "
                             "1.5's UNet, autoencoder and a 12-layer BERT)")
    parser.add_argument("--checkpoint", metavar="DIR", default=None,
                        help="with an engine dir as --model: the checkpoint it was exported from, for the torch "
                             "peers (default: the one its manifest names, if it is still there unchanged)")
    parser.add_argument("--latent-size", type=int, default=None,
                        help="with --preset: latent side (default: the preset's own, 16 for sd15; SD's own is 64)")
    parser.add_argument("--engines", default=",".join(DEFAULT_PEERS), metavar="LIST",
                        help=f"comma-separated, from {','.join(PEERS)} (default: %(default)s; diffusers only where "
                             f"installed)")
    parser.add_argument("--batch-sizes", default="1,4,8", metavar="LIST",
                        help="images per request, comma-separated; each UNet step runs twice as many rows "
                             "(classifier-free guidance) (default: %(default)s)")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddim",
                        help="the sampler of every request, for every engine (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps of one request (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per engine and batch size "
                                                                "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads per engine (default: %(default)s, every core)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write every figure and sample here")
    parser.add_argument("--plot", metavar="FILE", default=None,
                        help="write the PNG plot here (default: beside --json, with .png)")
    parser.add_argument("--memory-budget", default="auto", metavar="GIB",
                        help="the memory the engine processes may hold at once: GiB, 'auto' (90%% of the memory "
                             "available: MemAvailable, or a cgroup's limit where lower) or 'all' (every engine at "
                             "once, whatever the machine has); engines that do not fit together run in groups, eager "
                             "PyTorch in each (default: %(default)s)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile one step per engine and batch size: the operators that take "
                             "the time (torch's profiler; onnxruntime's per-node profile)")
    return parser


def main(argv: list[str] | None = None, available_mib: float | None = None) -> int:
    """Run ldm-bench; returns the exit status (0; 1 after the table where an engine that was to run failed; 2 after a
    one-line error on stderr). ``available_mib``: the
    memory --memory-budget auto plans with, MiB (None: what this machine has, ``available_memory_mib``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        plan = check_arguments(args)
        report = run(plan, args, command=" ".join([PROG, *map(shlex.quote, argv)]), available_mib=available_mib)
        unwritten = write_outputs(report, args)
    except UserError as error:
        return report_user_error(PROG, error)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(format_table(report))
    for note in report["notes"]:
        print(f"- {note}")
    for line in format_profiles(report):
        print(line)
    if unwritten is not None:
        return report_user_error(PROG, unwritten)
    failed = failed_engines(report, plan)
    if failed:
        print(f"{PROG}: {', '.join(failed)} failed (the table and notes say why)", file=sys.stderr)
        return 1
    return 0


def failed_engines(report: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """The engines that were to run here and failed: while loading (a damaged engine dir), mid-run or after it.
    Those this machine cannot run (a library not installed, no native bf16) and those left out by the memory
    budget are not failures of the run: their rows say why."""
    unavailable = set(plan.get("unavailable", ()))
    return [entry["name"] for entry in report["engines"]
            if entry["status"] == "failed" and entry["name"] not in unavailable]


def _log(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def _positive_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(value < 1 for value in values):
        raise BenchError(f"{flag} {text!r} is not a comma-separated list of positive integers (e.g. 1,4,8)")
    _refuse_repeats(values, text, flag, "batch size")
    return sorted(values)


def _refuse_repeats(items: list[Any], text: str, flag: str, what: str) -> None:
    """``BenchError`` naming the first item of ``flag``'s list ``text`` that is given twice."""
    repeated = next((item for index, item in enumerate(items) if item in items[:index]), None)
    if repeated is not None:
        raise BenchError(f"{flag} {text!r} names {what} {repeated} twice; expected each {what} once")


def check_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that can be checked before a process starts; ``BenchError`` naming the first bad value."""
    engines = [name.strip() for name in args.engines.split(",")]
    if not all(engines):
        raise BenchError(f"--engines {args.engines!r} has an empty item; expected comma-separated engine names from "
                         f"{', '.join(PEERS)}")
    for name in engines:
        if name not in PEERS:
            raise BenchError(f"engine {name!r} is not one of {', '.join(PEERS)}")
    _refuse_repeats(engines, args.engines, "--engines", "engine")
    engines = [BASELINE] + [name for name in engines if name != BASELINE]  # the baseline, first
    batch_sizes = _positive_list(args.batch_sizes, "--batch-sizes")
    for flag, value in (("--steps", args.steps), ("--repeats", args.repeats), ("--threads", args.threads)):
        if value < 1:
            raise BenchError(f"{flag} is {value}; expected a positive integer")
    if not (args.device in ("auto", "cpu", "cuda") or (args.device.startswith("cuda:")
                                                       and args.device[5:].isdigit())):
        raise BenchError(f"--device {args.device!r} is not valid; expected auto, cpu, cuda or cuda:N")
    for flag, value in (("--json", args.json), ("--plot", args.plot)):
        if value is not None:
            _check_writable_file(flag, Path(value))
    plan: dict[str, Any] = {"engines": engines, "batch_sizes": batch_sizes, "preset": args.preset,
                            "memory_budget": _memory_budget_flag(args.memory_budget), "engine_dir_bytes": 4}
    if args.preset:
        config = preset(args.preset)
        _check_pipeline_peer(config, engines)
        latent_size = args.latent_size
        if latent_size is None:
            latent_size = CPU_LATENT_SIZE.get(args.preset, config.latent_size)
        largest = MAX_IMAGE_SIZE // config.autoencoder.factor  # the image size any model may have
        if not 1 <= latent_size <= largest:
            raise BenchError(f"--latent-size {latent_size} does not fit preset {args.preset}; expected a positive "
                             f"integer up to {largest} (images of at most {MAX_IMAGE_SIZE} px)")
        multiple = config.unet.latent_size_multiple
        if latent_size < multiple or latent_size % multiple:
            raise BenchError(f"--latent-size {latent_size} does not fit preset {args.preset}; expected a multiple of "
                             f"{multiple} (its UNet halves the latents {multiple.bit_length() - 1} times)")
        plan.update(latent_size=latent_size, image_size=latent_size * config.autoencoder.factor,
                    model_name=f"preset {args.preset}")
        _check_batch_range(batch_sizes, 1, TORCH_MAX_BATCH, "the torch engines")
        return plan
    if args.latent_size is not None:
        raise BenchError("--latent-size applies to --preset only; a model folder runs at its own image size")
    plan.update(_check_model_folder(Path(args.model), args.checkpoint, engines))
    _check_pipeline_peer(load_model_config(plan["checkpoint"]), engines)
    _check_batch_range(batch_sizes, 1, TORCH_MAX_BATCH, "the torch engines")
    if plan.get("engine_dir_batch"):
        low, high = plan["engine_dir_batch"]
        _check_batch_range(batch_sizes, max(1, math.ceil(low / UNET_ROWS_PER_IMAGE)), guided_images(high),
                           f"the engine dir {args.model} (UNet batch {low}..{high} with guidance)")
    return plan


def _memory_budget_flag(text: str) -> str | float:
    """--memory-budget as "auto", "all" or GiB (a positive number)."""
    value = text.strip().lower()
    if value in ("auto", "all"):
        return value
    try:
        gib = float(value)
    except ValueError:
        gib = math.nan
    if not (math.isfinite(gib) and gib > 0):
        raise BenchError(f"--memory-budget {text!r} is not valid; expected auto, all or a positive number of GiB "
                         f"(e.g. 20)")
    return gib


def _check_pipeline_peer(config, engines: list[str]) -> None:
    """Adds diffusers' whole pipeline to ``engines`` for a Stable Diffusion model; ``BenchError`` when it was
    asked for a model it cannot run."""
    refusal = pipeline_refusal(config)
    if refusal and PIPELINE_PEER in engines:
        raise BenchError(refusal)
    if refusal is None and PIPELINE_PEER not in engines:
        engines.append(PIPELINE_PEER)


def _check_writable_file(flag: str, path: Path) -> None:
    """``BenchError`` unless ``path`` is a file path whose folder this process can write, proven by writing a probe
    file there (permission bits say yes to root on /proc and on a read-only mount)."""
    if path.is_dir():
        raise BenchError(f"{flag} {path} is a folder; expected a file path in a writable folder")
    check_writable_folder(f"{flag} {path}: the folder", path.parent)


def _check_batch_range(batch_sizes: list[int], low: int, high: int, what: str) -> None:
    for size in batch_sizes:
        if not low <= size <= high:
            raise BenchError(f"batch size {size} is outside the range of {what}; expected {low} to {high} images "
                             f"per request")


def _check_model_folder(folder: Path, checkpoint: str | None, engines: list[str]) -> dict[str, Any]:
    """Which kind of folder --model is, the checkpoint the torch peers read, and an engine dir's batch range."""
    if not folder.is_dir():
        raise BenchError(f"--model {folder} does not exist or is not a folder; expected a checkpoint dir "
                         f"(ldm-train) or an engine dir (ldm-export)")
    if (folder / CHECKPOINT_MARKER).is_file():
        if checkpoint is not None:
            raise BenchError("--checkpoint applies when --model is an engine dir; --model is already a checkpoint")
        config = load_model_config(folder)
        return {"checkpoint": str(folder), "engine_dir": None, "image_size": config.image_size,
                "latent_size": config.latent_size, "model_name": folder.name}
    if not (folder / ENGINE_DIR_MARKER).is_file():
        raise BenchError(f"--model {folder} has neither {CHECKPOINT_MARKER} nor {ENGINE_DIR_MARKER}; expected a "
                         f"checkpoint dir (ldm-train) or an engine dir (ldm-export)")
    manifest = load_manifest(folder)
    source = manifest.raw.get("source", {})
    recorded = source.get("files", {})
    chosen = Path(checkpoint) if checkpoint is not None else Path(source.get("checkpoint", ""))
    same = bool(recorded) and chosen.is_dir() and all(
        (chosen / name).is_file() and sha256_file(chosen / name) == digest for name, digest in recorded.items())
    if not same:
        if checkpoint is None:
            raise BenchError(f"--model {folder} is an engine dir; the torch peers need the checkpoint it was "
                             f"exported from, and the one its manifest names ({source.get('checkpoint')}) is gone "
                             f"or changed: pass --checkpoint DIR, or --model CHECKPOINT_DIR to export it afresh")
        raise BenchError(f"--checkpoint {checkpoint} is not the checkpoint {folder} was exported from (its files' "
                         f"sha256 differ from the manifest's); expected the same weights for every engine")
    if not set(ENGINE_DIR_PEERS) & set(engines):
        engines.append("onnxruntime")  # an engine dir is there to be timed, by onnxruntime unless --engines names one
    return {"checkpoint": str(chosen), "engine_dir": str(folder), "image_size": manifest.model.image_size,
            "latent_size": manifest.model.image_size // manifest.model.latent_factor, "model_name": folder.name,
            "engine_dir_batch": (manifest.batch.min, manifest.batch.max),
            "engine_dir_bytes": 2 if manifest.graphs["unet"].precision == "fp16" else 4}


def run(plan: dict[str, Any], args: argparse.Namespace, command: str,
        available_mib: float | None = None) -> dict[str, Any]:
    """Make the folders, start one worker per engine, time them round robin in groups that fit the memory budget
    (``available_mib``: the memory auto plans with, None: read it here); the report (``write_outputs`` writes it)."""
    with tempfile.TemporaryDirectory(prefix="ldm-bench-") as scratch:
        model_info = _prepare_sources(plan, Path(scratch))
        report = _measure(plan, args, model_info, available_mib)
    report["command"] = command
    return report


def write_outputs(report: dict[str, Any], args: argparse.Namespace) -> BenchError | None:
    """Write --json and the plot (--plot, else beside --json); a file that cannot be written (a full disk) is the
    ``BenchError`` returned, naming it, so that the measured figures are still printed."""
    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    flag, path = "--json", args.json
    try:
        if args.json:
            write_json(report, Path(args.json))
        if plot:
            flag, path = "--plot", plot
            write_plot(report, Path(plot))
            report["plot"] = plot
            if args.json:
                flag, path = "--json", args.json
                write_json(report, Path(args.json))
    except OSError as error:
        return BenchError(f"{flag} {path} cannot be written ({error.strerror or error}); the figures are in the table "
                          f"above")
    return None


def _prepare_sources(plan: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """The preset checkpoint and the onnxruntime engine dir, each made in a child process, when needed."""
    info: dict[str, Any] = {"name": plan["model_name"], "latent_size": plan["latent_size"],
                            "image_size": plan["image_size"], "random_weights": bool(plan["preset"])}
    try:
        if plan["preset"]:
            started = time.perf_counter()
            _log(f"writing a random-weight {plan['preset']} checkpoint ({plan['latent_size']}x{plan['latent_size']} "
                 f"latents)")
            plan["checkpoint"] = str(scratch / "checkpoint")
            info.update(run_in_child(write_preset_checkpoint, plan["preset"], plan["latent_size"], plan["checkpoint"]))
            _log(f"wrote it in {time.perf_counter() - started:.0f} s")
            plan["engine_dir"] = None
        if set(ENGINE_DIR_PEERS) & set(plan["engines"]) and plan["engine_dir"] is None:
            _log("exporting the checkpoint to an fp32 engine dir")
            plan["engine_dir"] = str(scratch / "engine")
            model = load_model_config(plan["checkpoint"])
            info["export_s"] = run_in_child(export_onnxruntime_engine, plan["checkpoint"], plan["engine_dir"],
                                            guided_unet_rows(max(plan["batch_sizes"])), plan["image_size"],
                                            model.image_size)
            _log(f"exported it in {info['export_s']:.0f} s")
    except SourceError as error:
        raise BenchError(f"cannot prepare {plan['model_name']}: {error}") from None
    return info


def _measure(plan: dict[str, Any], args: argparse.Namespace, model_info: dict[str, Any],
             available_mib: float | None) -> dict[str, Any]:
    """Start eager PyTorch, plan the groups, then per group start its engines, compare their UNet outputs with
    eager's, time them round robin with eager and stop them; the report (without the plot)."""
    entries: dict[str, dict[str, Any]] = {}
    workers: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    runnable = _refuse_what_cannot_run(plan, args, entries)
    budget = _memory_budget(plan["memory_budget"], available_mib)
    try:
        reference = _start_workers([BASELINE], plan, args, workers, entries)[BASELINE]
        grouping = _plan_groups(plan, runnable, entries, budget)
        for index, group in enumerate(grouping["groups"], start=1):
            if len(grouping["groups"]) > 1:
                _log(f"group {index} of {len(grouping['groups'])}: {', '.join(group)}")
            outputs = _start_workers(group[1:], plan, args, workers, entries)
            if index > 1 and not outputs:
                continue  # none of its peers started: eager alone was timed already
            _compare_unet_outputs(reference, outputs, entries)
            step_seconds, e2e_seconds = _time_round_robin(plan, args, group, workers, entries)
            rows = result_rows(step_seconds, e2e_seconds, group, plan["batch_sizes"], BASELINE)
            results += [dict(row, group=index) for row in rows]
            peers = [name for name in group[1:] if name in workers]
            _finish(peers, plan, args, workers, entries)
        _finish([name for name in (BASELINE,) if name in workers], plan, args, workers, entries)
    finally:
        for worker in workers.values():
            worker.stop()
    report = {
        "format_version": 1,
        "machine": machine_info(),
        "model": model_info,
        "settings": {"engines": plan["engines"], "batch_sizes": plan["batch_sizes"], "sampler": args.sampler,
                     "steps": args.steps,
                     "repeats": args.repeats, "warmup": 1, "threads": args.threads, "device": args.device,
                     "guidance_scale": DEFAULT_GUIDANCE_SCALE, "wide_spread_over": WIDE_SPREAD,
                     "memory_budget": args.memory_budget},
        "grouping": grouping,
        "engines": list(entries.values()),
        "results": results,
    }
    # the work every figure is of, first, so that the printed table and the JSON both say it
    report["notes"] = [f"every request: {args.steps} {args.sampler} steps, guidance {DEFAULT_GUIDANCE_SCALE:g}",
                       *_notes(report)]
    return report


def _refuse_what_cannot_run(plan: dict[str, Any], args: argparse.Namespace,
                            entries: dict[str, dict[str, Any]]) -> list[str]:
    """Every engine's entry, those this machine cannot run recorded as failed with the reason (and listed in
    ``plan["unavailable"]``); the others' names."""
    runnable, plan["unavailable"] = [], []
    for name in plan["engines"]:
        entry = entries[name] = {"name": name, "status": "ok", "reason": None}
        missing = (_missing_library(name) or _bf16_refusal(name, args.device)
                   or (pipeline_sampler_refusal(args.sampler) if name == PIPELINE_PEER else None))
        if missing:
            entry.update(status="failed", reason=missing)
            plan["unavailable"].append(name)
            _log(f"{name}: skipped ({missing})")
        else:
            runnable.append(name)
    return runnable


def _memory_budget(flag: str | float, available_mib: float | None) -> dict[str, Any]:
    """The budget the groups are planned in: ``budget_mib`` (None: no bound) and what it came from."""
    if flag == "all":
        return {"budget_mib": None, "available_mib": None, "available_from": None}
    if flag != "auto":
        return {"budget_mib": flag * 1024, "available_mib": None, "available_from": None}
    source = "given" if available_mib is not None else None
    if available_mib is None:
        available_mib, source = available_memory_mib() or (None, None)
    budget_mib = None if available_mib is None else (1 - AUTO_MARGIN) * available_mib
    return {"budget_mib": budget_mib, "available_mib": available_mib, "available_from": source}


def _workload(plan: dict[str, Any], parameters: dict[str, int]) -> Workload:
    config = load_model_config(plan["checkpoint"])
    return Workload(unet_parameters=parameters["unet"],
                    other_parameters=parameters["autoencoder"] + parameters["text_encoder"],
                    batch_sizes=tuple(plan["batch_sizes"]), latent_size=plan["latent_size"],
                    image_size=plan["image_size"], unet_channels=config.unet.model_channels,
                    decoder_channels=config.autoencoder.base_channels * config.autoencoder.channel_mult[0],
                    engine_dir_bytes=plan["engine_dir_bytes"])


def _plan_groups(plan: dict[str, Any], runnable: list[str], entries: dict[str, dict[str, Any]],
                 budget: dict[str, Any]) -> dict[str, Any]:
    """The report's ``grouping``: each runnable engine's estimated peak, the groups that fit the budget and the
    engines that fit in none (recorded as skipped). Said in one line on stderr. Eager PyTorch has loaded and made its
    first image already: its measured resident size (its peak where that cannot be read), with its largest
    request's activations on top, is what it will hold beside every group."""
    workload = _workload(plan, entries[BASELINE]["parameters"])
    peaks = {}
    for name in runnable:
        entries[name]["estimated_rss_mib"] = peaks[name] = estimate_rss_mib(name, workload)
    resident = entries[BASELINE]["rss_mib"] or entries[BASELINE]["peak_rss_mib"]
    peaks[BASELINE] = resident + activation_mib(BASELINE, workload)
    groups, skipped = plan_groups(peaks, BASELINE, budget["budget_mib"])
    gib = {name: value / 1024 for name, value in peaks.items()}
    flag = plan["memory_budget"]
    for name in skipped:
        entries[name].update(status="skipped", reason=(
            f"needs ~{gib[name]:.1f} GiB resident by its estimate beside eager PyTorch's ~{gib[BASELINE]:.1f} GiB, "
            f"more than the memory budget of {budget['budget_mib'] / 1024:.1f} GiB (--memory-budget "
            f"{flag if isinstance(flag, str) else f'{flag:g}'})"))
    _log(_grouping_line(gib, groups, skipped, budget, flag))
    return {**budget, "planned_rss_mib": peaks, "groups": groups, "skipped": skipped}


def _grouping_line(gib: dict[str, float], groups: list[list[str]], skipped: list[str], budget: dict[str, Any],
                   flag: str | float) -> str:
    need = (f"{len(gib)} engines need ~{sum(gib.values()):.1f} GiB resident together" if len(gib) > 1
            else f"eager PyTorch alone needs ~{sum(gib.values()):.1f} GiB resident")
    if budget["budget_mib"] is None:
        why = ("--memory-budget all" if flag == "all" else
               "this machine's available memory cannot be read (no MemAvailable in /proc/meminfo; --memory-budget "
               "GIB sets a budget)")
        return f"{need}; {why}: running them all at once"
    if budget["available_mib"] is not None:
        have = (f"this machine has {budget['available_mib'] / 1024:.1f} GiB available ({budget['available_from']}), "
                f"a budget of {budget['budget_mib'] / 1024:.1f} GiB with {100 * AUTO_MARGIN:.0f}% kept free")
    else:
        have = f"the budget is {budget['budget_mib'] / 1024:.1f} GiB (--memory-budget)"
    if len(groups) == 1 and not skipped:
        return f"{need} and {have}: running them all at once"
    line = (f"{need} and {have}: running them in {len(groups)} group{'s' if len(groups) > 1 else ''}, eager "
            f"PyTorch timed in each: " + "; ".join(", ".join(group) for group in groups))
    if skipped:
        line += f"; skipped, too large beside eager PyTorch: {', '.join(skipped)}"
    return line


def _start_workers(names: list[str], plan: dict[str, Any], args: argparse.Namespace, workers: dict[str, Any],
                   entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A worker for each of ``names``, started one at a time (loads do not compete with each other), each making
    its first image; fills ``workers`` and ``entries`` (the baseline's with its peak so far), returns each engine's
    UNet output for the check. A peer that cannot run is recorded as failed; the baseline that cannot run is
    ``BenchError``."""
    outputs = {}
    for name in names:
        entry = entries[name]
        _log(f"{name}: loading and making a first image")
        worker = Worker(WorkerSpec(engine=name, folder=plan["engine_dir"] if name in ENGINE_DIR_PEERS
                                   else plan["checkpoint"], device=args.device, threads=args.threads,
                                   steps=args.steps, image_size=plan["image_size"],
                                   guidance_scale=DEFAULT_GUIDANCE_SCALE, sampler=args.sampler))
        try:
            ready = worker.ask()
            if name == BASELINE:
                ready.update(worker.ask("memory"))  # what the plan takes for it
        except WorkerFailed as error:
            worker.stop()
            if name == BASELINE:
                raise BenchError(f"the torch engine cannot run {args.model or args.preset}: {error}") from None
            entry.update(status="failed", reason=str(error))
            _log(f"{name}: failed ({error})")
            continue
        workers[name] = worker
        outputs[name] = ready.pop("unet_output")
        entry.update(ready, time_to_first_image_s=ready.pop("ready_at") - worker.started_at)
        _log(f"{name}: first image after {entry['time_to_first_image_s']:.1f} s")
    return outputs


def _compare_unet_outputs(reference: Any, outputs: dict[str, Any], entries: dict[str, dict[str, Any]]) -> None:
    """Each engine's ``unet_relative_error``: ||output - eager|| / ||eager|| of the same UNet call."""
    reference = reference.astype(np.float64)
    entries[BASELINE].setdefault("unet_relative_error", 0.0)
    for name, output in outputs.items():
        entries[name]["unet_relative_error"] = float(np.linalg.norm(output - reference) /
                                                     max(np.linalg.norm(reference), 1e-30))


def _time_round_robin(plan: dict[str, Any], args: argparse.Namespace, group: list[str], workers: dict[str, Any],
                      entries: dict[str, dict[str, Any]]) -> tuple[dict, dict]:
    """(step seconds, end-to-end seconds) per (engine, batch size) of the running engines of ``group``: per batch
    size, a warm-up each, then ``--repeats`` rounds in which the engines take turns, starting one further along
    each round."""
    step_seconds: dict[tuple[str, int], list[float]] = {}
    e2e_seconds: dict[tuple[str, int], list[float]] = {}
    members = [name for name in group if name in workers]
    total = len(plan["batch_sizes"]) * (1 + 2 * args.repeats) * len(members)
    with tqdm(total=total, desc=PROG, unit="run", dynamic_ncols=True, file=sys.stderr) as bar:
        for batch_size in plan["batch_sizes"]:
            calls = {}
            for name in [name for name in members if name in workers]:
                try:
                    step = workers[name].ask("warmup", batch_size)
                except WorkerFailed as error:
                    _drop(workers, entries, name, batch_size, error)
                    continue
                finally:
                    bar.update(1)
                calls[name] = max(1, min(50, round(0.25 / max(step, 1e-6))))  # a repeat lasts >= ~0.25 s
            for repeat in range(args.repeats):
                names = [name for name in members if name in workers and name in calls]
                order = names[repeat % len(names):] + names[:repeat % len(names)] if names else []
                for kind in ("step", "e2e"):
                    for name in order:
                        if name not in workers:
                            continue
                        try:
                            arguments = (batch_size, calls[name]) if kind == "step" else (batch_size,)
                            seconds = workers[name].ask(kind, *arguments)
                        except WorkerFailed as error:
                            _drop(workers, entries, name, batch_size, error)
                            continue
                        finally:
                            bar.update(1)
                        (step_seconds if kind == "step" else e2e_seconds).setdefault(
                            (name, batch_size), []).append(seconds)
    return step_seconds, e2e_seconds


def _finish(names: list[str], plan: dict[str, Any], args: argparse.Namespace, workers: dict[str, Any],
            entries: dict[str, dict[str, Any]]) -> None:
    """Each of ``names``' peak memory and, with --profile, its operator profile; then its worker is stopped."""
    for name in names:
        try:
            entries[name].update(workers[name].ask("memory"))
        except WorkerFailed as error:
            workers.pop(name).stop()
            entries[name].update(status="failed", reason=f"after its timed rounds: {error}")
            _log(f"{name}: failed after its timed rounds ({error})")
            continue
        if args.profile:
            for batch_size in plan["batch_sizes"]:
                try:
                    entries[name].setdefault("profile", {})[str(batch_size)] = workers[name].ask("profile",
                                                                                                batch_size)
                except WorkerFailed as error:
                    entries[name].setdefault("profile", {})[str(batch_size)] = f"failed: {error}"
        workers.pop(name).stop()


def _drop(workers: dict, entries: dict, name: str, batch_size: int, error: Exception) -> None:
    """A worker that failed mid-run: stop it and record why; the other engines go on."""
    workers.pop(name).stop()
    entries[name].update(status="failed", reason=f"at batch size {batch_size}: {error}")
    _log(f"{name}: failed at batch size {batch_size} ({error})")


def _missing_library(name: str) -> str | None:
    library = {"diffusers": "diffusers", PIPELINE_PEER: "diffusers", "onnxruntime": "onnxruntime",
               "openvino": "openvino", "openvino-bf16": "openvino"}.get(name)
    if library and importlib.util.find_spec(library) is None:
        return f"{library} is not installed"
    return None


def _bf16_refusal(name: str, device: str) -> str | None:
    """Why a bf16 peer cannot run here. openvino-bf16 runs on the CPU whatever --device says; torch-bf16 and
    torch.compile-bf16 run where the torch engine does, so --device auto on a machine with a CUDA GPU is judged as
    that GPU."""
    if not name.endswith("-bf16"):
        return None
    if not name.startswith("torch"):
        return native_bf16_refusal("cpu")
    if device == "auto":
        from ldm_runtime.engines.torch_engine import resolve_device

        device = resolve_device(device).type
    return native_bf16_refusal(device)


def machine_info() -> dict[str, Any]:
    """The CPU (model name and the SIMD flags speed depends on), cores, platform and library versions."""
    cpu, flags = cpu_info()
    # the instruction sets CPU speed figures depend on: vector width, FMA, and native int8/bf16/fp16 arithmetic
    simd = sorted(flag for flag in flags if flag in ("avx", "avx2", "fma", "f16c") or flag.startswith(("avx512", "amx"))
                  or "vnni" in flag)
    versions = {}
    for package in ("torch", "onnxruntime", "onnxruntime-gpu", "openvino", "diffusers", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cpu_flags": simd, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def _notes(report: dict[str, Any]) -> list[str]:
    """What the table does not say by itself: the groups, spreads too wide to trust, failed peers, the best engine's
    ratios. Engines are compared through their ratios to eager PyTorch, each against eager's figures from its own
    group's rounds (in one group this is the same as comparing their medians)."""
    notes = []
    groups = report.get("grouping", {}).get("groups", [])
    grouped = len(groups) > 1
    if grouped:
        notes.append(f"to fit the memory budget the engines ran in {len(groups)} groups ("
                     + "; ".join(", ".join(group) for group in groups) + "), eager PyTorch timed in each: every × "
                     "eager is against eager's figures from the same group's rounds")
    wide = [f"{row['engine']}{group_label(row) if grouped else ''} at batch {row['batch_size']}"
            for row in report["results"] if row["wide_spread"]]
    if wide:
        notes.append(f"spread (max - min over median) above {100 * WIDE_SPREAD:.0f}% or fewer than 3 repeats, "
                     f"figures marked ! are indicative only: {', '.join(wide)}")
    for entry in report["engines"]:
        if entry["status"] != "ok":
            timed = any(row["engine"] == entry["name"] for row in report["results"])
            notes.append(f"{entry['name']} {'stopped' if timed else 'did not run'}: {entry['reason']}")
    for batch_size in report["settings"]["batch_sizes"]:
        rows = [row for row in report["results"] if row["batch_size"] == batch_size and row["engine"] != BASELINE
                and row["steps_speedup_vs_torch"] is not None]
        if rows:
            best = max(rows, key=lambda row: row["steps_speedup_vs_torch"])
            compiled = next((row for row in rows if row["engine"] == "torch.compile"), None)
            against = (f", {best['steps_speedup_vs_torch'] / compiled['steps_speedup_vs_torch']:.2f}× torch.compile"
                       if compiled and best is not compiled else "")
            rounds = best.get("steps_speedup_per_round") or []
            spread = (f" (round by round {min(rounds):.2f}-{max(rounds):.2f}×)" if len(rounds) > 1 else "")
            notes.append(f"batch {batch_size}: fastest is {best['engine']} at {best['steps_speedup_vs_torch']:.2f}× "
                         f"eager PyTorch's UNet steps/s{spread}{against}")
        ours = [row for row in rows if row["engine"] in OUR_ENGINES]
        peers = [row for row in rows if row["engine"] in FAST_PEERS]
        if ours and peers:
            mine = max(ours, key=lambda row: row["steps_speedup_vs_torch"])
            theirs = max(peers, key=lambda row: row["steps_speedup_vs_torch"])
            notes.append(f"batch {batch_size}: our fastest engine, {mine['engine']}, makes "
                         f"{mine['steps_speedup_vs_torch'] / theirs['steps_speedup_vs_torch']:.2f}× the UNet steps/s "
                         f"of the fastest peer, {theirs['engine']}")
    return notes

