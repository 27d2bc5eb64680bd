"""Checkpoint dirs: ``model.json`` + ``*.safetensors`` (never pickle), written so a crash never leaves a torn one.

Layout of a checkpoint dir::

    model.json                 ModelConfig (the whole model description)
    autoencoder.safetensors    autoencoder weights
    unet.safetensors           UNet weights (the EMA copy: what sampling uses)
    text_encoder.safetensors   only for a text encoder trained from scratch
    tokenizer/                 the tokenizer files, so the dir is self-contained
    train_state.json           step, training settings, sha256 of every file above (written last)
    train_state.safetensors    raw weights, EMA, optimiser moments: what ``--resume`` needs

Every file is written to a temporary name and renamed into place; ``train_state.json`` goes last and
lists the sha256 of the others, so a resume can tell a complete checkpoint from one cut short.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from train.config import ConfigError, ModelConfig

MODEL_JSON = "model.json"
TRAIN_STATE_JSON = "train_state.json"
TRAIN_STATE_TENSORS = "train_state.safetensors"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(ValueError):
    """A checkpoint dir or file a user pointed at is missing, unreadable, or not what was expected."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Write via ``write(tmp_path)`` into a sibling temp file, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors needs contiguous, unshared storage: clone what it would refuse."""
    ready = {name: tensor.detach().contiguous().cpu().clone() for name, tensor in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(ready, str(tmp), metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint file {path} ({error}); expected a complete safetensors file")


def load_model_config(folder: str | Path) -> ModelConfig:
    """The ModelConfig of checkpoint dir ``folder``; CheckpointError naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint dir {folder} does not exist or is not a folder")
    path = folder / MODEL_JSON
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a checkpoint dir: it has no {MODEL_JSON}")
    try:
        config = ModelConfig.from_json(path.read_text())
        config.validate()
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})")
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{path} is not a valid model description: {error}")
    return config


@dataclass(frozen=True)
class TrainState:
    """What ``--resume`` needs besides the weights: the step reached and the settings it ran with."""

    stage: str
    step: int
    settings: dict[str, Any]
    files: dict[str, str]  # file name -> sha256


def save_checkpoint(
    folder: Path,
    config: ModelConfig,
    weights: dict[str, dict[str, torch.Tensor]],
    train_tensors: dict[str, torch.Tensor],
    stage: str,
    step: int,
    settings: dict[str, Any],
    save_tokenizer: Callable[[Path], None] | None = None,
) -> None:
    """Write a complete checkpoint. ``weights`` maps a file stem ("unet") to its state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / MODEL_JSON, config.to_json())
    for stem, state in weights.items():
        save_tensors_atomic(folder / f"{stem}.safetensors", state)
    save_tensors_atomic(folder / TRAIN_STATE_TENSORS, train_tensors)
    if save_tokenizer is not None and not (folder / TOKENIZER_DIR).is_dir():
        staging = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=folder))
        save_tokenizer(staging)
        os.replace(staging, folder / TOKENIZER_DIR)
    names = [MODEL_JSON, TRAIN_STATE_TENSORS] + [f"{stem}.safetensors" for stem in weights]
    files = {name: sha256_file(folder / name) for name in names}
    state = {"stage": stage, "step": step, "settings": settings, "files": files}
    write_text_atomic(folder / TRAIN_STATE_JSON, json.dumps(state, indent=2, sort_keys=True) + "\n")


def load_train_state(folder: Path, stage: str) -> TrainState:
    """The train state of a checkpoint to resume; CheckpointError if it is absent, of another stage, or torn."""
    path = folder / TRAIN_STATE_JSON
    if not path.is_file():
        raise CheckpointError(f"cannot resume from {folder}: it has no {TRAIN_STATE_JSON} (not written by ldm-train?)")
    try:
        data = json.loads(path.read_text())
        state = TrainState(stage=data["stage"], step=int(data["step"]), settings=data["settings"], files=data["files"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"cannot resume from {folder}: {path} is unreadable ({error})")
    if state.stage != stage:
        raise CheckpointError(f"cannot resume {stage} training from {folder}: it holds a {state.stage} run")
    for name, digest in state.files.items():
        if not (folder / name).is_file() or sha256_file(folder / name) != digest:
            raise CheckpointError(
                f"cannot resume from {folder}: {name} does not match {TRAIN_STATE_JSON} (a save was cut short)"
            )
    return state


def optimizer_to_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into safetensors-storable tensors and JSON-storable rest."""
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{param_id}.{key}"] = value
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor],
                           meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        param_id, key = name[len(prefix) + 1:].split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    for name, value in meta["scalars"].items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def load_state_dict_file(module: torch.nn.Module, path: Path) -> None:
    """Load ``path`` into ``module`` strictly; a mismatch names the file and the first differing keys."""
    tensors = load_tensors(path)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path} does not fit the model in model.json: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {wrong[:3]}"
        )
    module.load_state_dict(tensors)


def select_prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a train state under ``prefix``, with the prefix removed."""
    selected = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not selected:
        raise CheckpointError(f"the train state has no {prefix.rstrip('.')} weights; it cannot be resumed")
    return selected


def load_text_encoder(folder: Path, config: ModelConfig) -> "TextEncoder":
    """The text encoder of the checkpoint: its own tokenizer/ when present, its weights when trained from scratch."""
    from train.models import TextEncoder

    tokenizer = folder / TOKENIZER_DIR
    from transformers.utils import logging as transformers_logging

    bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise on the terminal
    try:
        text_encoder = TextEncoder(config.text_encoder, tokenizer_path=tokenizer if tokenizer.is_dir() else None)
    except ConfigError as error:
        raise CheckpointError(f"cannot load the text encoder of {folder}: {error}") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load the text encoder or tokenizer of {folder} ({error})") from None
    finally:
        if bar_was_enabled:
            transformers_logging.enable_progress_bar()
    if config.text_encoder.kind in ("scratch", "clip"):
        load_state_dict_file(text_encoder, folder / "text_encoder.safetensors")
    return text_encoder
