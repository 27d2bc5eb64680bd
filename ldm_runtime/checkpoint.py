"""Reading a checkpoint dir: ``model.json`` and the ``*.safetensors`` weights (never pickle), into the networks.

Layout of a checkpoint dir (``train.checkpoint`` writes it)::

    model.json                 ModelConfig (the whole model description)
    autoencoder.safetensors    autoencoder weights
    unet.safetensors           UNet weights (the EMA copy: what sampling uses)
    text_encoder.safetensors   only for a text encoder trained from scratch
    tokenizer/                 the tokenizer files, so the dir is self-contained
    train_state.json           step, training settings, sha256 of every file above (written last)
    train_state.safetensors    raw weights, EMA, optimiser moments: what ``--resume`` needs

Every reader turns what a user's folder can get wrong (a missing or unreadable file, a model.json that does
not parse, weights that do not fit) into ``CheckpointError`` naming the file. torch, safetensors and the
networks are imported when weights are read, so ``load_model_config`` runs without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ldm_runtime.config import ConfigError, ModelConfig
from ldm_runtime.errors import CheckpointError
from ldm_runtime.files import read_description

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

__all__ = ["CheckpointError", "CheckpointNetworks", "load_checkpoint", "load_model_config", "load_state_dict_file",
           "load_tensors", "load_text_encoder", "model_files", "weight_files"]


def weight_files(config: ModelConfig) -> list[str]:
    """The names of the model's weight files, in the order its networks are loaded."""
    names = [AUTOENCODER_WEIGHTS, UNET_WEIGHTS]
    if config.text_encoder.kind in ("scratch", "clip"):  # SD's CLIP weights ship in the checkpoint
        names.append(TEXT_ENCODER_WEIGHTS)
    return names


def model_files(config: ModelConfig) -> list[str]:
    """The names of the files that define the model (model.json and the weights), sorted."""
    return sorted([MODEL_JSON, *weight_files(config)])


def load_model_config(folder: str | Path) -> ModelConfig:
    """The validated ModelConfig of checkpoint dir ``folder``; ``CheckpointError`` naming what is wrong."""
    data = read_description(folder, MODEL_JSON, "checkpoint dir", CheckpointError)
    path = Path(folder) / MODEL_JSON
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


def load_text_encoder(folder: Path, config: ModelConfig) -> "TextEncoder":
    """The text encoder of the checkpoint: its own tokenizer/ when present, its weights when trained from scratch."""
    from transformers.utils import logging as transformers_logging

    from ldm_runtime.models import TextEncoder

    tokenizer = folder / TOKENIZER_DIR
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
