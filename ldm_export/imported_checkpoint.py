"""The checkpoint dir ``ldm-import`` writes, whatever the source's layout, and the weights that go into it: read
from safetensors as float32, CLIP's keyed as our text encoder's, each checked against our network's state dict.

torch, safetensors and transformers are imported when weights are read or written: ``ldm-import --help`` needs none.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ldm_export.errors import ImportRefusedError
from ldm_runtime.checkpoint import MODEL_JSON, TOKENIZER_DIR, folder_files, load_model_config, write_train_state
from ldm_runtime.config import ModelConfig, TextEncoderConfig
from ldm_runtime.staging import temporary_folder


def load_safetensors(path: Path) -> dict[str, Any]:
    """Every tensor of ``path`` as float32 (a half-precision release is widened: models run at full precision)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ImportRefusedError(f"cannot read {path} ({error}); expected a complete safetensors file") from None
    return {name: t.to(torch.float32) if t.is_floating_point() else t for name, t in tensors.items()}


def fit_state_dict(module, tensors: dict[str, Any], what: str, where: Path) -> dict[str, Any]:
    """``tensors`` checked against ``module``'s state dict: every key present with its shape (a 1x1 conv kernel
    fits a linear weight); ``ImportRefusedError`` naming the first key that is missing, extra or misshapen."""
    expected = module.state_dict()
    fitted = {}
    for name, tensor in tensors.items():
        if name not in expected:
            if name.endswith("position_ids"):  # a buffer older transformers saved; ours is rebuilt
                continue
            raise ImportRefusedError(f"{where}: the {what} weight {name!r} has no place in the model described by "
                                     f"its config.json")
        target = expected[name].shape
        if tensor.shape != target and tensor.dim() == 4 and tensor.shape[2:] == (1, 1) and len(target) == 2:
            tensor = tensor[:, :, 0, 0]
        if tensor.shape != target:
            raise ImportRefusedError(f"{where}: the {what} weight {name!r} has shape {tuple(tensor.shape)} but the "
                                     f"model described by its config.json needs {tuple(target)}")
        fitted[name] = tensor.contiguous()
    missing = sorted(set(expected) - set(fitted))
    if missing:
        raise ImportRefusedError(f"{where}: the {what} weights lack {missing[0]!r} ({len(missing)} missing in all)")
    return fitted


def canonical_clip(tensors: dict[str, Any]) -> dict[str, Any]:
    """CLIPTextModel weights under the names transformers 5 gives them (no ``text_model.`` prefix, which
    earlier versions wrote and SD 1.x files keep)."""
    return {name.removeprefix("text_model."): tensor for name, tensor in tensors.items()}


def clip_state_dict(tensors: dict[str, Any], module) -> dict[str, Any]:
    """CLIPTextModel weights saved by any transformers version -> the keys of ``module`` (a ``clip_shapes``):
    ``model.`` + the names this transformers gives them (transformers 5 dropped the ``text_model.`` level)."""
    nested = any(name.startswith("model.text_model.") for name in module.state_dict())
    prefix = "model.text_model." if nested else "model."
    return {prefix + name: tensor for name, tensor in canonical_clip(tensors).items()}


def clip_shapes(text_cfg: TextEncoderConfig):
    """An empty CLIPTextModel of ``text_cfg``'s sizes, under the key prefix our TextEncoder gives it."""
    import torch
    from transformers import CLIPTextModel

    from ldm_runtime.models.text_encoder import clip_text_config

    with torch.device("meta"):
        holder = torch.nn.Module()
        holder.model = CLIPTextModel(clip_text_config(text_cfg))
    return holder


def write_checkpoint(out: Path, config: ModelConfig, weights: dict[str, dict[str, Any]], tokenizer_source: Path,
                     log: Callable[[str], None], settings: dict[str, Any]) -> Path:
    """model.json, ``<stem>.safetensors`` for each of ``weights``, tokenizer/ (in the fast tokenizer's
    tokenizer.json form that the engines read) and, last, train_state.json with the sha256 of every one of them
    (stage "import", ``settings``: how the import ran), as ldm-train writes it: every loader checks each file
    against it. Staged beside ``out`` and renamed into place, so ``out`` appears complete or not at all."""
    if out.exists():
        raise ImportRefusedError(f"--out {out} already exists; expected a new folder")
    if not tokenizer_source.is_dir():
        raise ImportRefusedError(f"{tokenizer_source} does not exist; expected the model's CLIP tokenizer folder")
    with temporary_folder(out) as staging:
        from safetensors.torch import save_file
        from transformers import AutoTokenizer

        (staging / MODEL_JSON).write_text(config.to_json())
        for stem, state in weights.items():
            save_file(state, str(staging / f"{stem}.safetensors"))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source), local_files_only=True, use_fast=True)
        except (OSError, ValueError) as error:
            raise ImportRefusedError(f"cannot read the tokenizer in {tokenizer_source} ({error})") from None
        if not type(tokenizer).__name__.startswith("CLIPTokenizer") or not tokenizer.is_fast:
            raise ImportRefusedError(f"{tokenizer_source} holds a {type(tokenizer).__name__}; expected a CLIP "
                                     f"tokenizer")
        tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        names = [MODEL_JSON, *(f"{stem}.safetensors" for stem in weights), *folder_files(staging, TOKENIZER_DIR)]
        write_train_state(staging, names, stage="import", step=0, settings=settings)
        load_model_config(staging)  # what every command reads back first
        os.replace(staging, out)
    log(f"wrote {out}")
    return out
