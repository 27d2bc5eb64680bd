"""A random-weight checkpoint small enough to export in seconds (the ``tiny`` preset): 16 px images, f=2, a
two-level UNet, a one-layer text encoder trained "from scratch" (so its weights are in the checkpoint) on MiniLM's
tokenizer."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
from pathlib import Path
from typing import Iterator

from ldm_runtime.config import preset
from ldm_train.checkpoint import write_random_checkpoint

TINY_CONFIG = preset("tiny")
IMAGE_SIZE_MULTIPLE = 4  # f=2 times the UNet's one halving


def write_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Write a complete checkpoint dir (model.json, weights, tokenizer/, train_state.json) into ``folder``."""
    write_random_checkpoint(folder, TINY_CONFIG, seed)
    return folder


def _shared_root(tmp_path_factory) -> Path:
    """The folder every pytest-xdist worker of this run sees (the run's own tmp folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _run_lock(root: Path, name: str) -> Iterator[None]:
    """One worker builds shared artifact ``name``; the others wait for it, then reuse it (different artifacts,
    such as the fp32 and the fp16 engine, are built in parallel)."""
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def shared_tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint dir, written once per test run."""
    root = _shared_root(tmp_path_factory)
    checkpoint = root / "tiny-checkpoint"
    with _run_lock(root, checkpoint.name):
        if not (checkpoint / "train_state.json").is_file():
            write_tiny_checkpoint(checkpoint)
    return checkpoint


def shared_tiny_engine(tmp_path_factory, precision: str) -> tuple[Path, Path, int, str]:
    """(checkpoint dir, engine dir, ldm-export exit code, its stdout + stderr) for the tiny checkpoint exported
    at ``precision`` with validation on: built once per test run, shared by every module and xdist worker."""
    from ldm_export.cli import main

    checkpoint = shared_tiny_checkpoint(tmp_path_factory)
    root = _shared_root(tmp_path_factory)
    engine, record = root / f"tiny-engine-{precision}", root / f"tiny-engine-{precision}.json"
    with _run_lock(root, engine.name):
        if not record.is_file():
            output = io.StringIO()
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                code = main([str(checkpoint), "--out", str(engine), "--engine", precision])
            record.write_text(json.dumps({"code": code, "output": output.getvalue()}))
    result = json.loads(record.read_text())
    return checkpoint, engine, result["code"], result["output"]
