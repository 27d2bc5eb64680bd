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
``LARGEST_IMAGE_SIDE`` long. Anything else is refused with ``EngineDirError`` naming the entry. The runtime reads
this module with numpy only.
"""

from __future__ import annotations

import dataclasses
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
from ldm_runtime.errors import EngineDirError, OutOfRangeError
from ldm_runtime.files import read_description, sha256_file

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
            raise ValueError(f"dimension range {values} is not valid; expected positive integers")
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"dimension range min {self.min}, opt {self.opt}, max {self.max} is not ordered")
        if any(v % self.multiple for v in (self.min, self.opt, self.max)):
            raise ValueError(f"dimension range {self.min}..{self.max} (opt {self.opt}) is not in multiples "
                             f"of {self.multiple}")

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
    """One ONNX graph: the file a session opens, every file it needs (with sha256), its precision, its tensors."""

    file: str
    files: dict[str, str]  # file name -> sha256 (the graph and any external-data file)
    precision: str  # "fp32" or "fp16" (fp16 graphs keep fp32 islands; see ldm_export/fp16.py)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. why a graph stayed fp32 in an fp16 engine

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GraphEntry":
        return cls(file=str(data["file"]), files=dict(data["files"]), precision=str(data["precision"]),
                   inputs=tuple(TensorSpec.from_dict(d) for d in data["inputs"]),
                   outputs=tuple(TensorSpec.from_dict(d) for d in data["outputs"]),
                   notes=dict(data.get("notes", {})))

    def check(self, where: str) -> None:
        """``EngineDirError`` unless every file lies inside the engine dir, ``file`` is among the digested
        ``files``, and the precision, dtypes and shapes are ones the runtime can use."""
        for name, digest in self.files.items():
            _check_file_name(where, name, digest)
        if self.file not in self.files:
            raise EngineDirError(f"{where} graph file {self.file!r} has no sha256 in 'files'; expected every file "
                                 f"a session opens to be listed there")
        if self.precision not in PRECISIONS:
            raise EngineDirError(f"{where} precision is {self.precision!r}; expected one of {PRECISIONS}")
        for spec in (*self.inputs, *self.outputs):
            if spec.dtype not in TENSOR_DTYPES:
                raise EngineDirError(f"{where} tensor {spec.name} has dtype {spec.dtype!r}; expected one of "
                                     f"{TENSOR_DTYPES}")
            for axis in spec.shape:
                named = isinstance(axis, str)
                sized = isinstance(axis, int) and not isinstance(axis, bool) and 1 <= axis <= LARGEST_IMAGE_SIDE
                if not (named or sized):
                    raise EngineDirError(f"{where} tensor {spec.name} has axis {axis!r}; expected an integer from 1 "
                                         f"to {LARGEST_IMAGE_SIDE} or the name of a 'dims' entry")

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "files": dict(self.files), "precision": self.precision,
                "inputs": [spec.to_dict() for spec in self.inputs],
                "outputs": [spec.to_dict() for spec in self.outputs], "notes": dict(self.notes)}


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
            raise EngineDirError(f"{where}: model.latent_factor is {self.latent_factor!r}; expected one of {factors}")
        if not isinstance(self.mask_padding, bool):
            raise EngineDirError(f"{where}: model.mask_padding is {self.mask_padding!r}; expected true or false")
        if not isinstance(self.inpainting, bool):
            raise EngineDirError(f"{where}: model.inpainting is {self.inpainting!r}; expected true or false")


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

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST_JSON) -> "EngineManifest":
        """Parse and check a manifest; ``EngineDirError`` naming the first bad entry."""
        try:
            version = data["format_version"]
            if isinstance(version, bool) or version != MANIFEST_FORMAT_VERSION:
                raise EngineDirError(f"{where} has format_version {version!r}; this runtime reads version "
                                     f"{MANIFEST_FORMAT_VERSION} (re-export the engine with this ldm-export)")
            manifest = cls(
                format_version=version,
                precision=data["precision"],
                backend=data["backend"],
                model=ModelInfo.from_dict(data["model"]),
                schedule=dict(data["schedule"]),
                sampler=dict(data.get("sampler", {})),  # engine dirs exported before it was recorded have none
                default_sampler=dict(data.get("default_sampler", {})),  # nor this
                dims={name: DimRange(**value) for name, value in data["dims"].items()},
                graphs={name: GraphEntry.from_dict(value) for name, value in data["graphs"].items()},
                tokenizer_files=dict(data["tokenizer"]["files"]),
                tensorrt=data.get("tensorrt"),
                raw=data,
            )
            schedule = config_from_dict(ScheduleConfig, manifest.schedule, "schedule")
            schedule.validate()
            sampler = config_from_dict(DDIMConfig, manifest.sampler, "sampler")
            defaults = SamplerDefaults.from_dict(manifest.default_sampler)
        except EngineDirError:
            raise
        except ConfigError as error:
            raise EngineDirError(f"{where} is not a valid engine manifest: {error}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise EngineDirError(f"{where} is not a valid engine manifest ({type(error).__name__}: {error})")
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
                raise EngineDirError(f"{where}: dims.{name}.max is {allowed.max}; expected at most {most}")
        for graph_name, graph in manifest.graphs.items():
            graph.check(f"{where}: {graph_name}")
        for name, digest in manifest.tokenizer_files.items():
            _check_file_name(f"{where}: tokenizer", name, digest)
        tensorrt = {} if manifest.tensorrt is None else manifest.tensorrt
        plans = tensorrt.get("plans", {}) if isinstance(tensorrt, dict) else None
        if not isinstance(plans, dict):
            raise EngineDirError(f"{where}: 'tensorrt' is {manifest.tensorrt!r}; expected an object with 'plans'")
        for name, plan in plans.items():
            if not isinstance(plan, dict):
                raise EngineDirError(f"{where}: tensorrt plan {name!r} is {plan!r}; expected an object")
            _check_file_name(f"{where}: tensorrt plan {name}", plan.get("file"), plan.get("sha256"))
        if manifest.precision not in PRECISIONS or manifest.backend not in BACKENDS:
            raise EngineDirError(f"{where} has precision {manifest.precision!r} and backend {manifest.backend!r}; "
                                 f"expected one of {PRECISIONS} and one of {BACKENDS}")
        missing = [name for name in GRAPH_NAMES if name not in manifest.graphs]
        if missing:
            raise EngineDirError(f"{where} lists no {', '.join(missing)} graph; expected all of {GRAPH_NAMES}")
        unknown = [name for name in manifest.graphs if name not in GRAPH_NAMES + OPTIONAL_GRAPH_NAMES]
        if unknown:
            raise EngineDirError(f"{where} lists graphs {unknown} the runtime does not know; expected "
                                 f"{', '.join(GRAPH_NAMES + OPTIONAL_GRAPH_NAMES)}")
        unet_outputs = [spec.name for spec in manifest.graphs["unet"].outputs]
        if SHALLOW_UNET_GRAPH in manifest.graphs and DEEP_FEATURES not in unet_outputs:
            raise EngineDirError(f"{where} lists a {SHALLOW_UNET_GRAPH} graph but its unet graph has no "
                                 f"{DEEP_FEATURES} output (outputs {unet_outputs}); re-export it")
        model = manifest.model
        channels = inpainting_channels(model.latent_channels) if model.inpainting else model.latent_channels
        for graph_name in ("unet", SHALLOW_UNET_GRAPH):
            graph = manifest.graphs.get(graph_name)
            latents = next((spec for spec in graph.inputs if spec.name == "latents"), None) if graph else None
            if latents is not None and latents.shape[1:2] != (channels,):
                raise EngineDirError(f"{where}: {graph_name} input latents has shape {list(latents.shape)} but "
                                     f"model.inpainting is {str(model.inpainting).lower()}; expected {channels} "
                                     f"channels")
        for graph_name, graph in manifest.graphs.items():
            for spec in (*graph.inputs, *graph.outputs):
                unknown = [axis for axis in spec.shape if isinstance(axis, str) and axis not in manifest.dims]
                if unknown:
                    raise EngineDirError(f"{where}: {graph_name} tensor {spec.name} names axes {unknown} that "
                                         f"'dims' does not define")
        if TEXT_LENGTH in manifest.dims:
            allowed = manifest.dims[TEXT_LENGTH]
            if not model.mask_padding or allowed.max != model.text_max_length:
                raise EngineDirError(f"{where}: dims.{TEXT_LENGTH} is {allowed.describe()} with model.mask_padding "
                                     f"{str(model.mask_padding).lower()}; expected it only where padding is masked, up "
                                     f"to model.text_max_length ({model.text_max_length})")
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


def _check_file_name(where: str, name: Any, digest: Any) -> None:
    """``EngineDirError`` unless ``name`` is a relative path that stays inside the engine dir (no absolute path,
    no ``..``) and ``digest`` a hex sha256."""
    if not isinstance(name, str) or not name or "\\" in name:
        raise EngineDirError(f"{where} names the file {name!r}; expected a relative path inside the engine dir")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts or parts in ((), (".",)):
        raise EngineDirError(f"{where} names the file {name!r}, which is outside the engine dir; expected a "
                             f"relative path inside it")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise EngineDirError(f"{where} records {digest!r} as the sha256 of {name}; expected 64 hex digits")


def load_manifest(engine_dir: str | Path) -> EngineManifest:
    """The manifest of ``engine_dir``; ``EngineDirError`` when the dir or its manifest is missing or invalid."""
    data = read_description(engine_dir, MANIFEST_JSON, "engine dir", EngineDirError, "write one with ldm-export")
    path = Path(engine_dir) / MANIFEST_JSON
    if not isinstance(data, dict):
        raise EngineDirError(f"{path} holds a {type(data).__name__}; expected an object")
    return EngineManifest.from_dict(data, where=str(path))


def verify_engine_files(engine_dir: str | Path, manifest: EngineManifest, graphs: tuple[str, ...] | None = None,
                        plans: bool = False) -> None:
    """Check the sha256 of every file the manifest lists for ``graphs`` (None: every graph it lists) and the
    tokenizer's, and the TensorRT plans' when ``plans``; ``EngineDirError`` naming the first file that is missing
    or differs."""
    folder = Path(engine_dir)
    expected: dict[str, str] = {}
    for name in manifest.graphs if graphs is None else graphs:
        expected.update(manifest.graphs[name].files)
    expected.update({f"{TOKENIZER_DIR}/{name}": digest for name, digest in manifest.tokenizer_files.items()})
    if plans and manifest.tensorrt:
        expected.update({plan["file"]: plan["sha256"] for plan in manifest.tensorrt["plans"].values()})
    for relative, digest in expected.items():
        path = folder / relative
        if not path.resolve().is_relative_to(folder.resolve()):
            raise EngineDirError(f"{path} leads outside the engine dir {folder} (a symlink); expected every file "
                                 f"the manifest names inside it")
        if not path.is_file():
            raise EngineDirError(f"engine dir {folder} is incomplete: {relative} is missing")
        if sha256_file(path) != digest:
            raise EngineDirError(f"{path} does not match the sha256 in {MANIFEST_JSON} (the file was changed or "
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
