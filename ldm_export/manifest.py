"""What ``ldm-export`` records in ``manifest.json`` (the format itself is ``ldm_runtime.manifest``)."""

from __future__ import annotations

import dataclasses
import platform
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from ldm_runtime.checkpoint import CheckpointNetworks
from ldm_runtime.manifest import DEFINITION_SHA256, MANIFEST_FORMAT_VERSION, DimRange, GraphEntry, definition_digests

CHECKPOINT_DIGEST_DEFINITION = ("sha256 of the lines '<sha256>  <file>' (sha256sum format, sorted by file name) for "
                                "model.json and the model's *.safetensors weight files (train_state.* excluded)")


def tool_versions() -> dict[str, str]:
    """Versions of the tools that made the graphs (a package that is not installed is left out)."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt", "transformers",
                    "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def build_manifest(*, modules: CheckpointNetworks, precision: str, backend: str, io_dtype: str, opset: int,
                   dims: dict[str, DimRange], graphs: dict[str, GraphEntry], tokenizer_files: dict[str, str],
                   checkpoint_sha256: str, checkpoint_files: dict[str, str], validation: dict | None,
                   tensorrt: dict | None, tokenizer_sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """The manifest.json object; ``ldm_runtime.manifest.EngineManifest.from_dict`` reads it back. It records the
    sha256 of the parts that define the model (``definition_sha256``: the runtime refuses a manifest whose model,
    schedule or DDIM settings were edited after export) and the tokenizer files' sizes (``tokenizer_sizes``)."""
    config = modules.config
    tokenizer = {"folder": "tokenizer", "files": tokenizer_files}
    if tokenizer_sizes is not None:
        tokenizer["sizes"] = tokenizer_sizes
    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "precision": precision,
        "backend": backend,
        "io_dtype": io_dtype,  # dtype of the float inputs and outputs of the fp16 graphs (fp32 ones: float32)
        "opset": opset,
        "model": {
            "image_size": config.image_size,
            "latent_channels": config.autoencoder.latent_channels,
            "latent_factor": config.autoencoder.factor,
            "latent_scale_factor": float(config.latent_scale_factor),
            "text_max_length": config.text_encoder.max_length,
            "context_dim": config.unet.context_dim,
            "mask_padding": config.text_encoder.mask_padding,
            "inpainting": config.inpainting,
            "autoencoder_kind": config.autoencoder.kind,
            "text_encoder": dataclasses.asdict(config.text_encoder),
        },
        "schedule": config.schedule.to_dict(),
        "sampler": config.sampler.to_dict(),
        "default_sampler": config.default_sampler.to_dict(),
        "dims": {name: dataclasses.asdict(allowed) for name, allowed in dims.items()},
        "graphs": {name: entry.to_dict() for name, entry in graphs.items()},
        "tokenizer": tokenizer,
        "source": {
            "checkpoint": str(modules.folder.resolve()),
            "sha256": checkpoint_sha256,
            "sha256_definition": CHECKPOINT_DIGEST_DEFINITION,
            "files": checkpoint_files,
        },
        "validation": validation,
        "tensorrt": tensorrt,
        "tools": tool_versions(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifest[DEFINITION_SHA256] = definition_digests(manifest)
    return manifest
