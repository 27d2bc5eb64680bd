"""LoRA adapters fused into a model's weights: ``W += scale * alpha / rank * up @ down`` for every module they adapt.

An adapter is one .safetensors file in either layout people download:

- diffusers / PEFT: ``unet.<module>.lora_A.weight`` (down) and ``.lora_B.weight`` (up), ``text_encoder.<module>...``
  for the CLIP text encoder; older diffusers names (``.lora.down``/``.lora.up``, ``.lora_linear_layer.down``/``.up``,
  attention processors' ``.processor.to_q_lora.down``) too. alpha: a ``<module>.alpha`` tensor, else the
  ``lora_adapter_metadata`` that diffusers' ``save_lora_weights`` writes (PEFT's LoraConfig: ``lora_alpha``,
  ``alpha_pattern``, ``rank_pattern``, ``use_rslora``), else the rank (a scale of 1), as diffusers reads it.
- kohya (and LyCORIS LoCon): ``lora_unet_<module path, dots as underscores>.lora_down.weight``, ``.lora_up.weight``
  and ``.alpha`` (absent: the rank); ``lora_te_...`` for the text encoder. The module is found by matching the name
  against the network's own module names, never by rewriting it.

Linear layers and convolutions are fused: down (rank, in) or (rank, in, kh, kw), up (out, rank) or (out, rank, 1, 1);
a kh x kw down (LoCon) goes into a convolution of that kernel, a 1x1 one into a linear or 1x1 layer. Every key must be
placed: another kind of adapter (DoRA, LoHa, LoKr, ...), a module the model lacks or a shape that does not fit it is
an ``ImportRefusedError`` naming the key, found from the file's header (``untrusted_files``) before any tensor is
read. Nothing is unpickled. The placement is the runtime's (``ldm_runtime.adapters``), which serves the same files
per request without fusing them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ldm_export.errors import ImportRefusedError
from ldm_export.untrusted_files import (load_tensors, read_safetensors_header, read_safetensors_header_and_metadata,
                                        regular_file_size)
from ldm_runtime.adapters import (TEXT_ENCODER, UNET, AdapterError, ModuleUpdate, NETWORK_NAMES, Targets,
                                  adapter_file_argument, place_adapter, targets_from_shapes, with_factors)
from ldm_runtime.checkpoint import (MODEL_JSON, TEXT_ENCODER_DIR, TEXT_ENCODER_WEIGHTS, TOKENIZER_DIR, UNET_WEIGHTS,
                                    folder_files, load_model_config, verify_recorded_digests, weight_files,
                                    write_train_state)
from ldm_runtime.config import MAX_ADAPTERS, ConfigError, ModelConfig
from ldm_runtime.errors import CheckpointError
from ldm_runtime.files import sha256_file
from ldm_runtime.safetensors_header import PICKLE_SUFFIXES
from ldm_runtime.staging import temporary_folder

@dataclass(frozen=True)
class AdapterFile:
    """One ``--lora FILE[:SCALE]``."""

    path: Path
    scale: float = 1.0


def adapter_argument(text: str) -> AdapterFile:
    """argparse type of ``--lora FILE[:SCALE]`` (``ldm_runtime.adapters.adapter_file_argument``)."""
    return AdapterFile(*adapter_file_argument(text))


# --- the modules an adapter may change ---------------------------------------------------------------------------

def import_targets(config: ModelConfig) -> dict[str, Targets]:
    """The UNet's and the CLIP text encoder's ``Targets`` of a model ldm-import writes, from ``config`` alone."""
    import torch

    from ldm_export.imported_checkpoint import clip_shapes
    from ldm_runtime.models import UNet

    with torch.device("meta"):
        unet = UNet(config.unet)
    text = clip_shapes(config.text_encoder)
    return {UNET: targets_from_shapes({key: tuple(value.shape) for key, value in unet.state_dict().items()}),
            TEXT_ENCODER: targets_from_shapes({key: tuple(value.shape) for key, value in text.state_dict().items()},
                                              prefix="model.")}


# --- reading an adapter ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Adapter:
    """A LoRA file read and placed in a model: its updates, and what model.json records of it."""

    path: Path
    scale: float
    sha256: str
    updates: tuple[ModuleUpdate, ...]

    def record(self) -> dict[str, Any]:
        return {"file": self.path.name, "sha256": self.sha256, "scale": self.scale}


def read_adapter(adapter: AdapterFile, targets: dict[str, Targets], absent: dict[str, str] | None = None) -> Adapter:
    """``adapter``'s file read as if hostile and placed in the networks of ``targets``
    (``ldm_runtime.adapters.place_adapter``); ``absent``: {network: why the model has no weights of it to change} for
    the message. Every refusal but non-finite values comes from the header, before a tensor is read."""
    path = adapter.path
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ImportRefusedError(f"{path} is a pickled file ({path.suffix}); ldm-import never unpickles (loading a "
                                 f"pickle can run any code): expected the .safetensors release of the LoRA")
    regular_file_size(path, "a LoRA .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise ImportRefusedError(f"{path} is not a .safetensors file; expected a LoRA .safetensors file")
    header, metadata = read_safetensors_header_and_metadata(path)
    try:
        pending = place_adapter(path, header, metadata, targets, absent)
        alpha_keys = [placed.alpha for placed in pending if isinstance(placed.alpha, str)]
        alphas = {key: tensor.reshape(-1)[0].item() for key, tensor in load_tensors(path, alpha_keys).items()}
        updates = with_factors(path, pending, alphas, adapter.scale)
    except AdapterError as error:
        raise ImportRefusedError(str(error)) from None
    for key, tensor in load_tensors(path, [name for update in updates for name in (update.down, update.up)]).items():
        if not tensor.isfinite().all():  # fused, it would leave weights that are not finite
            raise ImportRefusedError(f"{path}: {key!r} holds values that are not finite; expected finite weights")
    return Adapter(path, adapter.scale, sha256_file(path), updates)


def read_adapters(adapters: Sequence[AdapterFile], targets: dict[str, Targets],
                  absent: dict[str, str] | None = None) -> list[Adapter]:
    """Every one of ``adapters`` read and placed (``read_adapter``), at most ``MAX_ADAPTERS``."""
    if len(adapters) > MAX_ADAPTERS:
        raise ImportRefusedError(f"{len(adapters)} --lora adapters given; expected at most {MAX_ADAPTERS}")
    seen: dict[Path, Path] = {}
    for adapter in adapters:
        resolved = adapter.path.resolve()
        if resolved in seen:
            raise ImportRefusedError(f"--lora {adapter.path} is given twice (as {seen[resolved]} too); expected each "
                                     f"adapter once, with the scale meant (PATH:SCALE)")
        seen[resolved] = adapter.path
    return [read_adapter(adapter, targets, absent) for adapter in adapters]


# --- fusing --------------------------------------------------------------------------------------------------------

def lora_change(down, up, shape: tuple[int, ...]):
    """up @ down as a change of a weight of ``shape`` ((out, in) or (out, in, kh, kw)): down (rank, in[, kh, kw]) and
    up (out, rank[, 1, 1]); a kh x kw down followed by a 1x1 up is one kh x kw convolution."""
    import torch

    if down.dim() == 4 and down.shape[2:] != (1, 1):
        return torch.einsum("or,rihw->oihw", up.flatten(1), down)
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


def fuse(state: dict[str, Any], network: str, adapters: Sequence[Adapter]) -> dict[str, Any]:
    """``state`` (a state dict of ``network``) with the updates of ``adapters`` added in order, in float32 and
    stored back in each weight's dtype; the adapters' tensors are read here, one file at a time."""
    import torch

    for adapter in adapters:
        updates = [update for update in adapter.updates if update.network == network]
        tensors = load_tensors(adapter.path, [name for update in updates for name in (update.down, update.up)])
        for update in updates:
            down, up = tensors[update.down], tensors[update.up]
            if tuple(down.shape) != update.down_shape or tuple(up.shape) != update.up_shape:
                raise ImportRefusedError(f"{adapter.path} changed while it was read; expected it to stay as it was")
            weight = state[update.target]
            change = lora_change(down, up, tuple(weight.shape))
            fused = (weight.to(torch.float32) + update.factor * change).to(weight.dtype).contiguous()
            if not torch.isfinite(fused).all():
                raise ImportRefusedError(f"{adapter.path}: {update.down!r} and {update.up!r} at scale "
                                         f"{adapter.scale:g} change {update.target!r} past what its dtype holds "
                                         f"(values that are not finite); expected an adapter whose change fits")
            state[update.target] = fused
    return state


def with_adapters(config: ModelConfig, adapters: Sequence[Adapter]) -> ModelConfig:
    """``config`` recording ``adapters`` after those it already records."""
    updated = dataclasses.replace(config, adapters=config.adapters + tuple(adapter.record() for adapter in adapters))
    try:
        updated.validate()
    except ConfigError as error:
        raise ImportRefusedError(f"the adapters cannot be recorded in model.json: {error}") from None
    return updated


def fuse_into_import(config: ModelConfig, weights: dict[str, Callable[[], dict[str, Any]]],
                     adapters: Sequence[AdapterFile],
                     log: Callable[[str], None] = lambda line: None) -> tuple[ModelConfig, dict[str, Callable]]:
    """(``config`` recording ``adapters``, ``weights`` with them fused) for ldm-import's ``write_checkpoint``:
    ``weights`` maps a network to the call that reads its state dict. Every adapter is read and placed now."""
    if not adapters:
        return config, weights
    read = read_adapters(adapters, import_targets(config))
    _log_adapters(read, log)
    fused = dict(weights)
    for network in (UNET, TEXT_ENCODER):
        fused[network] = lambda load=weights[network], network=network: fuse(load(), network, read)
    return with_adapters(config, read), fused


def _log_adapters(adapters: Sequence[Adapter], log: Callable[[str], None]) -> None:
    for adapter in adapters:
        counts = {name: sum(update.network == network for update in adapter.updates)
                  for network, name in NETWORK_NAMES.items()}
        log(f"fusing {adapter.path.name} at scale {adapter.scale:g}: "
            f"{', '.join(f'{count} {name} modules' for name, count in counts.items() if count)}")


# --- a checkpoint dir with adapters fused -------------------------------------------------------------------------

def fuse_checkpoint(source: Path, out: Path, adapters: Sequence[AdapterFile],
                    log: Callable[[str], None] = lambda line: None) -> Path:
    """Checkpoint dir ``out``: checkpoint dir ``source`` (ldm-train's or ldm-import's) with ``adapters`` fused into
    its UNet and, where the checkpoint holds them, its text encoder's weights, and recorded in model.json. The
    tokenizer, a copied text encoder folder and the other weights are copied as they are, each checked against the
    sha256 ``source`` records; ldm-train's resume state is not (it would resume the weights without the adapters).
    ``out`` appears complete or not at all."""
    from ldm_export.imported_checkpoint import open_to_umask, save_weights
    from ldm_runtime.checkpoint import load_tensors as load_checkpoint_tensors

    if out.exists():
        raise ImportRefusedError(f"--out {out} already exists; expected a new folder")
    config = load_model_config(source)
    names = [*weight_files(config), *folder_files(source, TOKENIZER_DIR), *folder_files(source, TEXT_ENCODER_DIR)]
    for name in names:
        if not (source / name).is_file():
            raise CheckpointError(f"checkpoint dir {source} has no {name}; expected a complete checkpoint")
    files = {UNET: UNET_WEIGHTS}
    absent = {TEXT_ENCODER: f"its text encoder is the pretrained {config.text_encoder.path}"}
    if TEXT_ENCODER_WEIGHTS in names:
        files[TEXT_ENCODER], absent = TEXT_ENCODER_WEIGHTS, {}
    targets = {network: targets_from_shapes({key: shape for key, (_, shape) in
                                             read_safetensors_header(source / name).items()},
                                            prefix="model." if network == TEXT_ENCODER else "")
               for network, name in files.items()}
    read = read_adapters(adapters, targets, absent)
    fused_config = with_adapters(config, read)
    verify_recorded_digests(source, names)
    _log_adapters(read, log)
    with temporary_folder(out) as staging:
        (staging / MODEL_JSON).write_text(fused_config.to_json())
        for name in names:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            network = next((network for network, file in files.items() if file == name), None)
            if network is None:
                shutil.copyfile(source / name, staging / name)
            else:
                save_weights(staging / name, fuse(load_checkpoint_tensors(source / name), network, read))
        write_train_state(staging, [MODEL_JSON, *names], stage="import", step=0, settings={"source": source.name})
        load_model_config(staging)
        open_to_umask(staging)
        os.replace(staging, out)
    log(f"wrote {out}: {source} with {len(read)} adapter{'s' if len(read) > 1 else ''} fused")
    return out
