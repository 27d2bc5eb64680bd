"""LoRA adapters chosen per request: read once, checked against the model, applied row by row in a shared batch.

How an adapter reaches a request's rows. Three designs are in use elsewhere:

- OpenVINO GenAI keeps the adapters as state of the compiled model (``AdapterConfig``: the LoRA tensors are state
  variables set between generate calls), and TensorRT refits the engine's weights in place (``IRefitter``). Both
  give the whole batch one set of adapters: a server that mixes requests would have to split every step batch by
  adapter, or swap adapters between steps, and serve each group alone.
- S-LoRA and Punica keep the base weights as they are and add, per row i of the batch, ``scale_i * B_i (A_i x_i)``
  with A and B gathered per row from the loaded adapters (a batched gather matmul, BGMV): rows with different
  adapters, or none, share one call.

The step-level batcher here puts rows of different requests into one UNet call, so the second is the one that fits:
each adapted linear layer or 1x1 convolution gets, per row, ``down`` (R, in) and ``up`` (out, R) with the request's
scales folded into ``up`` and its adapters side by side along the rank (several adapters per request are one LoRA
of the summed rank), zero-padded to a slot rank R; a row without an adapter gets zeros, and a call in which no row
adapts a layer skips it. The cost is two thin matmuls per adapted layer and row; fusing (``ldm-import --lora``)
stays the fastest way to serve one adapter to everyone.

This module reads adapter files (the diffusers / PEFT and kohya layouts; ``ldm_export.lora`` fuses the same files
with the same placement) as if hostile, with numpy only, so an engine dir's engines read them without torch: the
header is checked as ``ldm-import`` checks it (``ldm_runtime.safetensors_header``), every key must be placed in a
module of the model, shapes must fit, values be finite and ranks at most ``MAX_ADAPTER_RANK``. ``AdapterError``
names what is wrong in one sentence.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NoReturn, Sequence

import numpy as np

from ldm_runtime import safetensors_header
from ldm_runtime.config import ADAPTER_SCALES
from ldm_runtime.errors import RequestError, UserError
from ldm_runtime.files import describe, sha256_file, special_file_kind
from ldm_runtime.safetensors_header import PICKLE_SUFFIXES, Entry

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
# an alpha may be an integer too: kohya's svd_merge_lora.py writes torch.tensor(rank), an int64
INTEGER_DTYPES = ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8")
NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",  # bf16: the high half of a float32
                "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2",
                "U8": "u1"}
MAX_ADAPTER_RANK = 256  # published LoRAs: 4 to 128
MAX_REQUEST_ADAPTERS = 4  # adapters one request may name (each adds its rank to every adapted layer's work)
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
AdapterChoice = tuple[tuple[str, float], ...]  # a request's ``lora``: (adapter name, scale) pairs


class AdapterError(UserError, ValueError):
    """An adapter file or an adapter's name that cannot be served."""


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


# --- placing an adapter's keys ------------------------------------------------------------------------------------

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


@dataclass
class _Module:
    """The keys of one adapted module: its network, its name as the file gives it, and down/up/alpha tensors."""

    network: str
    name: str
    keys: dict[str, str] = dataclasses.field(default_factory=dict)


def _refuse_key(path: Path, key: str) -> NoReturn:
    if key.startswith(("lora_te1_", "lora_te2_")):
        raise AdapterError(f"{path}: {key!r} adapts one of the two text encoders of an SDXL model (lora_te1_, "
                           f"lora_te2_); expected a LoRA for this model, whose one text encoder's keys are lora_te_")
    for marker, kind in OTHER_KINDS.items():
        if marker in key:
            raise AdapterError(f"{path}: {key!r} belongs to {kind}, which is not a plain LoRA; expected a LoRA "
                               f"(down and up weights, alpha)")
    raise AdapterError(f"{path}: cannot place {key!r}; expected LoRA keys unet.<module>.lora_A.weight / "
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
        raise AdapterError(f"{path}: {key!r} names {why} of this model's {NETWORK_NAMES[network]} (kohya "
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
    packed = safetensors_header.parse_json(metadata[METADATA_KEY].encode("utf-8", "surrogatepass"), where,
                                           AdapterError)
    if not isinstance(packed, dict):
        raise AdapterError(f"{where} is {describe(packed)}; expected an object")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in packed.items():
        network, _, name = key.partition(".")
        if network in NETWORK_NAMES:
            configs.setdefault(network, {})[name] = value
    for network, config in configs.items():
        wrong = _wrong_metadata(config)
        if wrong:
            name, expected = wrong
            raise AdapterError(f"{where}: {network}.{name} is {describe(config.get(name))}; expected {expected}")
    return configs


def _wrong_metadata(config: dict[str, Any]) -> tuple[str, str] | None:
    """(the first key of a network's PEFT LoraConfig that is not taken, what it expects), or None; the optional
    keys get their defaults."""
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
            return name, "false (plain LoRA only)"
    return None


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_alpha(value: Any) -> bool:
    """Whether ``value`` is an alpha a LoRA may have: a finite number above 0 and at most ``MAX_ALPHA``."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0 < value <= MAX_ALPHA)


_is_alpha = is_alpha


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


@dataclass(frozen=True)
class PendingUpdate:
    """A placed module before its alpha is read: the update (factor 0), its rank, whether alpha is over
    sqrt(rank) (rsLoRA), and alpha or the key of its alpha tensor."""

    update: ModuleUpdate
    rank: int
    rslora: bool
    alpha: float | str


def place_adapter(path: Path, header: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str],
                  targets: dict[str, Targets], absent: dict[str, str] | None = None) -> list[PendingUpdate]:
    """Every key of an adapter file's ``header`` {name: (safetensors dtype, shape)} placed in the networks of
    ``targets``; ``absent``: {network: why the model has no weights of it to change} for the message.
    ``AdapterError`` for a key that has no place, a shape that does not fit, or metadata that is not taken."""
    configs = _metadata(path, metadata)
    modules: dict[tuple[str, str], _Module] = {}
    for key in header:
        placed = _kohya_key(path, key, targets) or _diffusers_key(path, key)
        if placed is None:
            _refuse_key(path, key)
        network, name, role = placed
        if network not in targets:
            why = (absent or {}).get(network, "it holds none")
            raise AdapterError(f"{path}: {key!r} adapts the {NETWORK_NAMES[network]}, whose weights this "
                               f"checkpoint does not hold ({why}); expected an adapter of the UNet only")
        module = modules.setdefault((network, name), _Module(network, name))
        if role in module.keys:
            raise AdapterError(f"{path}: {key!r} and {module.keys[role]!r} are both the {role} of "
                               f"{NETWORK_NAMES[network]} module {name!r}; expected one")
        module.keys[role] = key
    if not any("down" in module.keys for module in modules.values()):
        raise AdapterError(f"{path} holds no LoRA weights; expected down and up weights of UNet or text encoder "
                           f"modules")
    return [_placed(path, module, header, targets[module.network], configs.get(module.network))
            for module in modules.values()]


def _placed(path: Path, module: _Module, header: dict[str, tuple[str, tuple[int, ...]]], targets: Targets,
            config: dict[str, Any] | None) -> PendingUpdate:
    """The ``PendingUpdate`` of ``module``, every key checked against the header."""
    network_name = NETWORK_NAMES[module.network]
    for role, other in (("down", "up"), ("up", "down"), ("alpha", "down")):
        if role in module.keys and other not in module.keys:
            raise AdapterError(f"{path}: {module.keys[role]!r} has no {other} weight beside it; expected the "
                               f"down and up weights of each module")
    down_key, up_key = module.keys["down"], module.keys["up"]
    canonical = module.name.removeprefix(TEXT_MODEL_LEVEL) if module.network == TEXT_ENCODER else module.name
    if canonical not in targets.weights:
        raise AdapterError(f"{path}: {down_key!r} adapts {network_name} module {module.name!r}, which this "
                           f"model does not have; expected an adapter for this model")
    target, weight_shape = targets.weights[canonical]
    (down_dtype, down_shape), (up_dtype, up_shape) = header[down_key], header[up_key]
    for key, dtype in ((down_key, down_dtype), (up_key, up_dtype)):
        if dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{path}: {key!r} is {dtype}; expected floating point ({', '.join(FLOAT_DTYPES)})")
    if not _fits(down_shape, up_shape, weight_shape):
        raise AdapterError(f"{path}: {down_key!r} {list(down_shape)} and {up_key!r} {list(up_shape)} do not fit "
                           f"{network_name} module {module.name!r} of shape {list(weight_shape)}; expected down "
                           f"(rank, in[, kh, kw]) and up (out, rank[, 1, 1]) of its sizes")
    rank = down_shape[0]
    update = ModuleUpdate(module.network, target, down_key, up_key, down_shape, up_shape, 0.0)
    if "alpha" in module.keys:
        alpha_key = module.keys["alpha"]
        dtype, shape = header[alpha_key]
        if dtype not in FLOAT_DTYPES + INTEGER_DTYPES or shape not in ((), (1,)):
            raise AdapterError(f"{path}: {alpha_key!r} is {dtype} of shape {list(shape)}; expected one number")
        return PendingUpdate(update, rank, False, alpha_key)
    if config is None:
        return PendingUpdate(update, rank, False, float(rank))  # no alpha: a scale of 1, as diffusers and kohya
    configured_rank = _pattern_value(config["rank_pattern"], module.name, config["r"])
    if configured_rank != rank:
        raise AdapterError(f"{path}: {down_key!r} has rank {rank} but the {METADATA_KEY} gives "
                           f"{network_name} module {module.name!r} rank {configured_rank}; expected them equal")
    alpha = _pattern_value(config["alpha_pattern"], module.name, config["lora_alpha"])
    return PendingUpdate(update, rank, config["use_rslora"], alpha)


def with_factors(path: Path, pending: Sequence[PendingUpdate], alphas: Mapping[str, float],
                 scale: float) -> tuple[ModuleUpdate, ...]:
    """The updates of ``pending`` with factor ``scale * alpha / rank`` (sqrt(rank) for rsLoRA); ``alphas``: the
    value of each alpha tensor by key."""
    updates = []
    for placed in pending:
        alpha = alphas.get(placed.alpha, placed.alpha) if isinstance(placed.alpha, str) else placed.alpha
        if not is_alpha(alpha):
            named = repr(placed.alpha) if isinstance(placed.alpha, str) else f"the alpha of {placed.update.down!r}"
            zero = (" (kohya reads an alpha of 0 as the rank, diffusers as 0: write the alpha meant)"
                    if alpha == 0 else "")
            raise AdapterError(f"{path}: {named} is {alpha!r}; expected a number above 0 and at most "
                               f"{MAX_ALPHA:g}{zero}")
        factor = scale * alpha / (math.sqrt(placed.rank) if placed.rslora else placed.rank)
        updates.append(dataclasses.replace(placed.update, factor=factor))
    return tuple(updates)


# --- reading a file with numpy -------------------------------------------------------------------------------------

def check_adapter_file(path: Path) -> int:
    """The size of adapter file ``path``: a regular .safetensors file (a pickle is refused by its name, unread)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterError(f"{path} is a pickled file ({path.suffix}); pickles are never loaded (loading one can run "
                           f"any code): expected the .safetensors release of the LoRA")
    try:
        status = path.stat()
    except OSError as error:
        raise AdapterError(f"cannot read {path} ({error.strerror or error}); expected a LoRA .safetensors "
                           f"file") from None
    if not stat.S_ISREG(status.st_mode):
        raise AdapterError(f"{path} is {special_file_kind(status.st_mode)}, not a regular file; expected a LoRA "
                           f".safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise AdapterError(f"{path} is not a .safetensors file; expected a LoRA .safetensors file")
    return status.st_size


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """({tensor name: (dtype, shape, first byte, end byte) of its data}, ``__metadata__``) of safetensors file
    ``path``, checked as ``ldm_runtime.safetensors_header`` checks every file it reads, and float dtypes only."""
    tensors, metadata = safetensors_header.read_header(path, check_adapter_file(path), AdapterError)
    for name, (dtype, shape, _, _) in tensors.items():
        if dtype not in FLOAT_DTYPES and not (dtype in INTEGER_DTYPES and shape in ((), (1,))):  # an alpha's int
            raise AdapterError(f"{path}: tensor {name!r} of shape {list(shape)} has dtype {dtype}; expected floating "
                               f"point data ({', '.join(FLOAT_DTYPES)})")
    return tensors, metadata


def read_arrays(path: Path, header: dict[str, Entry], names: Sequence[str]) -> dict[str, np.ndarray]:
    """The tensors ``names`` of ``path`` as float32 arrays (the file's header read by ``read_header``)."""
    arrays = {}
    with open(path, "rb") as handle:
        data_start = 8 + int.from_bytes(handle.read(8), "little")
        for name in names:
            dtype, shape, first, end = header[name]
            handle.seek(data_start + first)
            raw = np.frombuffer(handle.read(end - first), dtype=NUMPY_DTYPES[dtype])
            if raw.size != math.prod(shape):
                raise AdapterError(f"{path} changed while it was read; expected it to stay as it was")
            values = (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else raw.astype(np.float32)
            arrays[name] = values.reshape(shape)
    return arrays


# --- adapters loaded for serving ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter ready for per-request use: {(network, state-dict key of the weight): (down (rank, in[, kh, kw]),
    up (out, rank) with ``alpha / rank`` folded in)} as float32 arrays, its rank (the largest of its modules), and
    what identifies it (``record``)."""

    name: str
    path: Path
    sha256: str
    modules: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]
    rank: int

    @property
    def networks(self) -> set[str]:
        return {network for network, _ in self.modules}

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.path.name, "sha256": self.sha256, "rank": self.rank}


def load_adapter(name: str, path: str | Path, targets: dict[str, Targets], absent: dict[str, str] | None = None,
                 pointwise_only: str | None = None) -> LoadedAdapter:
    """Adapter file ``path`` read and checked against the networks of ``targets`` under ``name``: every key placed,
    shapes fitting, ranks at most ``MAX_ADAPTER_RANK``, every value finite. ``pointwise_only``: why a kh x kw
    convolution's LoRA (LoCon) is refused, where it is. ``AdapterError`` otherwise."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise AdapterError(f"adapter name {name!r} is not valid; expected 1 to 64 letters, digits, '_', '-' or '.', "
                           f"starting with a letter or digit")
    path = Path(path)
    header, metadata = read_header(path)
    if pointwise_only is not None:
        for key, (_, shape, *_) in header.items():
            if len(shape) == 4 and shape[2:] != (1, 1):
                raise AdapterError(f"{path}: {key!r} {list(shape)} is the LoRA of a {shape[2]}x{shape[3]} convolution "
                                   f"(LoCon), which is not served here: {pointwise_only}")
    pending = place_adapter(path, {key: entry[:2] for key, entry in header.items()}, metadata, targets, absent)
    alpha_keys = [placed.alpha for placed in pending if isinstance(placed.alpha, str)]
    alphas = {key: float(array.reshape(-1)[0]) for key, array in read_arrays(path, header, alpha_keys).items()}
    updates = with_factors(path, pending, alphas, 1.0)
    arrays = read_arrays(path, header, [key for update in updates for key in (update.down, update.up)])
    modules = {}
    for update in updates:
        down, up = arrays[update.down], arrays[update.up]
        if down.shape[0] > MAX_ADAPTER_RANK:
            raise AdapterError(f"{path}: {update.down!r} has rank {down.shape[0]}; expected at most "
                               f"{MAX_ADAPTER_RANK}")
        for key, array in ((update.down, down), (update.up, up)):
            if not np.isfinite(array).all():
                raise AdapterError(f"{path}: {key!r} holds values that are not finite; expected finite weights")
        modules[(update.network, update.target)] = (down, up.reshape(up.shape[0], -1) * np.float32(update.factor))
    return LoadedAdapter(name, path, sha256_file(path), modules, max(down.shape[0] for down, _ in modules.values()))


def check_request_adapters(lora: Any, adapters: Mapping[str, LoadedAdapter] | None, engine_name: str,
                           missing: str | None = None, slot_rank: int | None = None) -> None:
    """``RequestError`` naming what is wrong with a request's ``lora`` for an engine that serves ``adapters``
    (None: an engine that applies none, ``missing`` saying why); ``slot_rank``: the most summed rank a request may
    ask for (an engine dir's slots)."""
    if lora == ():
        return
    if adapters is None:
        raise RequestError(f"lora is {_describe_choice(lora)}; the {engine_name} engine applies no adapters per "
                           f"request ({missing or 'it has no adapter support'}); expected none, or the adapter fused "
                           f"with ldm-import --lora", "lora")
    if not (isinstance(lora, tuple) and all(isinstance(pair, tuple) and len(pair) == 2 for pair in lora)):
        raise RequestError(f"lora is {_describe_choice(lora)}; expected (name, scale) pairs", "lora")
    if len(lora) > MAX_REQUEST_ADAPTERS:
        raise RequestError(f"lora names {len(lora)} adapters; expected at most {MAX_REQUEST_ADAPTERS}", "lora")
    low, high = ADAPTER_SCALES
    for name, scale in lora:
        if name not in adapters:
            known = ", ".join(sorted(adapters)) or "none"
            raise RequestError(f"lora names adapter {name!r}, which is not loaded; expected one of: {known}", "lora")
        if (isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating))
                or not math.isfinite(scale) or not low <= scale <= high):
            raise RequestError(f"lora gives adapter {name!r} the scale {scale!r}; expected a number from {low:g} to "
                               f"{high:g}", "lora")
    names = [name for name, _ in lora]
    if len(set(names)) != len(names):
        raise RequestError(f"lora names {sorted(names)} with repeats; expected each adapter once", "lora")
    total = sum(adapters[name].rank for name in names)
    if slot_rank is not None and total > slot_rank:
        raise RequestError(f"lora's adapters {names} have ranks summing to {total}; this engine dir's slots hold "
                           f"rank {slot_rank} (re-export it with a larger ldm-export --lora-slots)", "lora")


def _describe_choice(lora: Any) -> str:
    text = repr(lora)
    return text if len(text) <= 80 else f"a {type(lora).__name__} of {len(lora) if hasattr(lora, '__len__') else '?'}"


def row_factors(key: tuple[str, str], choice: AdapterChoice, adapters: Mapping[str, LoadedAdapter],
                rank: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(down (rank, in), up (out, rank)) of one row for module ``key``: the row's adapters side by side along the
    rank, each up times its scale, zero-padded to ``rank``; None when none of them adapts the module."""
    parts = [(adapters[name].modules[key], scale) for name, scale in choice if key in adapters[name].modules]
    if not parts:
        return None
    downs = [down.reshape(down.shape[0], -1) for (down, _), _ in parts]
    ups = [up * np.float32(scale) for (_, up), scale in parts]
    used = sum(down.shape[0] for down in downs)
    assert used <= rank, (used, rank)
    down = np.zeros((rank, downs[0].shape[1]), np.float32)
    up = np.zeros((ups[0].shape[0], rank), np.float32)
    down[:used], up[:, :used] = np.concatenate(downs), np.concatenate(ups, axis=1)
    return down, up


def slot_rank_for(adapters: Mapping[str, LoadedAdapter]) -> int:
    """The rank a row's slots need for any request over ``adapters``: the ``MAX_REQUEST_ADAPTERS`` largest ranks
    summed (fixed per engine, so that a row's arithmetic never depends on the rows beside it)."""
    ranks = sorted((adapter.rank for adapter in adapters.values()), reverse=True)
    return sum(ranks[:MAX_REQUEST_ADAPTERS])


# --- adapters named on a command line -----------------------------------------------------------------------------

RESERVED_ADAPTER_NAMES = ("none",)  # ldm-serve's metrics label requests without an adapter "none"


def named_adapter_argument(text: str) -> tuple[str, Path]:
    """argparse type of ``ldm-serve --lora NAME=FILE``: (NAME, FILE), NAME what requests call the adapter."""
    name, equals, path = text.partition("=")
    if not equals or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=FILE (e.g. style=style.safetensors)")
    if not ADAPTER_NAME.fullmatch(name) or name in RESERVED_ADAPTER_NAMES:
        reserved = ", ".join(RESERVED_ADAPTER_NAMES)
        raise argparse.ArgumentTypeError(f"the name {name!r} of {text!r} is not an adapter name; expected 1 to 64 "
                                         f"letters, digits, '_', '-' or '.', starting with a letter or digit (not "
                                         f"{reserved})")
    return name, Path(path)


def adapter_file_argument(text: str) -> tuple[Path, float]:
    """argparse type of ``--lora FILE[:SCALE]`` (ldm-sample, ldm-import): (FILE, SCALE), the scale 1 when not
    given, else a finite number within ``ADAPTER_SCALES`` (a path that exists as written keeps its colons)."""
    path, colon, tail = text.rpartition(":")
    if not colon or Path(text).exists():
        return Path(text), 1.0
    try:
        scale = float(tail)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not FILE[:SCALE] (e.g. style.safetensors:0.8)") from None
    low, high = ADAPTER_SCALES
    if not (math.isfinite(scale) and low <= scale <= high):
        raise argparse.ArgumentTypeError(f"the scale of {text!r} is {tail}; expected a number from {low:g} to {high:g}")
    return Path(path), scale
