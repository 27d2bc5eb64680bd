"""An engine dir's ``manifest.json``: what ``ldm-export`` wrote and what every engine reads back.

Layout of an engine dir::

    manifest.json       this description (written last, so its presence means the dir is complete)
    text_encoder.onnx   input_ids, attention_mask (B, L) int64 -> context (B, L, D)
    unet.onnx           latents (B, C, h, w), timesteps (B,) int64, context (B, L, D), context_mask (B, L) bool
                        -> noise_pred (B, C, h, w)
    vae_decoder.onnx    latents (B, C, h, w) (unscaled) -> images (B, 3, H, W) in [-1, 1]
    vae_encoder.onnx    images (B, 3, H, W) in [-1, 1] -> latents (B, C, h, w) (the posterior mode, unscaled)
    tokenizer/          tokenizer.json and its config, read with the ``tokenizers`` library
    *.plan              TensorRT plans, where they were built (specific to one GPU model and TensorRT version)

Every shape in the manifest names its dynamic axes ("batch", "latent_height", ...); ``dims`` gives each name
its min / opt / max and the multiple a value must be of. Every number has the range model.json's has
(``ldm_runtime.config``); a batch holds at most ``MAX_BATCH_ROWS`` rows and any other axis is at most
``LARGEST_IMAGE_SIDE`` long. Each graph entry's tensors are the ones the runtime gives and reads (``GRAPH_TENSORS``),
and the model's numbers agree with the shapes (``model.latent_factor`` times each latent range is the image range,
the UNet's context is ``text_max_length`` by ``context_dim``). Anything else is refused with ``EngineDirError``
naming the entry, its values shortened to fit one line.

``definition_sha256`` records, part by part, the sha256 of the canonical JSON (``canonical_json``) of the parts that
define the model the graphs were exported from (``DEFINITION_PARTS``: the model's numbers, its noise schedule and
its DDIM settings): a manifest whose parts no longer match is refused, naming the part that was edited.
``default_sampler``, a default a user may change, is not among them. ``sizes`` (per graph, and for the tokenizer and
each TensorRT plan ``size``) records each file's bytes, so that a file of the wrong size is refused before it is
hashed. Manifests written before either was recorded load as they did. The runtime reads this module with numpy
only.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ldm_runtime.config import (
    LARGEST_IMAGE_SIDE,
    MAX_CONTEXT_DIM,
    MAX_IMAGE_SIZE,
    MAX_LATENT_CHANNELS,
    MAX_LEVELS,
    MAX_TEXT_LENGTH,
    ConfigError,
    DDIMConfig,
    SamplerDefaults,
    ScheduleConfig,
    check_integer,
    check_latent_scale_factor,
    config_from_dict,
    inpainting_channels,
)
from ldm_runtime.errors import EngineDirError, OutOfRangeError, one_line
from ldm_runtime.files import describe, read_description, sha256_file, shown, special_file_kind

MANIFEST_JSON = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
TOKENIZER_DIR = "tokenizer"
GRAPH_NAMES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
# DeepCache's cheap step: the UNet's shallow part on the deep features the "unet" graph's second output gives
SHALLOW_UNET_GRAPH = "unet_shallow"
DEEP_FEATURES = "deep_features"  # the "unet" graph's second output and the "unet_shallow" graph's last input
OPTIONAL_GRAPH_NAMES = (SHALLOW_UNET_GRAPH,)
REQUIRED_DIMS = ("batch", "image_height")  # the ranges the runtime checks requests against
TENSOR_DTYPES = ("float32", "float16", "int64", "int32", "bool")
PRECISIONS = ("fp32", "fp16")
BACKENDS = ("onnxruntime", "tensorrt")
MAX_BATCH_ROWS = 256  # UNet rows of one call (ldm-export's default range: 1 to 8; the torch engine's: 64)
# The text encoder's length axis, where the model masks padding: a prompt is encoded at its token count rounded up
# to a multiple of TEXT_LENGTH_STEP (at most the tokenizer's max_length), a handful of shapes for the engines that
# compile one per shape; the UNet still takes max_length tokens, the rest masked.
TEXT_LENGTH = "text_length"
TEXT_LENGTH_STEP = 8
# The inputs the runtime gives each graph by name and the outputs it reads, in the order it reads them; the UNet
# graphs of an engine dir with LoRA slots take LORA_INPUTS besides, and the "unet" graph of one exported without
# feature caching gives noise_pred alone.
GRAPH_TENSORS = {
    "text_encoder": (("input_ids", "attention_mask"), ("context",)),
    "unet": (("latents", "timesteps", "context", "context_mask"), ("noise_pred", DEEP_FEATURES)),
    SHALLOW_UNET_GRAPH: (("latents", "timesteps", "context", "context_mask", DEEP_FEATURES), ("noise_pred",)),
    "vae_decoder": (("latents",), ("images",)),
    "vae_encoder": (("images",), ("latents",)),
}
LORA_INPUTS = ("lora_down.", "lora_up.")  # name prefixes of the per-row LoRA inputs
DEFINITION_SHA256 = "definition_sha256"
DEFINITION_PARTS = ("model", "schedule", "sampler")  # what the images depend on and no user edits
MAX_FILE_NAME_BYTES = 255  # of each part of a file name the manifest lists (the file systems' limit)


@dataclass(frozen=True)
class DimRange:
    """The values one named axis may take: ``min <= value <= max`` and ``value % multiple == 0``;
    ``opt`` is the value the graphs were tuned for (TensorRT's optimisation profile)."""

    min: int
    opt: int
    max: int
    multiple: int = 1

    def __post_init__(self) -> None:
        values = (self.min, self.opt, self.max, self.multiple)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise ValueError(f"dimension range ({', '.join(shown(v) for v in values)}) is not valid; expected "
                             f"positive integers")
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"dimension range min {shown(self.min)}, opt {shown(self.opt)}, max {shown(self.max)} "
                             f"is not ordered")
        if any(v % self.multiple for v in (self.min, self.opt, self.max)):
            raise ValueError(f"dimension range {shown(self.min)}..{shown(self.max)} (opt {shown(self.opt)}) is not "
                             f"in multiples of {shown(self.multiple)}")

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max and value % self.multiple == 0

    def describe(self) -> str:
        """"1..8" or "32..64 in multiples of 8"."""
        text = f"{self.min}..{self.max}"
        return text if self.multiple == 1 else f"{text} in multiples of {self.multiple}"


def text_length_range(max_length: int, mask_padding: bool) -> DimRange | None:
    """The ``text_length`` axis's range for a text encoder of ``max_length`` tokens: ``TEXT_LENGTH_STEP`` to
    ``max_length``; None where every prompt is encoded at ``max_length``: where the model does not mask padding (the
    UNet attends to every token, padding included) or ``max_length`` is at most one step."""
    if not mask_padding or max_length <= TEXT_LENGTH_STEP:
        return None
    return DimRange(TEXT_LENGTH_STEP, max_length, max_length)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, numpy dtype name, and shape (ints, or names of ``dims`` axes)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorSpec":
        return cls(name=str(data["name"]), dtype=str(data["dtype"]), shape=tuple(data["shape"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphEntry:
    """One ONNX graph: the file a session opens, every file it needs (with sha256 and, where recorded, size), its
    precision, its tensors."""

    file: str
    files: dict[str, str]  # file name -> sha256 (the graph and any external-data file)
    precision: str  # "fp32" or "fp16" (fp16 graphs keep fp32 islands; see ldm_export/fp16.py)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. why a graph stayed fp32 in an fp16 engine
    sizes: dict[str, int] = field(default_factory=dict)  # file name -> bytes; {} in manifests that predate it

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GraphEntry":
        return cls(file=str(data["file"]), files=dict(data["files"]), precision=str(data["precision"]),
                   inputs=tuple(TensorSpec.from_dict(d) for d in data["inputs"]),
                   outputs=tuple(TensorSpec.from_dict(d) for d in data["outputs"]),
                   notes=dict(data.get("notes", {})), sizes=dict(data.get("sizes", {})))

    def check(self, where: str) -> None:
        """``EngineDirError`` unless every file lies inside the engine dir, ``file`` is among the digested
        ``files``, every recorded size is one of theirs, and the precision, dtypes and shapes are ones the runtime
        can use."""
        for name, digest in self.files.items():
            _check_file_name(where, name, digest)
        if self.file not in self.files:
            raise EngineDirError(f"{where} graph file {shown(self.file)} has no sha256 in 'files'; expected every "
                                 f"file a session opens to be listed there")
        _check_sizes(where, self.sizes, self.files)
        if self.precision not in PRECISIONS:
            raise EngineDirError(f"{where} precision is {shown(self.precision)}; expected one of {PRECISIONS}")
        for spec in (*self.inputs, *self.outputs):
            if spec.dtype not in TENSOR_DTYPES:
                raise EngineDirError(f"{where} tensor {_key(spec.name)} has dtype {shown(spec.dtype)}; expected one "
                                     f"of {TENSOR_DTYPES}")
            for axis in spec.shape:
                named = isinstance(axis, str)
                sized = isinstance(axis, int) and not isinstance(axis, bool) and 1 <= axis <= LARGEST_IMAGE_SIDE
                if not (named or sized):
                    raise EngineDirError(f"{where} tensor {_key(spec.name)} has axis {shown(axis)}; expected an "
                                         f"integer from 1 to {LARGEST_IMAGE_SIDE} or the name of a 'dims' entry")

    def to_dict(self) -> dict[str, Any]:
        data = {"file": self.file, "files": dict(self.files), "precision": self.precision,
                "inputs": [spec.to_dict() for spec in self.inputs],
                "outputs": [spec.to_dict() for spec in self.outputs], "notes": dict(self.notes)}
        if self.sizes:
            data["sizes"] = dict(self.sizes)
        return data


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know about the model behind the graphs (from the checkpoint's model.json)."""

    image_size: int
    latent_channels: int
    latent_factor: int  # image side / latent side
    latent_scale_factor: float
    text_max_length: int
    context_dim: int
    mask_padding: bool = True  # False: the UNet attends to every token, padding included (Stable Diffusion)
    inpainting: bool = False  # the unet graphs take [latents, mask, masked image latents] (ModelConfig.inpainting)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelInfo":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def check(self, where: str) -> None:
        """``EngineDirError`` naming the first field that is out of range (model.json's ranges)."""
        try:
            check_integer("model.image_size", self.image_size, 1, MAX_IMAGE_SIZE)
            check_integer("model.latent_channels", self.latent_channels, 1, MAX_LATENT_CHANNELS)
            check_integer("model.text_max_length", self.text_max_length, 1, MAX_TEXT_LENGTH)
            check_integer("model.context_dim", self.context_dim, 1, MAX_CONTEXT_DIM)
            check_latent_scale_factor("model.latent_scale_factor", self.latent_scale_factor)
        except ConfigError as error:
            raise EngineDirError(f"{where}: {error}") from None
        factors = [2**level for level in range(MAX_LEVELS)]
        factor = self.latent_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or factor not in factors:
            raise EngineDirError(f"{where}: model.latent_factor is {shown(self.latent_factor)}; expected one of "
                                 f"{factors}")
        if not isinstance(self.mask_padding, bool):
            raise EngineDirError(f"{where}: model.mask_padding is {shown(self.mask_padding)}; expected true or false")
        if not isinstance(self.inpainting, bool):
            raise EngineDirError(f"{where}: model.inpainting is {shown(self.inpainting)}; expected true or false")


@dataclass(frozen=True)
class EngineManifest:
    """The parsed ``manifest.json``. ``raw`` keeps every entry, including the ones only people read
    (validation results, tool versions, the source checkpoint)."""

    format_version: int
    precision: str
    backend: str
    model: ModelInfo
    schedule: dict[str, Any]
    sampler: dict[str, Any]  # the model's DDIM settings (ldm_runtime.schedulers.DDIMConfig); {} = the defaults
    default_sampler: dict[str, Any]  # the model's SamplerDefaults; {} = the project's defaults
    dims: dict[str, DimRange]
    graphs: dict[str, GraphEntry]
    tokenizer_files: dict[str, str]  # file name inside tokenizer/ -> sha256
    tensorrt: dict[str, Any] | None
    raw: dict[str, Any]
    tokenizer_sizes: dict[str, int] = field(default_factory=dict)  # file name inside tokenizer/ -> bytes, if recorded

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST_JSON) -> "EngineManifest":
        """Parse and check a manifest; ``EngineDirError`` naming the first bad entry."""
        _check_format_version(data, where)
        _check_structure(data, where)
        try:
            dims = {}
            for name, value in data["dims"].items():
                try:
                    dims[name] = DimRange(**value)
                except ValueError as error:
                    raise EngineDirError(f"{where}: dims.{name}: {error}") from None
            manifest = cls(
                format_version=data["format_version"],
                precision=data["precision"],
                backend=data["backend"],
                model=ModelInfo.from_dict(data["model"]),
                schedule=dict(data["schedule"]),
                sampler=dict(data.get("sampler", {})),  # engine dirs exported before it was recorded have none
                default_sampler=dict(data.get("default_sampler", {})),  # nor this
                dims=dims,
                graphs={name: GraphEntry.from_dict(value) for name, value in data["graphs"].items()},
                tokenizer_files=dict(data["tokenizer"]["files"]),
                tensorrt=data.get("tensorrt"),
                raw=data,
                tokenizer_sizes=dict(data["tokenizer"].get("sizes", {})),
            )
            schedule = config_from_dict(ScheduleConfig, manifest.schedule, "schedule")
            schedule.validate()
            sampler = config_from_dict(DDIMConfig, manifest.sampler, "sampler")
            defaults = SamplerDefaults.from_dict(manifest.default_sampler)
        except EngineDirError:
            raise
        except ConfigError as error:
            raise EngineDirError(f"{where} is not a valid engine manifest: {error}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as error:  # what _check_structure did not foresee
            raise EngineDirError(f"{where} is not a valid engine manifest ({type(error).__name__}: "
                                 f"{one_line(error)})") from None
        manifest.model.check(where)
        if sampler.steps_offset >= schedule.num_train_timesteps:
            raise EngineDirError(f"{where}: sampler.steps_offset is {sampler.steps_offset}; expected an integer from 0 "
                                 f"to {schedule.num_train_timesteps - 1} (below schedule.num_train_timesteps)")
        if (defaults.steps_offset or 0) >= schedule.num_train_timesteps:
            raise EngineDirError(f"{where}: default_sampler.steps_offset is {defaults.steps_offset}; expected an "
                                 f"integer from 0 to {schedule.num_train_timesteps - 1}")
        if (defaults.steps or 0) > schedule.num_train_timesteps:
            raise EngineDirError(f"{where}: default_sampler.steps is {defaults.steps}; expected an integer from 1 to "
                                 f"{schedule.num_train_timesteps}")
        for name in REQUIRED_DIMS:
            if name not in manifest.dims:
                raise EngineDirError(f"{where} defines no {name!r} in 'dims'; expected all of {REQUIRED_DIMS}")
        for name, allowed in manifest.dims.items():
            most = MAX_BATCH_ROWS if name == "batch" else LARGEST_IMAGE_SIDE
            if allowed.max > most:
                raise EngineDirError(f"{where}: dims.{name}.max is {shown(allowed.max)}; expected at most {most}")
        for graph_name, graph in manifest.graphs.items():
            graph.check(f"{where}: {graph_name}")
        for name, digest in manifest.tokenizer_files.items():
            _check_file_name(f"{where}: tokenizer", name, digest)
        _check_sizes(f"{where}: tokenizer", manifest.tokenizer_sizes, manifest.tokenizer_files)
        tensorrt = {} if manifest.tensorrt is None else manifest.tensorrt
        plans = tensorrt.get("plans", {}) if isinstance(tensorrt, dict) else None
        if not isinstance(plans, dict):
            raise EngineDirError(f"{where}: 'tensorrt' is {describe(manifest.tensorrt)}; expected an object with "
                                 f"'plans'")
        for name, plan in plans.items():
            if not isinstance(plan, dict):
                raise EngineDirError(f"{where}: tensorrt plan {shown(name)} is {describe(plan)}; expected an object")
            _check_file_name(f"{where}: tensorrt plan {name}", plan.get("file"), plan.get("sha256"))
            if "size" in plan:
                _check_sizes(f"{where}: tensorrt plan {name}", {plan["file"]: plan["size"]}, {plan["file"]: ""})
        if manifest.precision not in PRECISIONS or manifest.backend not in BACKENDS:
            raise EngineDirError(f"{where} has precision {shown(manifest.precision)} and backend "
                                 f"{shown(manifest.backend)}; expected one of {PRECISIONS} and one of {BACKENDS}")
        missing = [name for name in GRAPH_NAMES if name not in manifest.graphs]
        if missing:
            raise EngineDirError(f"{where} lists no {', '.join(missing)} graph; expected all of {GRAPH_NAMES}")
        unknown = [name for name in manifest.graphs if name not in GRAPH_NAMES + OPTIONAL_GRAPH_NAMES]
        if unknown:
            raise EngineDirError(f"{where} lists graphs {shown(unknown)} the runtime does not know; expected "
                                 f"{', '.join(GRAPH_NAMES + OPTIONAL_GRAPH_NAMES)}")
        unet_outputs = [spec.name for spec in manifest.graphs["unet"].outputs]
        if SHALLOW_UNET_GRAPH in manifest.graphs and DEEP_FEATURES not in unet_outputs:
            raise EngineDirError(f"{where} lists a {SHALLOW_UNET_GRAPH} graph but its unet graph has no "
                                 f"{DEEP_FEATURES} output (outputs {shown(unet_outputs)}); re-export it")
        for graph_name, graph in manifest.graphs.items():
            _check_graph_tensors(where, graph_name, graph)
        model = manifest.model
        channels = inpainting_channels(model.latent_channels) if model.inpainting else model.latent_channels
        for graph_name in ("unet", SHALLOW_UNET_GRAPH):
            graph = manifest.graphs.get(graph_name)
            latents = next((spec for spec in graph.inputs if spec.name == "latents"), None) if graph else None
            if latents is not None and latents.shape[1:2] != (channels,):
                raise EngineDirError(f"{where}: {graph_name} input latents has shape {shown(list(latents.shape))} but "
                                     f"model.inpainting is {str(model.inpainting).lower()}; expected {channels} "
                                     f"channels")
        for graph_name, graph in manifest.graphs.items():
            for spec in (*graph.inputs, *graph.outputs):
                unknown = [axis for axis in spec.shape if isinstance(axis, str) and axis not in manifest.dims]
                if unknown:
                    raise EngineDirError(f"{where}: {graph_name} tensor {spec.name} names axes {shown(unknown)} that "
                                         f"'dims' does not define")
        if TEXT_LENGTH in manifest.dims:
            allowed = manifest.dims[TEXT_LENGTH]
            if not model.mask_padding or allowed.max != model.text_max_length:
                raise EngineDirError(f"{where}: dims.{TEXT_LENGTH} is {allowed.describe()} with model.mask_padding "
                                     f"{str(model.mask_padding).lower()}; expected it only where padding is masked, up "
                                     f"to model.text_max_length ({model.text_max_length})")
        _check_model_against_shapes(where, manifest)
        _check_definition(where, data)
        return manifest

    def to_dict(self) -> dict[str, Any]:
        return self.raw

    @property
    def batch(self) -> DimRange:
        return self.dims["batch"]

    @property
    def image_size(self) -> DimRange:
        """Image side in pixels (height and width share one range)."""
        return self.dims["image_height"]

    def text_length(self, tokens: int) -> int:
        """The length the text encoder graph encodes a prompt of ``tokens`` tokens at: the tokenizer's
        ``max_length`` where the graph's length is fixed, else ``tokens`` rounded up to a multiple of
        ``TEXT_LENGTH_STEP`` within the ``text_length`` range."""
        allowed = self.dims.get(TEXT_LENGTH)
        if allowed is None or any(spec.shape[1:2] != (TEXT_LENGTH,) for spec in self.graphs["text_encoder"].inputs):
            return self.model.text_max_length
        return min(max(-(-tokens // TEXT_LENGTH_STEP) * TEXT_LENGTH_STEP, allowed.min), allowed.max)

    def check_batch(self, batch_size: int, what: str = "batch") -> None:
        """``OutOfRangeError`` unless ``batch_size`` lies in the exported batch range."""
        if not self.batch.contains(batch_size):
            raise OutOfRangeError(f"{what} size {batch_size} is outside the engine's exported range "
                                  f"{self.batch.describe()}; re-export with a wider --batch-range")

    def check_image_size(self, height: int, width: int) -> None:
        """``OutOfRangeError`` unless both sides lie in the exported image-size range (pixels)."""
        allowed = self.image_size
        if not (allowed.contains(height) and allowed.contains(width)):
            raise OutOfRangeError(f"image size {height}x{width} is outside the engine's exported range: each side "
                                  f"{allowed.describe()} px; re-export with a wider --size-range")

    def check_latent_size(self, height: int, width: int) -> None:
        """``OutOfRangeError`` unless a (h, w) latent corresponds to an allowed image size."""
        factor = self.model.latent_factor
        self.check_image_size(height * factor, width * factor)


_EXPECTED = {dict: "an object", list: "a list", str: "a string"}


def _entry(container: dict[str, Any], key: str, path: str, kind: type, where: str, required: bool = True) -> Any:
    """``container[key]`` (None where it is absent and not ``required``); ``EngineDirError`` naming ``path``
    where it is missing or not of ``kind``."""
    if key not in container:
        if required:
            raise EngineDirError(f"{where}: {path} is missing; expected {_EXPECTED[kind]}")
        return None
    value = container[key]
    if not isinstance(value, kind):
        raise EngineDirError(f"{where}: {path} is {describe(value)}; expected {_EXPECTED[kind]}")
    return value


def _key(name: str) -> str:
    """An object key as part of a field path in a message: itself, or shortened where it is long."""
    return name if len(name) <= 40 and name.isprintable() else shown(name)


def _check_format_version(data: Any, where: str) -> None:
    """``EngineDirError`` unless ``data`` is an object of the format version this runtime reads; the message says
    whether to re-export (an older version) or to upgrade the runtime (a newer one)."""
    if not isinstance(data, dict):
        raise EngineDirError(f"{where} holds {describe(data)}; expected an object")
    if "format_version" not in data:
        raise EngineDirError(f"{where}: format_version is missing; expected {MANIFEST_FORMAT_VERSION} (re-export the "
                             f"engine with this ldm-export)")
    version = data["format_version"]
    if isinstance(version, int) and not isinstance(version, bool) and version > MANIFEST_FORMAT_VERSION:
        raise EngineDirError(f"{where} has format_version {shown(version)}, newer than the version "
                             f"{MANIFEST_FORMAT_VERSION} this runtime reads; upgrade ldm-runtime to load it")
    if isinstance(version, bool) or version != MANIFEST_FORMAT_VERSION:
        raise EngineDirError(f"{where} has format_version {shown(version)}; this runtime reads version "
                             f"{MANIFEST_FORMAT_VERSION} (re-export the engine with this ldm-export)")


def _check_structure(data: dict[str, Any], where: str) -> None:
    """``EngineDirError`` naming the first field of the manifest that is missing or of the wrong JSON type (an
    object, a list, a string), by its path (``graphs.unet.inputs[0].shape``); values are checked later."""
    for key in ("precision", "backend"):
        if key not in data:
            raise EngineDirError(f"{where}: {key} is missing; expected one of "
                                 f"{PRECISIONS if key == 'precision' else BACKENDS}")
    model = _entry(data, "model", "model", dict, where)
    for spec in dataclasses.fields(ModelInfo):
        if spec.default is dataclasses.MISSING and spec.name not in model:
            kind = "a number" if spec.name == "latent_scale_factor" else "an integer"
            raise EngineDirError(f"{where}: model.{spec.name} is missing; expected {kind}, the model's {spec.name} "
                                 f"as ldm-export wrote it")
    _entry(data, "schedule", "schedule", dict, where)
    _entry(data, "sampler", "sampler", dict, where, required=False)
    _entry(data, "default_sampler", "default_sampler", dict, where, required=False)
    known = [spec.name for spec in dataclasses.fields(DimRange)]
    for name, value in _entry(data, "dims", "dims", dict, where).items():
        path = f"dims.{_key(name)}"
        if not isinstance(value, dict):
            raise EngineDirError(f"{where}: {path} is {describe(value)}; expected an object of min, opt, max and "
                                 f"multiple")
        unknown = sorted(set(value) - set(known))
        missing = [key for key in known[:3] if key not in value]
        if unknown or missing:
            what = f"has unknown key {shown(unknown[0])}" if unknown else f"has no {missing[0]}"
            raise EngineDirError(f"{where}: {path} {what}; expected min, opt, max and optionally multiple")
    for name, graph in _entry(data, "graphs", "graphs", dict, where).items():
        path = f"graphs.{_key(name)}"
        if not isinstance(graph, dict):
            raise EngineDirError(f"{where}: {path} is {describe(graph)}; expected an object")
        _entry(graph, "file", f"{path}.file", str, where)
        _entry(graph, "files", f"{path}.files", dict, where)
        _entry(graph, "precision", f"{path}.precision", str, where)
        _entry(graph, "notes", f"{path}.notes", dict, where, required=False)
        _entry(graph, "sizes", f"{path}.sizes", dict, where, required=False)
        for kind in ("inputs", "outputs"):
            for index, tensor in enumerate(_entry(graph, kind, f"{path}.{kind}", list, where)):
                at = f"{path}.{kind}[{index}]"
                if not isinstance(tensor, dict):
                    raise EngineDirError(f"{where}: {at} is {describe(tensor)}; expected an object of name, dtype "
                                         f"and shape")
                _entry(tensor, "name", f"{at}.name", str, where)
                _entry(tensor, "dtype", f"{at}.dtype", str, where)
                _entry(tensor, "shape", f"{at}.shape", list, where)
    tokenizer = _entry(data, "tokenizer", "tokenizer", dict, where)
    _entry(tokenizer, "files", "tokenizer.files", dict, where)
    _entry(tokenizer, "sizes", "tokenizer.sizes", dict, where, required=False)
    _entry(data, DEFINITION_SHA256, DEFINITION_SHA256, dict, where, required=False)


def _check_sizes(where: str, sizes: dict[str, Any], files: dict[str, Any]) -> None:
    """``EngineDirError`` unless every recorded size is a whole number of bytes of a file that ``files`` lists."""
    for name, size in sizes.items():
        if name not in files:
            raise EngineDirError(f"{where} records the size of {shown(name)}, which it lists no sha256 for; expected "
                                 f"sizes of the files it lists")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise EngineDirError(f"{where} records {shown(size)} as the size of {name}; expected a whole number of "
                                 f"bytes")


def _check_graph_tensors(where: str, name: str, graph: GraphEntry) -> None:
    """``EngineDirError`` unless graph ``name``'s entry lists the inputs the runtime gives it (by name, with LoRA
    slot inputs besides on the UNet graphs) and the outputs it reads, in its order."""
    inputs, outputs = GRAPH_TENSORS[name]
    given = [spec.name for spec in graph.inputs if not spec.name.startswith(LORA_INPUTS)]
    if sorted(given) != sorted(inputs):
        raise EngineDirError(f"{where}: graphs.{name} lists inputs {shown(given)}; expected {list(inputs)}, the "
                             f"inputs the runtime gives the {name} graph")
    read = [spec.name for spec in graph.outputs]
    if read != list(outputs) and not (name == "unet" and read == list(outputs[:1])):
        raise EngineDirError(f"{where}: graphs.{name} lists outputs {shown(read)}; expected {list(outputs)}, in that "
                             f"order, the outputs the runtime reads from the {name} graph")


def _check_model_against_shapes(where: str, manifest: "EngineManifest") -> None:
    """``EngineDirError`` where the model's numbers contradict the graphs' ranges and shapes: each image range must
    be ``latent_factor`` times its latent range (as ldm-export derives one from the other), the latents must have
    ``latent_channels``, and the context ``text_max_length`` tokens of ``context_dim`` values."""
    model, dims = manifest.model, manifest.dims
    factor = model.latent_factor
    for side in ("height", "width"):
        image, latent = dims.get(f"image_{side}"), dims.get(f"latent_{side}")
        if image is None or latent is None:
            continue
        derived = (image.min // factor, image.opt // factor, image.max // factor, image.multiple // factor)
        if (latent.min, latent.opt, latent.max, latent.multiple) != derived or image.multiple % factor:
            raise EngineDirError(f"{where}: dims.image_{side} ({image.describe()}) is not model.latent_factor "
                                 f"({factor}) times dims.latent_{side} ({latent.describe()}); expected the "
                                 f"model.latent_factor and ranges ldm-export wrote (re-export the engine)")
    expected = {"latents": {1: "latent_channels"}, "noise_pred": {1: "latent_channels"},
                "context": {1: "text_max_length", 2: "context_dim"}, "context_mask": {1: "text_max_length"},
                "input_ids": {1: "text_max_length"}, "attention_mask": {1: "text_max_length"}}
    for graph_name, graph in manifest.graphs.items():
        for spec in (*graph.inputs, *graph.outputs):
            axes = dict(expected.get(spec.name, {}))
            if graph_name in ("unet", SHALLOW_UNET_GRAPH) and spec.name == "latents":
                axes.pop(1)  # an inpainting UNet's latents carry more channels (checked above)
            if graph_name == "text_encoder" and spec.name == "context":
                axes = {2: "context_dim"}  # its length may be the text_length axis
            for axis, name in axes.items():
                found = spec.shape[axis] if axis < len(spec.shape) else None
                if isinstance(found, int) and found != getattr(model, name):
                    raise EngineDirError(f"{where}: {graph_name} tensor {spec.name} has shape "
                                         f"{shown(list(spec.shape))} but model.{name} is {getattr(model, name)}; "
                                         f"expected axis {axis} to be {getattr(model, name)} (re-export the engine)")


def canonical_json(value: Any) -> bytes:
    """``value`` (parsed JSON) as the bytes ``definition_sha256`` digests: sorted keys, no spaces, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def definition_digests(manifest: dict[str, Any]) -> dict[str, str]:
    """{part: sha256 of its canonical JSON} for each of ``DEFINITION_PARTS`` of a manifest object: what ldm-export
    records as ``definition_sha256``."""
    return {part: hashlib.sha256(canonical_json(manifest.get(part))).hexdigest() for part in DEFINITION_PARTS}


def _check_definition(where: str, data: dict[str, Any]) -> None:
    """``EngineDirError`` naming the first part of the model's definition whose sha256 is not the one
    ``definition_sha256`` records (a manifest without it, written before it was recorded, passes)."""
    recorded = data.get(DEFINITION_SHA256)
    if recorded is None:
        return
    missing = [part for part in DEFINITION_PARTS if part not in recorded]
    if missing:
        raise EngineDirError(f"{where}: {DEFINITION_SHA256} has no {missing[0]}; expected a sha256 for each of "
                             f"{', '.join(DEFINITION_PARTS)}")
    for part, digest in recorded.items():
        if not _is_sha256(digest):
            raise EngineDirError(f"{where}: {DEFINITION_SHA256}.{_key(part)} is {shown(digest)}; expected 64 hex "
                                 f"digits")
        if hashlib.sha256(canonical_json(data.get(part))).hexdigest() != digest.lower():
            raise EngineDirError(f"{where}: the manifest's {_key(part)} was edited after export (its sha256 is not "
                                 f"the one {DEFINITION_SHA256} records); expected the {_key(part)} ldm-export wrote: "
                                 f"restore it or re-export the engine")


def _is_sha256(digest: Any) -> bool:
    """Whether ``digest`` is 64 hex digits, in either case."""
    return isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdefABCDEF" for c in digest)


def _check_file_name(where: str, name: Any, digest: Any) -> None:
    """``EngineDirError`` unless ``name`` is a relative path that stays inside the engine dir (no absolute path,
    no ``..``, no part longer than a file system takes) and ``digest`` a hex sha256."""
    if not isinstance(name, str) or not name or "\\" in name:
        raise EngineDirError(f"{where} names the file {shown(name)}; expected a relative path inside the engine dir")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts or parts in ((), (".",)):
        raise EngineDirError(f"{where} names the file {shown(name)}, which is outside the engine dir; expected a "
                             f"relative path inside it")
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES for part in parts):
        raise EngineDirError(f"{where} names the file {shown(name)}; expected a relative path whose names are at "
                             f"most {MAX_FILE_NAME_BYTES} bytes each")
    if not _is_sha256(digest):
        raise EngineDirError(f"{where} records {shown(digest)} as the sha256 of {shown(name)}; expected 64 hex "
                             f"digits")


def load_manifest(engine_dir: str | Path) -> EngineManifest:
    """The manifest of ``engine_dir``; ``EngineDirError`` when the dir or its manifest is missing or invalid."""
    data = read_description(engine_dir, MANIFEST_JSON, "engine dir", EngineDirError, "write one with ldm-export")
    path = Path(engine_dir) / MANIFEST_JSON
    return EngineManifest.from_dict(data, where=str(path))


def verify_engine_files(engine_dir: str | Path, manifest: EngineManifest, graphs: tuple[str, ...] | None = None,
                        plans: bool = False) -> None:
    """Check the sha256 of every file the manifest lists for ``graphs`` (None: every graph it lists) and the
    tokenizer's, and the TensorRT plans' when ``plans``; ``EngineDirError`` naming the first file that is missing,
    is no regular file, cannot be read, or differs. A file whose size the manifest records is refused on its size
    before it is hashed."""
    folder = Path(engine_dir)
    expected: dict[str, tuple[str, int | None]] = {}
    for name in manifest.graphs if graphs is None else graphs:
        graph = manifest.graphs[name]
        expected.update({file: (digest, graph.sizes.get(file)) for file, digest in graph.files.items()})
    expected.update({f"{TOKENIZER_DIR}/{name}": (digest, manifest.tokenizer_sizes.get(name))
                     for name, digest in manifest.tokenizer_files.items()})
    if plans and manifest.tensorrt:
        expected.update({plan["file"]: (plan["sha256"], plan.get("size"))
                         for plan in manifest.tensorrt["plans"].values()})
    for relative, (digest, size) in expected.items():
        _verify_file(folder, relative, digest, size)


def _verify_file(folder: Path, relative: str, digest: str, size: int | None) -> None:
    """``EngineDirError`` unless ``folder/relative`` is a readable regular file inside ``folder`` of ``size`` bytes
    (where recorded) whose sha256 is ``digest``."""
    path = folder / relative
    shown_path = str(path) if len(str(path)) <= 200 else shown(str(path))
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
        if not inside:
            raise EngineDirError(f"{shown_path} leads outside the engine dir {folder} (a symlink); expected every "
                                 f"file the manifest names inside it")
        status = path.stat()
    except RuntimeError:  # a symlink loop, as Python 3.11's resolve() reports one
        raise EngineDirError(f"{shown_path} is a symlink loop; expected the file the manifest names") from None
    except FileNotFoundError:
        name = relative if len(relative) <= 60 else shown(relative)
        raise EngineDirError(f"engine dir {folder} is incomplete: {name} is missing") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise EngineDirError(f"{shown_path} is a symlink loop; expected the file the manifest names") from None
        raise EngineDirError(f"cannot read {shown_path} ({error.strerror or error}); expected a file this user can "
                             f"read") from None
    if not stat.S_ISREG(status.st_mode):
        raise EngineDirError(f"{shown_path} is {special_file_kind(status.st_mode)}, not a regular file; expected the "
                             f"file the manifest names")
    if size is not None and status.st_size != size:
        raise EngineDirError(f"{shown_path} is {status.st_size} bytes but {MANIFEST_JSON} records {size} (the file "
                             f"was changed or damaged after export; re-export the engine)")
    try:
        actual = sha256_file(path)
    except OSError as error:
        raise EngineDirError(f"cannot read {shown_path} ({error.strerror or error}); expected a file this user can "
                             f"read") from None
    if actual != digest.lower():
        raise EngineDirError(f"{shown_path} does not match the sha256 in {MANIFEST_JSON} (the file was changed or "
                             f"damaged after export; re-export the engine)")


def check_tensorrt_plans(manifest: EngineManifest, tensorrt_version: str, gpu_name: str,
                         compute_capability: str) -> None:
    """``EngineDirError`` when the engine's TensorRT plans were built for another TensorRT version or GPU
    (plans are not portable); the message says how to rebuild them from the engine's ONNX graphs."""
    built = manifest.tensorrt
    if not built:
        raise EngineDirError("the engine dir holds no TensorRT plans; export it with --backend tensorrt")
    here = {"tensorrt_version": tensorrt_version, "gpu_name": gpu_name, "compute_capability": compute_capability}
    for key, value in here.items():
        if built.get(key) != value:
            raise EngineDirError(
                f"the TensorRT plans were built for {key.replace('_', ' ')} {built.get(key)!r} but this machine has "
                f"{value!r}; rebuild them here with `ldm-export --rebuild-plans ENGINE_DIR`")
