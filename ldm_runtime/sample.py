"""``ldm-sample``: prompts in, PNG images out, from a checkpoint dir (torch) or an engine dir (openvino, onnxruntime,
tensorrt).

    ldm-sample --model runs/ldm "a red circle" "a blue square" --seed 7 --steps 25 --out samples/

Prompt i gets seed S + i, so a prompt's image is the same whichever prompts run beside it. Every PNG
carries its prompt, seed and settings as JSON in a PNG text chunk named "parameters". Bad input of any
kind is one line ``ldm-sample: error: ...`` on stderr and exit status 2, before anything is written (Ctrl-C
is one line and exit status 130, with ``--out`` as it was); images are written to temporary names and renamed
into place only once all of them are ready. A run makes at most ``MAX_PROMPTS`` images of ``MAX_PIXELS`` pixels
in all, each of at most ``MAX_TRAIN_TIMESTEPS`` steps, checked before the model is loaded where the flags alone
decide it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import signal
import stat
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ldm_runtime.adapters import ADAPTER_NAME, MAX_REQUEST_ADAPTERS, AdapterError, adapter_file_argument
from ldm_runtime.command_line import (OneLineArgumentParser, finite_float, noise_interval, report_user_error,
                                      sigterm_as_ctrl_c)
from ldm_runtime.config import (CACHE_SCHEDULES, DEFAULT_GUIDANCE_SCALE, DEFAULT_SAMPLER, DEFAULT_STEPS,
                                LARGEST_IMAGE_SIDE, MAX_CACHE_INTERVAL, MAX_TRAIN_TIMESTEPS)
from ldm_runtime.engines import (
    AUTO_ENGINE_HELP, ENGINE_NAMES, PRECISION_HELP, PRECISION_NAMES, engine_for_flags, load_engine,
    load_engine_with_adapters, precision_note,
)
from ldm_runtime.errors import UserError
from ldm_runtime.files import special_file_kind
from ldm_runtime.images import MAX_UPLOAD_BYTES, image_grid, png_bytes, read_upload
from ldm_runtime.pipeline import GenerationRequest, Pipeline, check_text
from ldm_runtime.schedulers import SAMPLER_NAMES
from ldm_runtime.staging import temporary_folder

PROG = "ldm-sample"
REQUEST_DEFAULTS = {field.name: field.default for field in dataclasses.fields(GenerationRequest)}
GRID_NAME = "grid.png"
IMAGE_NAME = "{index:03d}-seed{seed}.png"  # image i of a folder --out, with its seed
IMAGE_NAME_GLOB = "[0-9][0-9][0-9]-seed*.png"  # what IMAGE_NAME writes, in order (ldm-sheet reads them)
MAX_PROMPTS = 999  # images of one run: IMAGE_NAME numbers them with three digits
MAX_PIXELS = 256 * 1024 * 1024  # all images of one run together (256 of 1024x1024), held in memory with their grid


class SampleError(UserError):
    """An ``--out`` that cannot be written, or one that does not fit the prompts."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog=PROG,
        description="Generate images from text prompts with a diffusion sampler and classifier-free guidance. "
                    "Writes one PNG per prompt and, for several prompts, a grid.png of all of them.",
    )
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="one image per prompt")
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="a checkpoint dir (written by ldm-train) or an engine dir (written by ldm-export)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="a folder (created if missing) or, for a single prompt, a .png file")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the first prompt; prompt i uses seed + i (default: %(default)s)")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default=REQUEST_DEFAULTS["sampler"],
                        help="ddim (the model's own settings); euler, euler-a (ancestral); DPM-Solver++ 2M, as an ODE "
                             "or an SDE, with timesteps or Karras sigmas evenly spaced; unipc (order 2), unipc-3; "
                             "plms (the LDM paper's, N + 1 UNet calls for N steps); lcm (for consistency-distilled "
                             "models, at most 50 steps). euler-a, the -sde ones and lcm draw step noise from the seed "
                             f"(default: the model's default_sampler, else {DEFAULT_SAMPLER})")
    parser.add_argument("--steps", type=int, default=REQUEST_DEFAULTS["steps"],
                        help=f"sampler steps (default: the model's default_sampler steps, else {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=finite_float, default=REQUEST_DEFAULTS["guidance_scale"],
                        help=f"classifier-free guidance scale, 1 = no guidance (default: the model's "
                             f"default_sampler.guidance_scale, else {DEFAULT_GUIDANCE_SCALE:g})")
    parser.add_argument("--guidance-interval", type=noise_interval, default=None, metavar="LOW,HIGH",
                        help="guide only the UNet calls whose noise level sigma lies in (LOW, HIGH]; the others "
                             "run the conditional branch alone, at half the UNet rows (default: the model's "
                             "default_sampler.guidance_interval, else every call)")
    parser.add_argument("--cache-interval", type=int, default=REQUEST_DEFAULTS["cache_interval"], metavar="N",
                        help=f"run the whole UNet at one step in N and, at the steps between, only its shallow part "
                             f"on the deep features cached at the last whole step (DeepCache); N from 1 to "
                             f"{MAX_CACHE_INTERVAL}, N > 1 on an engine that caches (default: the model's "
                             f"default_sampler.cache_interval, else 1: the whole UNet at every step)")
    parser.add_argument("--cache-schedule", choices=CACHE_SCHEDULES, default=REQUEST_DEFAULTS["cache_schedule"],
                        help="which steps run the whole UNet under --cache-interval: uniform spaces them evenly, "
                             "quadratic packs them around a step part-way in (default: the model's "
                             f"default_sampler.cache_schedule, else {CACHE_SCHEDULES[0]})")
    parser.add_argument("--eta", type=finite_float, default=REQUEST_DEFAULTS["eta"],
                        help="DDIM eta from 0 (deterministic) to 1 (DDPM-like), or TCD's gamma from 0 "
                             "(deterministic) to 1 (LCM's walk; its authors use 0.3); other samplers take 0 only "
                             "(default: %(default)s)")
    parser.add_argument("--negative-prompt", default=REQUEST_DEFAULTS["negative_prompt"], metavar="TEXT",
                        help="what to steer away from, for every prompt (default: none)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the model's size)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the model's size)")
    parser.add_argument("--init-image", default=None, metavar="PATH",
                        help="image to image (SDEdit) from this PNG, JPEG or WebP image: it is noised to the step "
                             "--strength names and denoised from there; its size is the images' size")
    parser.add_argument("--strength", type=finite_float, default=None, metavar="S",
                        help="with --init-image, how much of it is redrawn: the last int(steps * S) steps run, "
                             "from 0 (the image's reconstruction) to 1 (pure noise, as text to image) (default: "
                             "0.8, or 1 with --mask)")
    parser.add_argument("--mask", default=None, metavar="PATH",
                        help="with --init-image, inpaint: an image of its size, white (grey 128 and up) where it is "
                             "repainted; elsewhere the images keep the init image's pixels")
    parser.add_argument("--lora", action="append", type=adapter_file_argument, metavar="FILE[:SCALE]",
                        help="apply the LoRA adapter FILE (.safetensors, diffusers/PEFT or kohya) to every prompt at "
                             "SCALE (default 1), unfused, as ldm-serve applies it per request; repeatable (the torch "
                             "engine, or an engine dir exported with ldm-export --lora-slots; to another engine, fuse "
                             "it with ldm-import --lora)")
    parser.add_argument("--engine", choices=ENGINE_NAMES, default="auto",
                        help=f"{AUTO_ENGINE_HELP} (and says which); triton (a checkpoint dir on a CUDA GPU) runs "
                             f"the fused Triton kernels in fp16 with CUDA graphs")
    parser.add_argument("--precision", choices=PRECISION_NAMES, default="auto", help=PRECISION_HELP)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="prompts sampled together (default: as many as the engine's batch holds)")
    return parser


@sigterm_as_ctrl_c
def main(argv: list[str] | None = None) -> int:
    """Run ldm-sample; returns the exit status (0, 2 after a one-line error on stderr, or 130 after Ctrl-C)."""
    args = None
    try:
        args = build_parser().parse_args(argv)
        written, auto_choice = _sample(args)
    except UserError as error:
        return report_user_error(PROG, error)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written{'' if args is None else f' to {args.out}'}", file=sys.stderr,
              flush=True)
        return 130
    if auto_choice:
        print(f"{PROG}: {auto_choice}", file=sys.stderr)
    print(f"{PROG}: wrote {written[0] if len(written) == 1 else f'{len(written)} PNG files to {written[0].parent}'}",
          file=sys.stderr)
    return 0


def _sample(args: argparse.Namespace) -> tuple[list[Path], str | None]:
    """Everything after parsing: check the output, load the engine, check the requests, sample, write.
    Returns the files written and, under --engine auto, which engine it picked and why."""
    check_flags(args)
    init_image, mask = read_edit_images(args)
    count = len(args.prompts)
    seeds = [args.seed + index for index in range(count)]
    plan = plan_output(args.out, seeds)
    adapter_files, lora = adapters_of(args.lora or [])
    engine_name, options = engine_for_flags(args.model, args.engine, args.device, args.precision)
    if not adapter_files:
        engine = load_engine(args.model, engine=engine_name, device=args.device, **options)
    else:
        try:
            engine = load_engine_with_adapters(args.model, engine_name, args.device, options, adapter_files)
        except AdapterError as error:
            raise SampleError(f"--lora: {error}") from None
    auto_choice = f"--engine auto picked {engine.info.name}" if args.engine == "auto" else None
    pipeline = Pipeline(engine)
    requests = [
        pipeline.resolve(GenerationRequest(
            prompt=prompt, negative_prompt=args.negative_prompt, seed=seed, sampler=args.sampler, steps=args.steps,
            guidance_scale=args.guidance, guidance_interval=args.guidance_interval,
            cache_interval=args.cache_interval, cache_schedule=args.cache_schedule, eta=args.eta,
            height=args.height, width=args.width, init_image=init_image, strength=args.strength, mask=mask,
            lora=lora))
        for prompt, seed in zip(args.prompts, seeds)
    ]
    for request in requests:
        pipeline.validate(request)
    pixels = sum(math.prod(pipeline.image_shape(request)) for request in requests)
    if pixels > MAX_PIXELS:
        height, width = pipeline.image_shape(requests[0])
        raise SampleError(f"{count} images of {height}x{width} are {pixels} pixels; expected at most {MAX_PIXELS} in "
                          f"one run (fewer prompts or a smaller --height and --width)")
    if note := precision_note(engine, args.precision):  # once the requests are known good, before a slow start
        print(f"{PROG}: {note}", file=sys.stderr, flush=True)
    images = pipeline.generate(requests, progress=True, batch_size=args.batch_size)
    metadata = []
    for request, image in zip(requests, images):
        settings = dataclasses.asdict(dataclasses.replace(request, init_image=None, mask=None))
        settings.update(height=image.shape[0], width=image.shape[1], model=str(args.model),
                        engine=engine.info.name, init_image=args.init_image, mask=args.mask)
        metadata.append(settings)
    return write_outputs(plan, images, metadata), auto_choice


def check_flags(args: argparse.Namespace) -> None:
    """``SampleError`` naming the first flag above what any model allows (the pipeline checks each against the
    model's own range, and the lower bounds, once it is loaded), an empty ``--out``, or a prompt that is not UTF-8
    (``RequestError``, as the pipeline words it)."""
    if len(args.prompts) > MAX_PROMPTS:
        raise SampleError(f"{len(args.prompts)} prompts make {len(args.prompts)} images; expected at most "
                          f"{MAX_PROMPTS} in one run")
    if not args.out:
        raise SampleError("--out is ''; expected a folder or, for a single prompt, a .png file")
    for prompt in args.prompts:
        check_text("prompt", prompt)
    check_text("negative_prompt", args.negative_prompt)
    # a model's own range (known once it is loaded) may be smaller: these messages claim no range of their own
    limits = {"--steps": (args.steps, MAX_TRAIN_TIMESTEPS), "--height": (args.height, LARGEST_IMAGE_SIDE),
              "--width": (args.width, LARGEST_IMAGE_SIDE)}
    for flag, (value, most) in limits.items():
        if value is not None and value > most:
            raise SampleError(f"{flag} is {value}, more than any model allows ({most}); expected a value within the "
                              f"model's own range")
    if args.cache_interval is not None and args.cache_interval > MAX_CACHE_INTERVAL:  # the same for every model
        raise SampleError(f"--cache-interval is {args.cache_interval}; expected an integer from 1 to "
                          f"{MAX_CACHE_INTERVAL}")
    for flag, value in (("--strength", args.strength), ("--mask", args.mask)):
        if value is not None and args.init_image is None:
            raise SampleError(f"{flag} {value} is given without --init-image; expected an --init-image for it")


def adapters_of(given: list[tuple[Path, float]]) -> tuple[dict[str, Path], tuple[tuple[str, float], ...]]:
    """``--lora FILE[:SCALE]``'s adapters {name: file}, each named by its file's stem, and the (name, scale) pairs
    every prompt applies; ``SampleError`` for a stem that is no adapter name, or two files of one stem."""
    if len(given) > MAX_REQUEST_ADAPTERS:
        raise SampleError(f"--lora is given {len(given)} times; expected at most {MAX_REQUEST_ADAPTERS} adapters")
    files: dict[str, Path] = {}
    for path, _ in given:
        name = path.stem
        if not ADAPTER_NAME.fullmatch(name):
            raise SampleError(f"--lora {path}: its file name {name!r} names the adapter; expected 1 to 64 letters, "
                              f"digits, '_', '-' or '.', starting with a letter or digit (rename the file)")
        if name in files:
            raise SampleError(f"--lora {path} and --lora {files[name]} are both named {name!r} (their file names); "
                              f"expected each adapter once, under file names that differ")
        files[name] = path
    return files, tuple((path.stem, scale) for path, scale in given)


def read_edit_images(args: argparse.Namespace) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``--init-image`` ``(H, W, 3) uint8`` and ``--mask`` ``(H, W) uint8`` (None where not given), read as untrusted
    files (``images.read_upload``); a ``UserError`` naming the flag and path for a path that is not a regular file
    (a named pipe is never waited on) or cannot be read or decoded, or a mask of another size."""
    read = {}
    for flag, path, grey in (("--init-image", args.init_image, False), ("--mask", args.mask, True)):
        if path is None:
            continue
        what = f"{flag} {path}"
        data = _read_regular_file(path, what)
        if len(data) > MAX_UPLOAD_BYTES:
            raise SampleError(f"{what} is over {MAX_UPLOAD_BYTES} bytes; expected an image of at most that")
        read[flag] = read_upload(data, what, max_side=LARGEST_IMAGE_SIDE, mask=grey)
    image, mask = read.get("--init-image"), read.get("--mask")
    if image is not None and mask is not None and mask.shape != image.shape[:2]:
        raise SampleError(f"--mask {args.mask} is {mask.shape[1]}x{mask.shape[0]} pixels; expected the --init-image's "
                          f"size, {image.shape[1]}x{image.shape[0]}")
    return image, mask


def _read_regular_file(path: str, what: str) -> bytes:
    """The first ``MAX_UPLOAD_BYTES + 1`` bytes of ``path`` (one byte past the limit is enough to refuse it);
    ``SampleError`` naming ``what`` for a path that is not a regular file (or a symlink to one) or cannot be read."""
    try:
        # without blocking: a named pipe with no writer opens at once, to be refused rather than waited on for ever
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            mode = os.fstat(descriptor).st_mode
        except OSError:
            os.close(descriptor)
            raise
        if not stat.S_ISREG(mode):
            os.close(descriptor)
            raise SampleError(f"{what} is {special_file_kind(mode)}, not a regular file; expected a PNG, JPEG or "
                              f"WebP image file")
        with open(descriptor, "rb") as file:
            return file.read(MAX_UPLOAD_BYTES + 1)
    except OSError as error:
        raise SampleError(f"{what} cannot be read: {error.strerror or error}") from None


@dataclass(frozen=True)
class OutputPlan:
    """Where the images go: ``image_paths[i]`` for prompt i, and ``grid_path`` when there are several."""

    folder: Path
    image_paths: list[Path]
    grid_path: Path | None


def plan_output(out: str, seeds: list[int]) -> OutputPlan:
    """The files ``--out`` names for these prompts; ``SampleError`` when they could not be written."""
    path = Path(out)
    single_file = path.suffix.lower() == ".png" and not path.is_dir()
    if single_file and len(seeds) > 1:
        raise SampleError(f"--out {out} is a .png file but {len(seeds)} prompts make {len(seeds)} images; "
                          f"expected a folder")
    folder = path.parent if single_file else path
    _check_folder_writable(folder, out)
    if single_file:
        plan = OutputPlan(folder, [path], None)
    else:
        names = [folder / IMAGE_NAME.format(index=index, seed=seed) for index, seed in enumerate(seeds)]
        plan = OutputPlan(folder, names, folder / GRID_NAME if len(seeds) > 1 else None)
    _check_destinations(plan)
    return plan


def _check_folder_writable(folder: Path, out: str) -> None:
    """``SampleError`` unless ``folder`` is a writable folder or could be created as one."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SampleError(f"--out {out} cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SampleError(f"--out {out} cannot be written: folder {existing} is not writable")


def _check_destinations(plan: OutputPlan) -> None:
    """``SampleError`` naming the first file of ``plan`` that a PNG cannot replace: something there that is not a
    regular file (or a symlink to one), such as a folder."""
    for path in [*plan.image_paths, *([plan.grid_path] if plan.grid_path is not None else [])]:
        try:
            mode = path.stat().st_mode
        except OSError:  # nothing there, or a dangling symlink the rename replaces; other errors show on writing
            continue
        if not stat.S_ISREG(mode):
            raise SampleError(f"cannot write the images to {plan.folder}: {path} is {special_file_kind(mode)}, not "
                              f"a regular file; expected nothing there or a file to replace (move it away)")


@contextlib.contextmanager
def _ctrl_c_ignored() -> Iterator[None]:
    """Ctrl-C and SIGTERM ignored within (the main thread receives them; other threads never do), so that renames
    into place happen all or none."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous[signal.SIGINT] is None
                      else previous[signal.SIGINT])
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous[signal.SIGTERM] is None
                      else previous[signal.SIGTERM])


def write_outputs(plan: OutputPlan, images: list[np.ndarray], metadata: list[dict[str, Any]]) -> list[Path]:
    """Write every PNG under a temporary name, check that nothing is in the way of the files it replaces, then rename
    them all into place (ignoring Ctrl-C meanwhile); on failure or Ctrl-C nothing is left and no earlier file is
    replaced."""
    missing = plan.folder
    while not missing.parent.exists() and missing != missing.parent:
        missing = missing.parent  # the outermost folder this call creates, removed again on failure
    created = None if plan.folder.exists() else missing
    outputs = list(zip(plan.image_paths, images, metadata))
    if plan.grid_path is not None:
        outputs.append((plan.grid_path, image_grid(images), metadata))
    renamed = False
    try:
        plan.folder.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as temporaries:  # each removed on exit unless renamed into place
            staged = []
            for path, image, settings in outputs:
                staged.append(temporaries.enter_context(temporary_folder(path)) / path.name)
                staged[-1].write_bytes(png_bytes(image, settings))
            _check_destinations(plan)  # again: sampling took a while
            with _ctrl_c_ignored():
                for (path, _, _), temporary in zip(outputs, staged):
                    os.replace(temporary, path)
                renamed = True
                temporaries.close()
    except (OSError, SampleError, KeyboardInterrupt) as error:
        if created is not None and not renamed:
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(error, OSError):
            where = f"{error.filename2}: " if error.filename2 else ""  # os.replace names the file it replaces
            raise SampleError(f"cannot write the images to {plan.folder}: {where}{error.strerror or error}") from None
        raise
    return [path for path, _, _ in outputs]


if __name__ == "__main__":
    sys.exit(main())
