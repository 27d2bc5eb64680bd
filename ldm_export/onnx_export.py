"""The ONNX graphs of an engine, exported from the eager modules with ``torch.onnx.export(dynamo=True)``.

    text_encoder  input_ids (B, L) int64, attention_mask (B, L) int64 (1 = token) -> context (B, L, D) float32
    unet          latents (B, C, h, w) float32 (an inpainting model's: (B, 2C + 1, h, w), the latents, the mask and
                  the masked image's latents), timesteps (B,) int64, context (B, L, D) float32,
                  context_mask (B, L) bool (True = token) -> noise_pred (B, C, h, w) float32,
                  deep_features (B, F, h, w) float32 (the hidden state entering the last up-block)
    unet_shallow  the unet's inputs and deep_features -> noise_pred: the UNet's shallow part alone, DeepCache's
                  cheap step (``UNet.forward_shallow``), holding only that part's weights
    vae_decoder   latents (B, C, h, w) float32 (unscaled) -> images (B, 3, H, W) float32 in [-1, 1]
    vae_encoder   images (B, 3, H, W) float32 in [-1, 1] -> latents (B, C, h, w) float32 (posterior mode, unscaled)

With ``lora_slots`` R (``ldm-export --lora-slots``), both UNet graphs also take, after their inputs, per-row LoRA
factors of every linear layer and 1x1 convolution they run: ``lora_down.<module>`` (B, R, in) and
``lora_up.<module>`` (B, out, R), scales folded in (``SlotUNet``; the manifest's ``lora_slots`` lists them).

B, h, w, H and W are dynamic within the export's ranges (``dims``). L, the text length, is the tokenizer's
``max_length`` in the UNet graphs; the text encoder of a model that masks padding (``mask_padding``: the UNet
attends to a prompt's own tokens only) takes any L from ``TEXT_LENGTH_STEP`` up to it (the ``text_length`` axis),
so that an engine encodes a short prompt at a length near its own instead of padding it to the longest. The
kernels dispatch is forced to its PyTorch reference while tracing, so the graphs hold standard ONNX ops.
The dynamo exporter handles every graph here (HF BERT included), so the TorchScript exporter is not used.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import onnx
import torch
from torch import nn
from torch.export import Dim

from ldm_runtime.checkpoint import CheckpointNetworks
from ldm_runtime.engines.torch_adapters import RowLora, is_pointwise
from ldm_runtime.manifest import (DEEP_FEATURES, SHALLOW_UNET_GRAPH, TEXT_LENGTH, DimRange, TensorSpec,
                                  text_length_range)
from ldm_runtime.models.unet import DeepFeaturesUNet, ShallowUNet, deep_feature_channels

# ONNX protobufs cannot exceed 2 GiB; past this many bytes of weights they go to a "<graph>.onnx.data" file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


class DecoderGraph(nn.Module):
    """Unscaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) (VQ models quantise first)."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents)


class EncoderGraph(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> the posterior mode (B, C, H/f, W/f), unscaled."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(images).mode()


class SlotUNet(nn.Module):
    """A UNet graph (``DeepFeaturesUNet`` or ``ShallowUNet`` of ``unet``) that takes, after its own ``inputs``
    inputs, (down, up) of every module in ``modules`` (names in ``unet``) and adds their change row by row."""

    def __init__(self, graph: nn.Module, unet: nn.Module, inputs: int, modules: list[str]):
        super().__init__()
        # not "graph": an FX GraphModule's own attribute, which the exporter's decomposition would shadow
        self.unet_graph, self.inputs, self.modules_adapted = graph, inputs, modules
        self.lora = RowLora(unet, [f"{name}.weight" for name in modules])

    def forward(self, *tensors: torch.Tensor):
        own, factors = tensors[:self.inputs], tensors[self.inputs:]
        with self.lora.rows({f"{name}.weight": (factors[2 * index], factors[2 * index + 1])
                             for index, name in enumerate(self.modules_adapted)}):
            return self.unet_graph(*own)


def slot_modules(unet: nn.Module, graph: nn.Module, example: tuple[torch.Tensor, ...]) -> list[str]:
    """The linear layers and 1x1 convolutions of ``unet`` that ``graph`` runs on ``example``, in call order."""
    called: list[str] = []
    names = {module: name for name, module in unet.named_modules() if is_pointwise(module)}
    handles = [module.register_forward_hook(lambda module, *_: called.append(names[module])) for module in names]
    try:
        with torch.no_grad():
            graph(*example)
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(called))


def lora_slot_specs(unet: nn.Module, modules: list[str], rank: int) -> tuple[TensorSpec, ...]:
    """The ``lora_down.*`` / ``lora_up.*`` inputs of ``modules``, pairwise."""
    specs = []
    for name in modules:
        weight = unet.get_submodule(name).weight
        specs += [TensorSpec(f"lora_down.{name}", "float32", ("batch", rank, weight.shape[1])),
                  TensorSpec(f"lora_up.{name}", "float32", ("batch", weight.shape[0], rank))]
    return tuple(specs)


def lora_slots_record(modules: CheckpointNetworks, specs: dict[str, "GraphSpec"], rank: int) -> dict:
    """The manifest's ``lora_slots``: the rank and {module: [in, out]} of every slot of the specs' graphs."""
    names = [name for spec in specs.values() if isinstance(spec.module, SlotUNet)
             for name in spec.module.modules_adapted]
    sizes = {}
    for name in dict.fromkeys(names):
        weight = modules.unet.get_submodule(name).weight
        sizes[name] = [int(weight.shape[1]), int(weight.shape[0])]
    return {"rank": rank, "modules": sizes}


@dataclass(frozen=True)
class GraphSpec:
    """One graph: the module that computes it and its named inputs / outputs (float dtypes as exported)."""

    name: str
    module: nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def export_dims(modules: CheckpointNetworks, batch: DimRange, image_size: DimRange) -> dict[str, DimRange]:
    """Every named axis of the graphs: the batch, the image sides and the latent sides they imply, and the text
    encoder's length where the model masks padding (``text_length_range``)."""
    factor = modules.config.autoencoder.factor
    latent = DimRange(image_size.min // factor, image_size.opt // factor, image_size.max // factor,
                      image_size.multiple // factor)
    dims = {"batch": batch, "image_height": image_size, "image_width": image_size,
            "latent_height": latent, "latent_width": latent}
    text_length = text_length_range(modules.config.text_encoder.max_length, modules.config.text_encoder.mask_padding)
    if text_length is not None:
        dims[TEXT_LENGTH] = text_length
    return dims


def graph_specs(modules: CheckpointNetworks, lora_slots: int | None = None) -> dict[str, GraphSpec]:
    """The graphs of an engine, by name, in export order; ``lora_slots``: the rank of the UNet graphs' per-row LoRA
    inputs (None: none)."""
    config = modules.config
    channels = config.autoencoder.latent_channels
    length = config.text_encoder.max_length
    width = config.unet.context_dim
    latent_shape = ("batch", channels, "latent_height", "latent_width")
    # an inpainting UNet's latents carry the mask and the masked image's latents after them (2C + 1 channels)
    unet_latent_shape = ("batch", config.unet.in_channels, "latent_height", "latent_width")
    image_shape = ("batch", 3, "image_height", "image_width")
    context = TensorSpec("context", "float32", ("batch", length, width))
    text_length = TEXT_LENGTH if text_length_range(length, config.text_encoder.mask_padding) else length
    unet_inputs = (TensorSpec("latents", "float32", unet_latent_shape), TensorSpec("timesteps", "int64", ("batch",)),
                   context, TensorSpec("context_mask", "bool", ("batch", length)))
    deep_features = TensorSpec(DEEP_FEATURES, "float32",
                               ("batch", deep_feature_channels(config.unet), "latent_height", "latent_width"))
    specs = {
        "text_encoder": GraphSpec(
            "text_encoder", modules.text_encoder,
            (TensorSpec("input_ids", "int64", ("batch", text_length)),
             TensorSpec("attention_mask", "int64", ("batch", text_length))),
            (TensorSpec("context", "float32", ("batch", text_length, width)),)),
        "unet": GraphSpec(
            "unet", DeepFeaturesUNet(modules.unet).eval(), unet_inputs,
            (TensorSpec("noise_pred", "float32", latent_shape), deep_features)),
        SHALLOW_UNET_GRAPH: GraphSpec(
            SHALLOW_UNET_GRAPH, ShallowUNet(modules.unet).eval(), (*unet_inputs, deep_features),
            (TensorSpec("noise_pred", "float32", latent_shape),)),
        "vae_decoder": GraphSpec(
            "vae_decoder", DecoderGraph(modules.autoencoder).eval(),
            (TensorSpec("latents", "float32", latent_shape),), (TensorSpec("images", "float32", image_shape),)),
        "vae_encoder": GraphSpec(
            "vae_encoder", EncoderGraph(modules.autoencoder).eval(),
            (TensorSpec("images", "float32", image_shape),), (TensorSpec("latents", "float32", latent_shape),)),
    }
    if lora_slots is None:
        return specs
    sizes = {"batch": 2, "latent_height": 2 ** len(config.unet.channel_mult), "latent_width": 0}
    sizes["latent_width"] = sizes["latent_height"]
    for name in ("unet", SHALLOW_UNET_GRAPH):
        spec = specs[name]
        example = tuple(random_inputs(spec, modules, sizes, torch.Generator().manual_seed(0)).values())
        adapted = slot_modules(modules.unet, spec.module, example)
        specs[name] = dataclasses.replace(
            spec, module=SlotUNet(spec.module, modules.unet, len(spec.inputs), adapted).eval(),
            inputs=spec.inputs + lora_slot_specs(modules.unet, adapted, lora_slots))
    return specs


def random_inputs(spec: GraphSpec, modules: CheckpointNetworks, sizes: dict[str, int],
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fresh random inputs for ``spec`` at the axis sizes ``sizes`` ({"batch": 2, "latent_height": 8, ...}),
    each in the range the graph sees in use: token ids below the vocabulary size, masks with at least one
    token, timesteps in 0..T-1, Gaussian latents at the autoencoder's scale, images in [-1, 1]."""
    config = modules.config
    tensors = {}
    for tensor in spec.inputs:
        shape = tuple(sizes[axis] if isinstance(axis, str) else axis for axis in tensor.shape)
        if tensor.name == "input_ids":
            vocab = modules.text_encoder.model.config.vocab_size
            tensors[tensor.name] = torch.randint(0, vocab, shape, generator=generator)
        elif tensor.name in ("attention_mask", "context_mask"):
            lengths = torch.randint(1, shape[1] + 1, (shape[0], 1), generator=generator)
            mask = torch.arange(shape[1])[None, :] < lengths
            tensors[tensor.name] = mask.long() if tensor.dtype == "int64" else mask
        elif tensor.name == "timesteps":
            tensors[tensor.name] = torch.randint(0, config.schedule.num_train_timesteps, shape, generator=generator)
        elif tensor.name == "images":
            tensors[tensor.name] = torch.rand(shape, generator=generator) * 2 - 1
        elif tensor.name == "latents" and spec.name == "vae_decoder":
            tensors[tensor.name] = torch.randn(shape, generator=generator) / config.latent_scale_factor
        elif tensor.name.startswith("lora_"):  # a LoRA's size: down ~ 1/sqrt(in), the change a fraction of W x
            fan_in = shape[2] if tensor.name.startswith("lora_down.") else shape[2] * 16
            tensors[tensor.name] = torch.randn(shape, generator=generator) / fan_in ** 0.5
        else:
            tensors[tensor.name] = torch.randn(shape, generator=generator)
    return tensors


def tracing_sizes(dims: dict[str, DimRange]) -> dict[str, int]:
    """Axis sizes for the example inputs the exporter traces with: inside each range and, for a dynamic
    axis, at least twice its multiple (torch.export specialises axes of size 0 and 1)."""
    sizes = {}
    for name, allowed in dims.items():
        candidates = range(allowed.opt, allowed.max + 1, allowed.multiple)
        sizes[name] = next((v for v in candidates if v // allowed.multiple >= 2), allowed.opt)
    return sizes


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Route ldm_kernels.dispatch to the plain PyTorch references (standard ONNX ops) for the duration."""
    previous = os.environ.get("LDM_KERNELS")
    os.environ["LDM_KERNELS"] = "reference"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("LDM_KERNELS", None)
        else:
            os.environ["LDM_KERNELS"] = previous


def _dynamic_shapes(spec: GraphSpec, dims: dict[str, DimRange]) -> dict[str, dict[int, object]]:
    """torch.export dynamic shapes: one shared Dim per axis name; an axis that must divide by m becomes
    ``m * Dim``; an axis whose range is a single value stays static."""
    symbols: dict[str, object] = {}
    for name, allowed in dims.items():
        if allowed.min == allowed.max:
            continue
        units = Dim(f"{name}_units", min=allowed.min // allowed.multiple, max=allowed.max // allowed.multiple)
        symbols[name] = units if allowed.multiple == 1 else allowed.multiple * units
    return {tensor.name: {axis: symbols[size] for axis, size in enumerate(tensor.shape) if size in symbols}
            for tensor in spec.inputs}


def export_graph(spec: GraphSpec, modules: CheckpointNetworks, dims: dict[str, DimRange],
                 opset: int | None) -> onnx.ModelProto:
    """Trace ``spec.module`` with torch.export and translate it to ONNX (fp32, the exporter's optimiser on)."""
    generator = torch.Generator().manual_seed(0)
    example = random_inputs(spec, modules, tracing_sizes(dims), generator)
    with reference_kernels(), _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            spec.module, tuple(example.values()), None, dynamo=True, opset_version=opset,
            dynamic_shapes=_dynamic_shapes(spec, dims) if not isinstance(spec.module, SlotUNet)
            else (tuple(_dynamic_shapes(spec, dims).values()),),  # the one *tensors argument
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            # The exporter's optimiser (constant folding, dead code, redundant reshapes) stays on: on the shapes
            # UNet it cuts 2071 nodes to 830 and onnxruntime's session load from 1.6 s to 1.0 s; step time is
            # unchanged within noise (1 CPU thread: 41 vs 46 ms at batch 1, 192 vs 197 ms at batch 8).
            optimize=True, verbose=False,
        )
    model = program.model_proto
    names = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    assert names == ([t.name for t in spec.inputs], [t.name for t in spec.outputs]), names
    return model


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter warns about missing torchvision ops, deprecations and constants it cannot fold, and prints
    progress: none of it is actionable for an ldm-export user, so the CLI output stays readable."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def opset_of(model: onnx.ModelProto) -> int:
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def save_onnx(model: onnx.ModelProto, path: Path) -> list[str]:
    """Write ``model`` to ``path`` (weights to ``<name>.data`` beside it when over the protobuf limit) and
    return the names of the files written."""
    weight_bytes = sum(len(tensor.raw_data) for tensor in model.graph.initializer)
    if weight_bytes <= EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
        return [path.name]
    data_name = f"{path.name}.data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return [path.name, data_name]


@dataclass(frozen=True)
class WrittenGraph:
    """What the manifest needs of a graph once it is on disk; the graph itself is let go (GiBs at SD's size, which
    the validation that follows needs for the eager model and the new graphs' sessions)."""

    files: list[str]
    input_dtypes: list[str]  # numpy dtype names, in input order
    output_dtypes: list[str]
    opset: int


def graph_io_dtypes(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """numpy dtype names of the graph's inputs and outputs, in order."""
    names = [[onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name for v in values]
             for values in (model.graph.input, model.graph.output)]
    return names[0], names[1]


def release_freed_memory() -> None:
    """Hand the heap pages freed so far back to the system (glibc's malloc_trim; nothing elsewhere): exporting a
    graph frees GiBs of small and mid-sized blocks that would otherwise stay resident through the rest of the export."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc, or no process-wide symbol lookup (Windows)
        pass


def export_all(specs: dict[str, GraphSpec], modules: CheckpointNetworks, dims: dict[str, DimRange],
               opset: int | None, convert: Callable[[str, onnx.ModelProto], onnx.ModelProto],
               folder: Path, log: Callable[[str], None]) -> dict[str, WrittenGraph]:
    """Export every graph, pass it through ``convert(name, model)`` (axis names, fp16), write it into
    ``folder``; returns {name: what was written}, one graph in memory at a time."""
    written = {}
    for name, spec in specs.items():
        started = time.perf_counter()
        model = convert(name, export_graph(spec, modules, dims, opset))
        files = save_onnx(model, folder / spec.file)
        written[name] = WrittenGraph(files, *graph_io_dtypes(model), opset=opset_of(model))
        del model
        release_freed_memory()
        log(f"exported {spec.file} ({time.perf_counter() - started:.1f} s)")
    return written
