"""The checkpoint an engine is exported from: its eager modules and the digest that identifies it.

The checkpoint digest is the sha256 of the text that ``sha256sum`` prints for the files that define the
model, sorted by name: ``model.json`` and the weight files (``autoencoder.safetensors``,
``unet.safetensors``, and ``text_encoder.safetensors`` when the text encoder was trained from scratch or is SD's CLIP), one
line ``<sha256 of the file>  <file name>\\n`` each. Training state (``train_state.*``), previews and
metrics are left out: they do not change the model. A pretrained text encoder's weights live in the
package or folder that model.json names, so the manifest also records the text_encoder.onnx digest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from train.checkpoint import (
    MODEL_JSON,
    TOKENIZER_DIR,
    TRAIN_STATE_JSON,
    CheckpointError,
    load_model_config,
    load_state_dict_file,
    load_text_encoder,
    sha256_file,
)
from train.config import ModelConfig
from train.models import Autoencoder, TextEncoder, UNet


@dataclass
class CheckpointModules:
    """The eager modules of a checkpoint dir, in eval mode, float32, on the CPU."""

    folder: Path
    config: ModelConfig
    autoencoder: Autoencoder
    unet: UNet
    text_encoder: TextEncoder

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / TOKENIZER_DIR


def model_files(folder: Path, config: ModelConfig) -> list[str]:
    """The names of the files that define the model (see the module docstring), sorted."""
    names = [MODEL_JSON, "autoencoder.safetensors", "unet.safetensors"]
    if config.text_encoder.kind in ("scratch", "clip"):
        names.append("text_encoder.safetensors")
    return sorted(names)


def checkpoint_digest(folder: Path, config: ModelConfig) -> tuple[str, dict[str, str]]:
    """(the checkpoint digest, {file name: sha256}); ``CheckpointError`` for a missing file, or for one that
    differs from the sha256 that ``train_state.json`` recorded (a save cut short)."""
    files = {}
    for name in model_files(folder, config):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} has no {name}; expected a checkpoint written by "
                                  f"`ldm-train unet`")
        files[name] = sha256_file(path)
    recorded = _recorded_digests(folder)
    for name, digest in files.items():
        if name in recorded and recorded[name] != digest:
            raise CheckpointError(f"{folder / name} does not match the sha256 recorded in {TRAIN_STATE_JSON} "
                                  f"(the file is truncated or was changed after training)")
    listing = "".join(f"{files[name]}  {name}\n" for name in sorted(files))
    return hashlib.sha256(listing.encode()).hexdigest(), files


def _recorded_digests(folder: Path) -> dict[str, str]:
    path = folder / TRAIN_STATE_JSON
    if not path.is_file():
        return {}  # a checkpoint assembled by hand: the safetensors reader still rejects truncated files
    try:
        return dict(json.loads(path.read_text())["files"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is unreadable ({error}); expected the JSON that ldm-train writes")


def load_checkpoint_modules(folder: str | Path) -> CheckpointModules:
    """Build the three networks of checkpoint dir ``folder`` and load their weights (strictly).

    ``CheckpointError`` naming the problem for a missing dir, model.json, weight file or tokenizer folder.
    """
    folder = Path(folder)
    config = load_model_config(folder)
    if not (folder / TOKENIZER_DIR).is_dir():
        raise CheckpointError(f"checkpoint {folder} has no {TOKENIZER_DIR}/ folder; expected a checkpoint "
                              f"written by `ldm-train unet`")
    for name in model_files(folder, config):
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder} has no {name}; expected a checkpoint written by "
                                  f"`ldm-train unet`")
    autoencoder = Autoencoder(config.autoencoder)
    load_state_dict_file(autoencoder, folder / "autoencoder.safetensors")
    unet = UNet(config.unet)
    load_state_dict_file(unet, folder / "unet.safetensors")
    text_encoder = load_text_encoder(folder, config)  # tokenizer/ is required above
    if text_encoder.hidden_size != config.unet.context_dim:
        raise CheckpointError(f"the text encoder of {folder} gives {text_encoder.hidden_size}-wide context but the "
                              f"UNet reads context_dim {config.unet.context_dim}")
    modules = CheckpointModules(folder, config, autoencoder, unet, text_encoder)
    for module in (autoencoder, unet, text_encoder):
        module.eval().requires_grad_(False).to(torch.float32)
    return modules
