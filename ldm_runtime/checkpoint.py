"""Reading a checkpoint dir: ``model.json`` and the ``*.safetensors`` weights (never pickle), into the networks.

Layout of a checkpoint dir (``ldm_train.checkpoint`` writes it)::

    model.json                 ModelConfig (the whole model description)
    autoencoder.safetensors    autoencoder weights
    unet.safetensors           UNet weights (the EMA copy: what sampling uses)
    text_encoder.safetensors   only for a text encoder trained from scratch
    tokenizer/                 the tokenizer files, so the dir is self-contained
    train_state.json           stage, step, settings, sha256 of every file above (written last; ldm-import
                               writes one too, with stage "import")
    train_state.safetensors    raw weights, EMA, optimiser moments: what ``--resume`` needs

Every reader turns what a user's folder can get wrong (a missing or unreadable file, a model.json that does
not parse, weights that do not fit) into ``CheckpointError`` naming the file. torch, safetensors and the
networks are imported when weights are read, so ``load_model_config`` runs without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldm_runtime.config import ConfigError, ModelConfig
from ldm_runtime.errors import CheckpointError, one_line
from ldm_runtime.files import read_description, sha256_file, write_text_atomic

if TYPE_CHECKING:
    import torch

    from ldm_runtime.models import Autoencoder, TextEncoder, UNet

MODEL_JSON = "model.json"
TRAIN_STATE_JSON = "train_state.json"
TRAIN_STATE_TENSORS = "train_state.safetensors"
TOKENIZER_DIR = "tokenizer"
AUTOENCODER_WEIGHTS = "autoencoder.safetensors"
UNET_WEIGHTS = "unet.safetensors"
TEXT_ENCODER_WEIGHTS = "text_encoder.safetensors"
TEXT_ENCODER_DIR = "text_encoder"  # a pretrained text encoder that was trained with from a folder, copied in

__all__ = ["CheckpointError", "CheckpointNetworks", "load_checkpoint", "load_model_config", "load_state_dict_file",
           "load_tensors", "load_text_encoder", "model_files", "weight_files", "write_train_state"]


def weight_files(config: ModelConfig) -> list[str]:
    """The names of the model's weight files, in the order its networks are loaded."""
    names = [AUTOENCODER_WEIGHTS, UNET_WEIGHTS]
    if config.text_encoder.kind in ("scratch", "clip"):  # SD's CLIP weights ship in the checkpoint
        names.append(TEXT_ENCODER_WEIGHTS)
    return names


def model_files(config: ModelConfig) -> list[str]:
    """The names of the files that define the model (model.json and the weights), sorted."""
    return sorted([MODEL_JSON, *weight_files(config)])


def recorded_digests(folder: Path) -> dict[str, str]:
    """{file name: sha256} as ``train_state.json`` records them; empty for a checkpoint dir without one (assembled
    by hand: the safetensors reader still refuses a truncated file). ``CheckpointError`` for a
    ``train_state.json`` that is not what ldm-train writes."""
    path = folder / TRAIN_STATE_JSON
    if not path.is_file():
        return {}
    try:
        files = json.loads(path.read_text())["files"]
        if not all(isinstance(name, str) and isinstance(digest, str) for name, digest in files.items()):
            raise TypeError("a file name or digest is not a string")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError,
            AttributeError) as error:
        raise CheckpointError(f"{path} is unreadable ({error}); expected the JSON that ldm-train writes") from None
    return dict(files)


def verify_recorded_digests(folder: Path, names: list[str]) -> None:
    """``CheckpointError`` for the first of ``names`` (paths inside ``folder``) whose sha256 differs from the one
    ``train_state.json`` records for it, or that it does not record at all (a file an earlier run left beside
    this one's); nothing is checked in a folder without one. Every reader of a checkpoint file calls this before
    it reads the file."""
    recorded = recorded_digests(folder)
    for name in names:
        path = folder / name
        if recorded and name not in recorded and path.is_file():
            raise CheckpointError(f"{path} is not among the files {folder / TRAIN_STATE_JSON} records (its run wrote "
                                  f"{', '.join(sorted(recorded))}): it was left by another run; expected a folder "
                                  f"whose {TRAIN_STATE_JSON} records every file read from it")
        if name in recorded and path.is_file() and sha256_file(path) != recorded[name]:
            raise CheckpointError(f"{path} does not match the sha256 recorded in {TRAIN_STATE_JSON}; expected the "
                                  f"file as ldm-train wrote it (it is truncated, damaged or was changed after "
                                  f"training)")


def write_train_state(folder: Path, names: list[str], stage: str, step: int, settings: dict[str, Any]) -> None:
    """``train_state.json``: the ``stage`` and ``step`` that wrote the checkpoint, its ``settings``, and the sha256
    of each of ``names`` (paths inside ``folder``), which every reader checks a file against before reading it.
    Written last, atomically, once every file it records is complete (ldm-train and ldm-import both write it)."""
    files = {name: sha256_file(folder / name) for name in names}
    state = {"stage": stage, "step": step, "settings": settings, "files": files}
    write_text_atomic(folder / TRAIN_STATE_JSON, json.dumps(state, indent=2, sort_keys=True) + "\n")


def folder_files(folder: Path, name: str) -> list[str]:
    """The files under ``folder / name``, as paths relative to ``folder`` ("tokenizer/tokenizer.json"), sorted."""
    if not (folder / name).is_dir():
        return []
    return sorted(path.relative_to(folder).as_posix() for path in (folder / name).rglob("*") if path.is_file())


def load_model_config(folder: str | Path) -> ModelConfig:
    """The validated ModelConfig of checkpoint dir ``folder``, after checking model.json against the sha256 the
    dir records; ``CheckpointError`` naming what is wrong."""
    folder = Path(folder)
    data = read_description(folder, MODEL_JSON, "checkpoint dir", CheckpointError)  # a small regular file
    verify_recorded_digests(folder, [MODEL_JSON])
    path = folder / MODEL_JSON
    try:
        config = ModelConfig.from_dict(data)
        config.validate()
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{path} is not a valid model description: {error}") from None
    return config


def load_tensors(path: Path) -> dict[str, "torch.Tensor"]:
    """Every tensor of a safetensors file, on the CPU; ``CheckpointError`` for a missing or damaged file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint file {path} ({error}); expected a complete safetensors file")


def load_state_dict_file(module: "torch.nn.Module", path: Path) -> None:
    """Load ``path`` into ``module`` strictly, after checking it against the sha256 its folder records; a mismatch
    names the file and the first differing keys."""
    verify_recorded_digests(path.parent, [path.name])
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


def load_text_encoder(folder: Path, config: ModelConfig) -> "TextEncoder":
    """The text encoder of the checkpoint: its own tokenizer/ when present, its weights when trained from scratch.
    A text encoder folder that model.json names must lie inside ``folder`` (or be an installed package), and every
    file of it and of tokenizer/ is checked against the sha256 the dir records."""
    from transformers.utils import logging as transformers_logging

    from ldm_runtime.models import TextEncoder

    tokenizer = folder / TOKENIZER_DIR
    if tokenizer.is_dir() and not tokenizer.resolve().is_relative_to(folder.resolve()):
        raise CheckpointError(f"{tokenizer} leads outside {folder}; expected the tokenizer files inside the checkpoint")
    verify_recorded_digests(folder, [*folder_files(folder, TOKENIZER_DIR), *folder_files(folder, TEXT_ENCODER_DIR)])
    bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise on the terminal
    try:
        text_encoder = TextEncoder(config.text_encoder, tokenizer_path=tokenizer if tokenizer.is_dir() else None,
                                   model_dir=folder)
    except ConfigError as error:
        raise CheckpointError(f"cannot load the text encoder of {folder}: {error}") from None
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:  # a damaged file's many ways to fail
        reason = one_line(error, 200) or type(error).__name__
        raise CheckpointError(f"cannot load the text encoder or tokenizer of {folder} ({reason}); expected the files "
                              f"as ldm-train or ldm-import wrote them") from None
    finally:
        if bar_was_enabled:
            transformers_logging.enable_progress_bar()
    if config.text_encoder.kind in ("scratch", "clip"):
        load_state_dict_file(text_encoder, folder / TEXT_ENCODER_WEIGHTS)
    return text_encoder


@dataclass
class CheckpointNetworks:
    """The three networks of a checkpoint dir with their weights, in eval mode, float32, on the CPU, frozen."""

    folder: Path
    config: ModelConfig
    autoencoder: "Autoencoder"
    unet: "UNet"
    text_encoder: "TextEncoder"


def load_checkpoint(folder: str | Path) -> CheckpointNetworks:
    """Build the three networks of checkpoint dir ``folder`` and load their weights strictly.

    ``CheckpointError`` naming the problem for a missing dir, model.json or weight file, weights that do not fit
    model.json, or a text encoder whose width is not the UNet's context width.
    """
    import torch

    from ldm_runtime.models import Autoencoder, UNet

    folder = Path(folder)
    config = load_model_config(folder)
    for name in weight_files(config):
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint dir {folder} has no {name}; expected a checkpoint written by "
                                  f"'ldm-train unet'")
    autoencoder = Autoencoder(config.autoencoder)
    load_state_dict_file(autoencoder, folder / AUTOENCODER_WEIGHTS)
    unet = UNet(config.unet)
    load_state_dict_file(unet, folder / UNET_WEIGHTS)
    text_encoder = load_text_encoder(folder, config)
    if text_encoder.hidden_size != config.unet.context_dim:
        raise CheckpointError(
            f"the text encoder of {folder} produces {text_encoder.hidden_size}-wide context but the UNet "
            f"reads context_dim {config.unet.context_dim}; expected them equal"
        )
    for module in (autoencoder, unet, text_encoder):
        module.eval().requires_grad_(False).to(torch.float32)
    return CheckpointNetworks(folder, config, autoencoder, unet, text_encoder)
