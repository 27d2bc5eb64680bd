"""The checkpoint an engine is exported from: its networks (``ldm_runtime.checkpoint``) and the digest that
identifies it.

The checkpoint digest is the sha256 of the text that ``sha256sum`` prints for the files that define the
model, sorted by name: ``model.json`` and the weight files (``autoencoder.safetensors``,
``unet.safetensors``, and ``text_encoder.safetensors`` when the text encoder was trained from scratch or is SD's CLIP), one
line ``<sha256 of the file>  <file name>\\n`` each. Training state (``train_state.*``), previews and
metrics are left out: they do not change the model. A pretrained text encoder's weights live in the
package or folder that model.json names, so the manifest also records the text_encoder.onnx digest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ldm_runtime.checkpoint import (
    TOKENIZER_DIR,
    TRAIN_STATE_JSON,
    CheckpointError,
    CheckpointNetworks,
    load_checkpoint,
    load_model_config,
    model_files,
    recorded_digests,
)
from ldm_runtime.config import ModelConfig
from ldm_runtime.files import sha256_file


def checkpoint_digest(folder: Path, config: ModelConfig) -> tuple[str, dict[str, str]]:
    """(the checkpoint digest, {file name: sha256}); ``CheckpointError`` for a missing file, or for one that
    differs from the sha256 that ``train_state.json`` recorded (a save cut short)."""
    files = {}
    for name in model_files(config):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} has no {name}; expected a checkpoint written by "
                                  f"`ldm-train unet`")
        files[name] = sha256_file(path)
    recorded = recorded_digests(folder)
    for name, digest in files.items():
        if name in recorded and recorded[name] != digest:
            raise CheckpointError(f"{folder / name} does not match the sha256 recorded in {TRAIN_STATE_JSON} "
                                  f"(the file is truncated or was changed after training)")
    listing = "".join(f"{files[name]}  {name}\n" for name in sorted(files))
    return hashlib.sha256(listing.encode()).hexdigest(), files


def load_checkpoint_to_export(folder: str | Path) -> CheckpointNetworks:
    """The networks of checkpoint dir ``folder``, which must also hold its ``tokenizer/`` folder (the engine dir
    gets a copy); ``CheckpointError`` naming what is missing."""
    folder = Path(folder)
    load_model_config(folder)  # a missing folder or model.json is named first
    if not (folder / TOKENIZER_DIR).is_dir():
        raise CheckpointError(f"checkpoint {folder} has no {TOKENIZER_DIR}/ folder; expected a checkpoint "
                              f"written by `ldm-train unet`")
    return load_checkpoint(folder)
