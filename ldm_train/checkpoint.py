"""Writing checkpoint dirs (the layout and the readers are ``ldm_runtime.checkpoint``), so that a crash or a full
disk never costs the last complete one, and reading back what only ``--resume`` needs.

A save writes a whole new folder beside the checkpoint dir (``train_state.json`` last, with the sha256 of every
other file), syncs it, and swaps it in with one rename (``ldm_runtime.folder_swap``). Until that rename the old
folder is untouched; a save that fails removes its folder, and the next save removes one a killed save left.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
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
    recorded_digests,
    write_train_state,
)
from ldm_runtime.config import ModelConfig
from ldm_runtime.files import safetensors_os_error, sha256_file, write_atomic, write_text_atomic
from ldm_runtime.staging import PARTIAL, REPLACED, current_umask, temporary_folder
from ldm_runtime.folder_swap import fsync_path, replace_folder, restore_replaced


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors needs contiguous, unshared storage: clone what it would refuse. A write that fails in the
    operating system (a full disk) raises that ``OSError``, not safetensors' own error."""
    ready = {name: tensor.detach().contiguous().cpu().clone() for name, tensor in tensors.items()}

    def write(temporary: Path) -> None:
        try:
            save_file(ready, str(temporary), metadata=metadata)
        except SafetensorError as error:
            failed = safetensors_os_error(error, path)
            if failed is None:
                raise
            raise failed from error

    write_atomic(path, write)


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
    first: bool = False,
    logs: Path | None = None,
) -> None:
    """Write a complete checkpoint at ``folder``, replacing the one there in one step. ``weights`` maps a file stem
    ("unet") to its state dict; a pretrained text encoder's ``text_encoder_folder`` is copied in as
    ``text_encoder/`` (once), so the dir is self-contained. Every other entry of the old folder (metrics.jsonl,
    samples/, tokenizer/ and text_encoder/ once written) is carried over as a hard link. ``first``: the first save
    of a run that did not resume the checkpoint there: the tokenizer and text encoder are written anew, and what
    the old ``train_state.json`` records (another run's weights) stays behind. ``logs``: a folder holding what
    this run recorded so far (``run.LiveFolder``), carried over instead of anything of the old folder."""
    target = Path(os.path.realpath(folder))  # an --out that is a symlink keeps naming the checkpoint
    others = _recorded_entries(target) if first else set()
    with temporary_folder(target) as staging:
        _copy_mode(target, staging)
        write_text_atomic(staging / MODEL_JSON, config.to_json())
        for stem, state in weights.items():
            save_tensors_atomic(staging / f"{stem}.safetensors", state)
        # The step also goes into the tensors' header, whose sha256 train_state.json records: an edited step is caught.
        save_tensors_atomic(staging / TRAIN_STATE_TENSORS, train_tensors, metadata={"stage": stage, "step": str(step)})
        if save_tokenizer is not None and (first or not (target / TOKENIZER_DIR).is_dir()):
            save_tokenizer(staging / TOKENIZER_DIR)
        if text_encoder_folder is not None and (first or not (target / TEXT_ENCODER_DIR).is_dir()):
            shutil.copytree(text_encoder_folder, staging / TEXT_ENCODER_DIR)
        # train_state.json is written next: a link would share the old one's bytes
        _carry_over(target if logs is None else logs, staging, skip={TRAIN_STATE_JSON, *others})
        names = [MODEL_JSON, TRAIN_STATE_TENSORS, *(f"{stem}.safetensors" for stem in weights),
                 *folder_files(staging, TOKENIZER_DIR), *folder_files(staging, TEXT_ENCODER_DIR)]
        write_train_state(staging, names, stage, step, settings)
        _sync_tree(staging)
        replace_folder(staging, target)


def _recorded_entries(folder: Path) -> set[str]:
    """The entries of ``folder`` that its ``train_state.json`` records (a file, or the folder holding one), if it
    can be read."""
    try:
        return {Path(name).parts[0] for name in recorded_digests(folder) if Path(name).parts}
    except CheckpointError:
        return set()


def _copy_mode(target: Path, staging: Path) -> None:
    """mkdtemp made ``staging`` private: give it the old folder's permissions, or the umask's for a new one."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o777 & ~current_umask()
    os.chmod(staging, mode)


def _carry_over(old: Path, new: Path, skip: set[str]) -> None:
    """Hard-link into ``new`` every entry of ``old`` that ``new`` lacks, except ``skip`` and the temporary folders
    of killed writers."""
    if not old.is_dir():
        return
    for entry in sorted(os.listdir(old)):
        source, destination = old / entry, new / entry
        temporary = entry.startswith(".") and any(f".{kind}-" in entry for kind in (PARTIAL, REPLACED))
        if entry in skip or temporary or os.path.lexists(destination):
            continue
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, destination, symlinks=True, copy_function=_link_or_copy)
        elif source.is_symlink():
            os.symlink(os.readlink(source), destination)
        else:
            _link_or_copy(source, destination)


# A file system that cannot hard-link this file gets a copy instead; any other error (ENOSPC) stops the save.
_NO_HARD_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP)


def _link_or_copy(source: str | Path, destination: str | Path) -> None:
    try:
        os.link(source, destination)
    except OSError as error:
        if error.errno not in _NO_HARD_LINK:
            raise
        shutil.copy2(source, destination)


def _sync_tree(folder: Path) -> None:
    """Every file and folder under ``folder`` on the device, before a rename makes it the checkpoint."""
    for root, _, files in os.walk(folder):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync_path(Path(root, name))
        fsync_path(Path(root))


def load_train_state(folder: Path, stage: str, optimizers: tuple[str, ...] = ()) -> TrainState:
    """The train state of a checkpoint to resume (put back first if a save was killed mid-swap); CheckpointError if
    it is absent, of another stage, torn, or lacks the settings of ``optimizers`` (their state's layout)."""
    restore_replaced(folder)
    path = folder / TRAIN_STATE_JSON
    if not path.is_file():
        raise CheckpointError(f"cannot resume from {folder}: it has no {TRAIN_STATE_JSON} (not written by ldm-train?)")
    try:
        data = json.loads(path.read_text())
        state = TrainState(stage=data["stage"], step=data["step"], settings=data["settings"], files=data["files"])
        if isinstance(state.step, bool) or not isinstance(state.step, int) or state.step < 0:
            raise TypeError(f"its step is {state.step!r}; expected a non-negative integer")
        if not isinstance(state.stage, str) or not isinstance(state.settings, dict):
            raise TypeError("its stage or settings are not a string and an object")
        if not isinstance(state.files, dict) or not all(isinstance(name, str) and isinstance(digest, str)
                                                        for name, digest in state.files.items()):
            raise TypeError("its files are not an object of file names and sha256 digests")
        for name in optimizers:
            if not isinstance(state.settings.get(name), dict):
                raise TypeError(f"its settings lack {name}, the optimiser state's layout")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError, ValueError) as error:
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
