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
read. Nothing is unpickled.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from ldm_export.errors import ImportRefusedError
from ldm_export.untrusted_files import (PICKLE_SUFFIXES, describe, load_tensors, parse_json_text,
                                        read_safetensors_header, read_safetensors_header_and_metadata,
                                        regular_file_size)
from ldm_runtime.checkpoint import (MODEL_JSON, TEXT_ENCODER_DIR, TEXT_ENCODER_WEIGHTS, TOKENIZER_DIR, UNET_WEIGHTS,
                                    folder_files, load_model_config, verify_recorded_digests, weight_files,
                                    write_train_state)
from ldm_runtime.config import ADAPTER_SCALES, MAX_ADAPTERS, ConfigError, ModelConfig
from ldm_runtime.errors import CheckpointError
from ldm_runtime.files import sha256_file
from ldm_runtime.staging import temporary_folder

UNET, TEXT_ENCODER = "unet", "text_encoder"
NETWORK_NAMES = {UNET: "UNet", TEXT_ENCODER: "text encoder"}
KOHYA_PREFIXES = {"lora_unet_": UNET, "lora_te_": TEXT_ENCODER}
KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
DIFFUSERS_PREFIXES = {"unet.": UNET, "text_encoder.": TEXT_ENCODER}
DIFFUSERS_KEY = re.compile(r"(?P<module>.+?)(?:\.lora_(?P<peft>[AB])\.weight|\.lora(?:_linear_layer)?\.(?P<old>down|up)"
                           r"\.weight|\.processor\.(?P<projection>to_[qkv]|to_out)_lora\.(?P<processor>down|up)\.weight"
                           r"|\.(?P<alpha>alpha))")
# The text encoder's module names with the level that transformers before 5 put above them (CLIP's "text_model.")
TEXT_MODEL_LEVEL = "text_model."
# Other kinds of adapter, by a part of their keys
OTHER_KINDS = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LoHa", "lokr_": "LoKr",
               "lora_mid": "LoCon with a Tucker core (lora_mid)", "lora_embedding_": "an embedding LoRA",
               "oft_": "OFT", ".diff": "a full weight difference", "lora_B.bias": "a LoRA bias (PEFT's lora_bias)",
               "lora_up.bias": "a LoRA bias"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights: PEFT's LoraConfig of each network
PATTERN = re.compile(r"\^?[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")  # a module name (PEFT takes regexes: refused)
MAX_ALPHA = 65536.0  # kohya and PEFT: alpha about the rank (at most a few hundred), often 1
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class AdapterFile:
    """One ``--lora FILE[:SCALE]``."""

    path: Path
    scale: float = 1.0


def adapter_argument(text: str) -> AdapterFile:
    """argparse type of ``--lora FILE[:SCALE]``: a path, then optionally a colon and a finite scale within
    ``ADAPTER_SCALES`` (a path that exists as written keeps its colons)."""
    path, colon, tail = text.rpartition(":")
    if not colon or os.path.exists(text):
        return AdapterFile(Path(text))
    try:
        scale = float(tail)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not FILE[:SCALE] (e.g. style.safetensors:0.8)") from None
    low, high = ADAPTER_SCALES
    if not (math.isfinite(scale) and low <= scale <= high):
        raise argparse.ArgumentTypeError(f"the scale of {text!r} is {tail}; expected a number from {low:g} to {high:g}")
    return AdapterFile(Path(path), scale)


# --- the modules an adapter may change ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Targets:
    """The weights of one network an adapter may change: {module name as diffusers and PEFT write it: (state-dict
    key, shape)} for every linear or convolution weight, and the same names with dots as underscores (kohya's),
    mapped to None where two modules share one."""

    weights: dict[str, tuple[str, tuple[int, ...]]]
    underscored: dict[str, str | None]


def targets_from_shapes(shapes: dict[str, tuple[int, ...]], prefix: str = "") -> Targets:
    """``Targets`` of a state dict's ``shapes`` {key: shape}; ``prefix``: what its keys have before the module names
    (our text encoder's "model."); CLIP's "text_model." level is dropped as well."""
    weights = {}
    for key, shape in shapes.items():
        if key.endswith(".weight") and key.startswith(prefix) and len(shape) in (2, 4):
            weights[key[len(prefix):-len(".weight")].removeprefix(TEXT_MODEL_LEVEL)] = (key, tuple(shape))
    underscored: dict[str, str | None] = {}
    for module in weights:
        name = module.replace(".", "_")
        underscored[name] = None if name in underscored else module
    return Targets(weights, underscored)


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
class ModuleUpdate:
    """One module's change: ``target`` (a key of the network's state dict) += ``factor`` * up @ down, with the
    tensors ``down`` and ``up`` of the adapter file and their shapes."""

    network: str
    target: str
    down: str
    up: str
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]
    factor: float


@dataclass(frozen=True)
class Adapter:
    """A LoRA file read and placed in a model: its updates, and what model.json records of it."""

    path: Path
    scale: float
    sha256: str
    updates: tuple[ModuleUpdate, ...]

    def record(self) -> dict[str, Any]:
        return {"file": self.path.name, "sha256": self.sha256, "scale": self.scale}


@dataclass
class _Module:
    """The keys of one adapted module: its network, its name as the file gives it, and down/up/alpha tensors."""

    network: str
    name: str
    keys: dict[str, str] = dataclasses.field(default_factory=dict)


def _refuse_key(path: Path, key: str) -> NoReturn:
    for marker, kind in OTHER_KINDS.items():
        if marker in key:
            raise ImportRefusedError(f"{path}: {key!r} belongs to {kind}, which ldm-import does not fuse; expected "
                                     f"a LoRA (down and up weights, alpha)")
    raise ImportRefusedError(f"{path}: cannot place {key!r}; expected LoRA keys unet.<module>.lora_A.weight / "
                             f".lora_B.weight (diffusers, PEFT; text_encoder.* for the text encoder) or "
                             f"lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha (kohya; lora_te_*)")


def _kohya_key(path: Path, key: str, targets: dict[str, Targets]) -> tuple[str, str, str] | None:
    """(network, module name, role) of kohya key ``key``, or None when it is not one."""
    prefix = next((prefix for prefix in KOHYA_PREFIXES if key.startswith(prefix)), None)
    if prefix is None:
        return None
    name, _, tail = key[len(prefix):].partition(".")
    if tail not in KOHYA_ROLES:
        _refuse_key(path, key)
    network = KOHYA_PREFIXES[prefix]
    name = name.removeprefix(TEXT_MODEL_LEVEL.replace(".", "_")) if network == TEXT_ENCODER else name
    module = targets[network].underscored.get(name) if network in targets else name
    if network in targets and module is None:
        why = "two modules" if name in targets[network].underscored else "no module"
        raise ImportRefusedError(f"{path}: {key!r} names {why} of this model's {NETWORK_NAMES[network]} (kohya "
                                 f"{name!r}); expected an adapter for this model")
    return network, module, KOHYA_ROLES[tail]


def _diffusers_key(path: Path, key: str) -> tuple[str, str, str] | None:
    """(network, module name as the file gives it, role) of diffusers or PEFT key ``key``, or None."""
    prefix = next((prefix for prefix in DIFFUSERS_PREFIXES if key.startswith(prefix)), None)
    if prefix is None:
        return None
    match = DIFFUSERS_KEY.fullmatch(key[len(prefix):])
    if match is None:
        _refuse_key(path, key)
    network, module = DIFFUSERS_PREFIXES[prefix], match["module"]
    if match["alpha"]:
        return network, module, "alpha"
    if match["projection"]:  # attention processors' LoRA of to_q, to_k, to_v, to_out.0 (UNet only)
        if network != UNET:
            _refuse_key(path, key)
        projection = "to_out.0" if match["projection"] == "to_out" else match["projection"]
        return network, f"{module}.{projection}", match["processor"]
    role = match["old"] or ("down" if match["peft"] == "A" else "up")
    return network, module, role


def _metadata(path: Path, metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """{network: its PEFT LoraConfig} from the ``lora_adapter_metadata`` diffusers writes (keys "unet.r", ...),
    each value checked: ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``; DoRA and
    transposed weights are refused."""
    if METADATA_KEY not in metadata:
        return {}
    where = f"the {METADATA_KEY} of {path}"
    packed = parse_json_text(metadata[METADATA_KEY], where)
    if not isinstance(packed, dict):
        raise ImportRefusedError(f"{where} is {describe(packed)}; expected an object")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in packed.items():
        network, _, name = key.partition(".")
        if network in NETWORK_NAMES:
            configs.setdefault(network, {})[name] = value
    for network, config in configs.items():
        wrong = _wrong_metadata(config)
        if wrong:
            name, expected = wrong
            raise ImportRefusedError(f"{where}: {network}.{name} is {describe(config.get(name))}; expected {expected}")
    return configs


def _wrong_metadata(config: dict[str, Any]) -> tuple[str, str] | None:
    """(the first key of a network's PEFT LoraConfig that ldm-import does not take, what it expects), or None;
    the optional keys get their defaults."""
    if not _is_rank(config.get("r")):
        return "r", "the rank, a whole number from 1"
    if not _is_alpha(config.get("lora_alpha")):
        return "lora_alpha", f"a number above 0 and at most {MAX_ALPHA:g}"
    for name, check, expected in (("rank_pattern", _is_rank, "ranks"), ("alpha_pattern", _is_alpha, "alphas")):
        patterns = config.setdefault(name, {})
        if not isinstance(patterns, dict) or not all(isinstance(key, str) and PATTERN.fullmatch(key) and check(value)
                                                     for key, value in patterns.items()):
            return name, f"an object of module names (^ to anchor one at the start; no other regex) to {expected}"
    for name in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.setdefault(name, False) not in (True, False):
            return name, "true or false"
    for name in ("use_dora", "fan_in_fan_out"):
        if config[name]:
            return name, "false (ldm-import fuses plain LoRA)"
    return None


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_alpha(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0 < value <= MAX_ALPHA)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module value: that of the first pattern naming ``module`` (the whole name, or its last dotted
    parts; "^name": the whole name only), else ``default``."""
    for pattern, value in patterns.items():
        name = pattern.removeprefix("^")
        if module == name or (not pattern.startswith("^") and module.endswith("." + name)):
            return value
    return default


def _fits(down: tuple[int, ...], up: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    """Whether down (rank, in[, kh, kw]) and up (out, rank[, 1, 1]) make a change of ``weight``'s shape."""
    if len(down) not in (2, 4) or len(up) not in (2, 4) or up[2:] not in ((), (1, 1)) or down[0] != up[1]:
        return False
    kernel = down[2:] if len(down) == 4 else (1, 1)
    weight_kernel = weight[2:] if len(weight) == 4 else (1, 1)
    return down[0] >= 1 and up[0] == weight[0] and down[1] == weight[1] and kernel == weight_kernel


def read_adapter(adapter: AdapterFile, targets: dict[str, Targets], absent: dict[str, str] | None = None) -> Adapter:
    """``adapter``'s file read as if hostile and placed in the networks of ``targets``; ``absent``: {network: why
    the model has no weights of it to change} for the message. Every refusal comes from the header, before a tensor
    is read; then only the alpha tensors are."""
    path = adapter.path
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ImportRefusedError(f"{path} is a pickled file ({path.suffix}); ldm-import never unpickles (loading a "
                                 f"pickle can run any code): expected the .safetensors release of the LoRA")
    regular_file_size(path, "a LoRA .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise ImportRefusedError(f"{path} is not a .safetensors file; expected a LoRA .safetensors file")
    header, metadata = read_safetensors_header_and_metadata(path)
    configs = _metadata(path, metadata)
    modules: dict[tuple[str, str], _Module] = {}
    for key in header:
        placed = _kohya_key(path, key, targets) or _diffusers_key(path, key)
        if placed is None:
            _refuse_key(path, key)
        network, name, role = placed
        if network not in targets:
            why = (absent or {}).get(network, "it holds none")
            raise ImportRefusedError(f"{path}: {key!r} adapts the {NETWORK_NAMES[network]}, whose weights this "
                                     f"checkpoint does not hold ({why}); expected an adapter of the UNet only")
        module = modules.setdefault((network, name), _Module(network, name))
        if role in module.keys:
            raise ImportRefusedError(f"{path}: {key!r} and {module.keys[role]!r} are both the {role} of "
                                     f"{NETWORK_NAMES[network]} module {name!r}; expected one")
        module.keys[role] = key
    if not any("down" in module.keys for module in modules.values()):
        raise ImportRefusedError(f"{path} holds no LoRA weights; expected down and up weights of UNet or text encoder "
                                 f"modules")
    pending = []
    for module in modules.values():
        pending.append(_placed(path, module, header, targets[module.network], configs.get(module.network)))
    alpha_keys = [alpha for *_, alpha in pending if isinstance(alpha, str)]
    alphas = {key: tensor.reshape(-1)[0].item() for key, tensor in load_tensors(path, alpha_keys).items()}
    updates = []
    for update, rank, rslora, alpha in pending:
        alpha = alphas.get(alpha, alpha)
        if not _is_alpha(alpha):
            raise ImportRefusedError(f"{path}: the alpha of {update.target!r} is {alpha!r}; expected a number above 0 "
                                     f"and at most {MAX_ALPHA:g}")
        factor = adapter.scale * alpha / (math.sqrt(rank) if rslora else rank)
        updates.append(dataclasses.replace(update, factor=factor))
    return Adapter(path, adapter.scale, sha256_file(path), tuple(updates))


def _placed(path: Path, module: _Module, header: dict[str, tuple[str, tuple[int, ...]]], targets: Targets,
            config: dict[str, Any] | None) -> tuple[ModuleUpdate, int, bool, float | str]:
    """(the update of ``module``, factor 0 until alpha is known; its rank; whether alpha is over sqrt(rank); alpha,
    or the key of its alpha tensor), every key checked against the header."""
    network_name = NETWORK_NAMES[module.network]
    for role, other in (("down", "up"), ("up", "down"), ("alpha", "down")):
        if role in module.keys and other not in module.keys:
            raise ImportRefusedError(f"{path}: {module.keys[role]!r} has no {other} weight beside it; expected the "
                                     f"down and up weights of each module")
    down_key, up_key = module.keys["down"], module.keys["up"]
    canonical = module.name.removeprefix(TEXT_MODEL_LEVEL) if module.network == TEXT_ENCODER else module.name
    if canonical not in targets.weights:
        raise ImportRefusedError(f"{path}: {down_key!r} adapts {network_name} module {module.name!r}, which this "
                                 f"model does not have; expected an adapter for this model")
    target, weight_shape = targets.weights[canonical]
    (down_dtype, down_shape), (up_dtype, up_shape) = header[down_key], header[up_key]
    for key, dtype in ((down_key, down_dtype), (up_key, up_dtype)):
        if dtype not in FLOAT_DTYPES:
            raise ImportRefusedError(f"{path}: {key!r} is {dtype}; expected floating point ({', '.join(FLOAT_DTYPES)})")
    if not _fits(down_shape, up_shape, weight_shape):
        raise ImportRefusedError(f"{path}: {down_key!r} {list(down_shape)} and {up_key!r} {list(up_shape)} do not fit "
                                 f"{network_name} module {module.name!r} of shape {list(weight_shape)}; expected down "
                                 f"(rank, in[, kh, kw]) and up (out, rank[, 1, 1]) of its sizes")
    rank = down_shape[0]
    update = ModuleUpdate(module.network, target, down_key, up_key, down_shape, up_shape, 0.0)
    if "alpha" in module.keys:
        alpha_key = module.keys["alpha"]
        dtype, shape = header[alpha_key]
        if dtype not in FLOAT_DTYPES or shape not in ((), (1,)):
            raise ImportRefusedError(f"{path}: {alpha_key!r} is {dtype} of shape {list(shape)}; expected one floating "
                                     f"point number")
        return update, rank, False, alpha_key
    if config is None:
        return update, rank, False, float(rank)  # no alpha: a scale of 1, as diffusers and kohya read it
    configured_rank = _pattern_value(config["rank_pattern"], module.name, config["r"])
    if configured_rank != rank:
        raise ImportRefusedError(f"{path}: {down_key!r} has rank {rank} but the {METADATA_KEY} gives "
                                 f"{network_name} module {module.name!r} rank {configured_rank}; expected them equal")
    return update, rank, config["use_rslora"], _pattern_value(config["alpha_pattern"], module.name,
                                                             config["lora_alpha"])


def read_adapters(adapters: Sequence[AdapterFile], targets: dict[str, Targets],
                  absent: dict[str, str] | None = None) -> list[Adapter]:
    """Every one of ``adapters`` read and placed (``read_adapter``), at most ``MAX_ADAPTERS``."""
    if len(adapters) > MAX_ADAPTERS:
        raise ImportRefusedError(f"{len(adapters)} --lora adapters given; expected at most {MAX_ADAPTERS}")
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
            state[update.target] = (weight.to(torch.float32) + update.factor * change).to(weight.dtype).contiguous()
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
    from safetensors.torch import save_file

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
                save_file(fuse(load_checkpoint_tensors(source / name), network, read), str(staging / name))
        write_train_state(staging, [MODEL_JSON, *names], stage="import", step=0, settings={"source": source.name})
        load_model_config(staging)
        os.replace(staging, out)
    log(f"wrote {out}: {source} with {len(read)} adapter{'s' if len(read) > 1 else ''} fused")
    return out
