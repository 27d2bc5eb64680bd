"""The folders a benchmark reads: a random-weight checkpoint for a preset, and an engine dir exported from a
checkpoint. Each is made in a child process, so the gigabytes an sd15 build or export passes through are
returned to the system before any engine is timed."""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ldm_runtime.config import preset

PRESET_NAMES = ("shapes", "sd15")


class SourceError(Exception):
    """Building a preset checkpoint or exporting an engine dir failed; the message is one line."""


def run_in_child(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a fresh (spawned) process; its return value, or ``SourceError`` with its error."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(sender, function, args), daemon=True)
    process.start()
    sender.close()
    try:
        status, value = receiver.recv()
    except EOFError:
        process.join()
        raise SourceError(f"{function.__name__} died with exit code {process.exitcode} (out of memory?)") from None
    finally:
        process.join()
    if status == "error":
        raise SourceError(value)
    return value


def _child_main(sender, function, args) -> None:
    try:
        sender.send(("ok", function(*args)))
    except BaseException as error:  # reported to the parent as one line; the traceback goes to stderr
        traceback.print_exc()
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        sender.send(("error", f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__))


def write_preset_checkpoint(name: str, latent_size: int, folder: str, seed: int = 0) -> dict[str, Any]:
    """A complete checkpoint dir with random weights for preset ``name`` at ``latent_size`` x ``latent_size``
    latents (the image size is that times the autoencoder's factor); returns its size in parameters.
    A text encoder trained "from scratch" (sd15's BERT) is written into it; a pretrained one is named."""
    from ldm_train.checkpoint import write_random_checkpoint

    config = preset(name)
    config = dataclasses.replace(config, image_size=latent_size * config.autoencoder.factor)
    return write_random_checkpoint(Path(folder), config, seed)


def export_onnxruntime_engine(checkpoint: str, out: str, max_unet_batch: int, image_size: int,
                              model_image_size: int) -> float:
    """Export ``checkpoint`` to an fp32 onnxruntime engine dir at ``out`` whose UNet takes 1 to
    ``max_unet_batch`` rows and whose image sizes cover both ``image_size`` and the model's own; returns the
    seconds it took. Validation is left to the benchmark (one UNet call compared with eager PyTorch)."""
    from ldm_export.engine_dir import ExportOptions, export_engine

    started = time.perf_counter()
    high = max(2, max_unet_batch)
    options = ExportOptions(precision="fp32", backend="onnxruntime", batch_range=(1, min(2, high), high),
                            size_range=(min(image_size, model_image_size), max(image_size, model_image_size)),
                            skip_validation=True)
    export_engine(checkpoint, out, options)
    return time.perf_counter() - started
