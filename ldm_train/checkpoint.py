"""Writing checkpoint dirs (the layout and the readers are ``ldm_runtime.checkpoint``), so that a crash never
leaves a torn one, and reading back what only ``--resume`` needs.

Every file is written to a temporary name and renamed into place; ``train_state.json`` goes last and
lists the sha256 of the others, so a resume can tell a complete checkpoint from one cut short.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm_runtime.checkpoint import (
    MODEL_JSON,
    TEXT_ENCODER_DIR,
    TOKENIZER_DIR,
    TRAIN_STATE_JSON,
    TRAIN_STATE_TENSORS,
    CheckpointError,
    folder_files,
    write_train_state,
)
from ldm_runtime.config import ModelConfig
from ldm_runtime.files import sha256_file, write_atomic, write_text_atomic
from ldm_runtime.staging import temporary_folder


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors needs contiguous, unshared storage: clone what it would refuse."""
    ready = {name: tensor.detach().contiguous().cpu().clone() for name, tensor in tensors.items()}
    write_atomic(path, lambda tmp: save_file(ready, str(tmp), metadata=metadata))


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
    text_encoder_folder: Path | None = None,
) -> None:
    """Write a complete checkpoint. ``weights`` maps a file stem ("unet") to its state dict; a pretrained text
    encoder's ``text_encoder_folder`` is copied in as ``text_encoder/`` (once), so the dir is self-contained."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / MODEL_JSON, config.to_json())
    for stem, state in weights.items():
        save_tensors_atomic(folder / f"{stem}.safetensors", state)
    # The step also goes into the tensors' header, whose sha256 train_state.json records: an edited step is caught.
    save_tensors_atomic(folder / TRAIN_STATE_TENSORS, train_tensors, metadata={"stage": stage, "step": str(step)})
    if save_tokenizer is not None and not (folder / TOKENIZER_DIR).is_dir():
        with temporary_folder(folder / TOKENIZER_DIR) as staging:
            save_tokenizer(staging)
            os.replace(staging, folder / TOKENIZER_DIR)
    if text_encoder_folder is not None and not (folder / TEXT_ENCODER_DIR).is_dir():
        with temporary_folder(folder / TEXT_ENCODER_DIR) as staging:
            shutil.copytree(text_encoder_folder, staging, dirs_exist_ok=True)
            os.replace(staging, folder / TEXT_ENCODER_DIR)
    names = [MODEL_JSON, TRAIN_STATE_TENSORS, *(f"{stem}.safetensors" for stem in weights),
             *folder_files(folder, TOKENIZER_DIR), *folder_files(folder, TEXT_ENCODER_DIR)]
    write_train_state(folder, names, stage, step, settings)


def load_train_state(folder: Path, stage: str) -> TrainState:
    """The train state of a checkpoint to resume; CheckpointError if it is absent, of another stage, or torn."""
    path = folder / TRAIN_STATE_JSON
    if not path.is_file():
        raise CheckpointError(f"cannot resume from {folder}: it has no {TRAIN_STATE_JSON} (not written by ldm-train?)")
    try:
        data = json.loads(path.read_text())
        state = TrainState(stage=data["stage"], step=data["step"], settings=data["settings"], files=data["files"])
        if isinstance(state.step, bool) or not isinstance(state.step, int) or state.step < 0:
            raise TypeError(f"its step is {state.step!r}; expected a non-negative integer")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"cannot resume from {folder}: {path} is unreadable ({error})")
    if state.stage != stage:
        raise CheckpointError(f"cannot resume {stage} training from {folder}: it holds a {state.stage} run")
    for name, digest in state.files.items():
        if not (folder / name).is_file() or sha256_file(folder / name) != digest:
            raise CheckpointError(
                f"cannot resume from {folder}: {name} does not match {TRAIN_STATE_JSON} (a save was cut short)"
            )
    saved = _tensor_metadata(folder / TRAIN_STATE_TENSORS)
    if "step" in saved and (saved["step"], saved.get("stage")) != (str(state.step), state.stage):
        raise CheckpointError(f"cannot resume from {folder}: {TRAIN_STATE_JSON} says {state.stage} step {state.step} "
                              f"but {TRAIN_STATE_TENSORS} was saved at {saved.get('stage')} step {saved['step']}; "
                              f"expected them equal ({TRAIN_STATE_JSON} was edited)")
    return state


def _tensor_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header (empty when it has none, as before steps were recorded
    there)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read {path} ({error}); expected a complete safetensors file") from None


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


def select_prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a train state under ``prefix``, with the prefix removed."""
    selected = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not selected:
        raise CheckpointError(f"the train state has no {prefix.rstrip('.')} weights; it cannot be resumed")
    return selected


def write_random_checkpoint(folder: Path, config: ModelConfig, seed: int = 0) -> dict[str, int]:
    """A complete checkpoint dir of ``config`` with random weights (model.json, the weights, tokenizer/,
    train_state.json), laid out as ``ldm-train unet`` writes it, for tests and benchmarks; a text encoder
    trained "from scratch" has its weights written, a pretrained one is named. Returns each network's
    parameter count (``autoencoder_parameters``, ``unet_parameters``, ``text_encoder_parameters``)."""
    from ldm_runtime.models import Autoencoder, TextEncoder, UNet, count_parameters

    config.validate()
    torch.manual_seed(seed)
    autoencoder = Autoencoder(config.autoencoder)
    unet = UNet(config.unet)
    text_encoder = TextEncoder(config.text_encoder)
    weights = {"autoencoder": autoencoder.state_dict(), "unet": unet.state_dict()}
    if text_encoder.trainable:
        weights["text_encoder"] = text_encoder.state_dict()
    save_checkpoint(Path(folder), config, weights, {}, stage="unet", step=0, settings={"random_weights": True},
                    save_tokenizer=text_encoder.save_tokenizer)
    return {"unet_parameters": count_parameters(unet), "autoencoder_parameters": count_parameters(autoencoder),
            "text_encoder_parameters": count_parameters(text_encoder)}
