"""The checkpoint dir ``ldm-import`` writes, whatever the source's layout, and the weights that go into it: read
from safetensors as float32, CLIP's keyed as our text encoder's, each checked against our network's state dict
from the file's header before a tensor is read, then read and written one network at a time.

torch, safetensors and transformers are imported when weights are read or written: ``ldm-import --help`` needs none.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ldm_export.errors import ImportRefusedError
from ldm_export.untrusted_files import load_tensors, regular_file_size, shape_only
from ldm_runtime.checkpoint import MODEL_JSON, TOKENIZER_DIR, folder_files, load_model_config, write_train_state
from ldm_runtime.config import ModelConfig, TextEncoderConfig
from ldm_runtime.errors import one_line
from ldm_runtime.files import safetensors_os_error
from ldm_runtime.staging import current_umask, temporary_folder

MAX_TOKENIZER_FILES = 32  # a CLIP tokenizer folder holds 4 or 5
MAX_TOKENIZER_BYTES = 64 << 20  # vocab.json, merges.txt and tokenizer.json: about 4 MB
TOKENIZER_EXPECTED = "the model's CLIP tokenizer folder (vocab.json and merges.txt, or tokenizer.json)"


def checked_weights(path: Path, header: dict[str, tuple[str, tuple[int, ...]]],
                    convert: Callable[[dict[str, Any]], dict[str, Any]], names=None) -> Callable[[], dict[str, Any]]:
    """Run ``convert`` (source tensors -> a network's state dict, ``ImportRefusedError`` for a misfit) now on the
    shapes that ``path``'s ``header`` gives ``names`` (default: every tensor), so that a misfit is refused before
    any tensor data is read; returns the call that runs it on the tensors themselves, read one at a time."""
    names = list(header) if names is None else [name for name in names if name in header]
    convert(shape_only(header, names))
    return lambda: convert(load_tensors(path, names))


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
        if expected[name].is_floating_point() and not tensor.is_floating_point():
            raise ImportRefusedError(f"{where}: the {what} weight {name!r} is {tensor.dtype}; expected floating point")
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


def check_tokenizer_folder(folder: Path) -> None:
    """``ImportRefusedError`` unless ``folder`` is a folder (not a link to one) of at most ``MAX_TOKENIZER_FILES``
    regular files and ``MAX_TOKENIZER_BYTES`` in all: a tokenizer, not a system folder."""
    expected = TOKENIZER_EXPECTED
    if folder.is_symlink():
        raise ImportRefusedError(f"{folder} is a symbolic link; expected {expected} itself")
    if not folder.is_dir():
        regular_file_size(folder, expected)  # names what it is instead: missing, a pipe, a device
        raise ImportRefusedError(f"{folder} is a file; expected {expected}")
    with os.scandir(folder) as entries:
        names = [entry.name for _, entry in zip(range(MAX_TOKENIZER_FILES + 1), entries)]
    if len(names) > MAX_TOKENIZER_FILES:
        raise ImportRefusedError(f"{folder} holds more than {MAX_TOKENIZER_FILES} entries; expected {expected}")
    total = sum(regular_file_size(folder / name, f"a file of {expected}") for name in names)
    if total > MAX_TOKENIZER_BYTES:
        raise ImportRefusedError(f"{folder} holds {total} bytes; expected {expected} of at most "
                                 f"{MAX_TOKENIZER_BYTES} bytes")
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= set(names):
        raise ImportRefusedError(f"{folder} holds no tokenizer.json and not both vocab.json and merges.txt; "
                                 f"expected {expected}")


def open_to_umask(folder: Path) -> None:
    """Give ``folder`` (a staging folder from mkdtemp, private) and everything in it the permissions that the umask
    gives a new folder and a new file, as ldm-export and ldm-train do: safetensors writes its files private too."""
    umask = current_umask()
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def save_weights(path: Path, tensors: dict[str, Any]) -> None:
    """``safetensors.torch.save_file``; a write that fails in the operating system (a full disk) raises that
    ``OSError``, not safetensors' own error, so that the command reports it as any other write."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path))
    except SafetensorError as error:
        failed = safetensors_os_error(error, path)
        if failed is None:
            raise
        raise failed from error


def write_checkpoint(out: Path, config: ModelConfig, weights: dict[str, Callable[[], dict[str, Any]]],
                     tokenizer_source: Path, settings: dict[str, Any]) -> Path:
    """tokenizer/ (in the fast tokenizer's tokenizer.json form that the engines read), model.json,
    ``<stem>.safetensors`` for each of ``weights`` (each called for its state dict in turn, so one network is in
    memory at a time) and, last, train_state.json with the sha256 of every one of them (stage "import",
    ``settings``: how the import ran), as ldm-train writes it: every loader checks each file against it. Staged
    beside ``out`` and renamed into place, so ``out`` appears complete or not at all."""
    if out.exists():
        raise ImportRefusedError(f"--out {out} already exists; expected a new folder")
    check_tokenizer_folder(tokenizer_source)
    with temporary_folder(out) as staging:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source), local_files_only=True, use_fast=True)
        except (OSError, ValueError) as error:
            raise ImportRefusedError(f"cannot read the tokenizer in {tokenizer_source} ({one_line(error)}); "
                                     f"expected {TOKENIZER_EXPECTED}") from None
        if not type(tokenizer).__name__.startswith("CLIPTokenizer") or not tokenizer.is_fast:
            raise ImportRefusedError(f"{tokenizer_source} holds a {type(tokenizer).__name__}; expected a CLIP "
                                     f"tokenizer")
        tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        (staging / MODEL_JSON).write_text(config.to_json())
        for stem, state in weights.items():
            save_weights(staging / f"{stem}.safetensors", state())
        names = [MODEL_JSON, *(f"{stem}.safetensors" for stem in weights), *folder_files(staging, TOKENIZER_DIR)]
        write_train_state(staging, names, stage="import", step=0, settings=settings)
        load_model_config(staging)  # what every command reads back first
        open_to_umask(staging)
        os.replace(staging, out)
    return out
