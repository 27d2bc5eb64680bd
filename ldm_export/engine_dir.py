"""Writing an engine dir: checkpoint -> ONNX graphs (-> fp16) -> tokenizer -> manifest -> validation
(-> TensorRT plans), all into a temporary folder beside --out that is renamed into place only when every
step succeeded. A failure or an interrupt at any step removes the temporary folder: --out is either the
complete new engine, or what it was before (nothing, or the old engine when --force was not yet applied).
A kill runs no cleanup: the next export of the same --out removes what a killed one left (ldm_runtime.staging).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable

import onnx
import torch

from ldm_export.errors import ExportError, ValidationFailedError
from ldm_export.fp16 import convert_to_fp16, decoder_activation_peak, decoder_needs_fp32
from ldm_export.manifest import build_manifest
from ldm_export.onnx_export import (
    DecoderGraph,
    export_all,
    export_dims,
    graph_specs,
    lora_slots_record,
)
from ldm_export.out_folder import check_out
from ldm_export.options import DEFAULT_BATCH_RANGE, MAX_VALIDATION_SEED, ExportOptions
from ldm_export.source import checkpoint_digest, load_checkpoint_to_export
from ldm_export.tensorrt_build import build_plans, tensorrt_missing
from ldm_export.validate import validate_engine
from ldm_runtime.adapters import MAX_ADAPTER_RANK, MAX_REQUEST_ADAPTERS
from ldm_runtime.checkpoint import TOKENIZER_DIR, CheckpointNetworks
from ldm_runtime.engines.torch_engine import TorchEngine
from ldm_runtime.files import sha256_file
from ldm_runtime.guidance import UNET_ROWS_PER_IMAGE
from ldm_runtime.config import LARGEST_IMAGE_SIDE
from ldm_runtime.manifest import (
    BACKENDS,
    MANIFEST_JSON,
    MAX_BATCH_ROWS,
    PRECISIONS,
    DimRange,
    GraphEntry,
    TensorSpec,
    load_manifest,
)
from ldm_runtime.folder_swap import replace_folder
from ldm_runtime.previews import PREVIEW_FILE, LatentPreview, load_latent_preview, write_fitted_preview
from ldm_runtime.staging import current_umask, temporary_folder

def default_backend() -> str:
    """tensorrt where it imports and a CUDA GPU is visible, else onnxruntime."""
    return "tensorrt" if tensorrt_missing() is None else "onnxruntime"


def check_options(options: ExportOptions) -> None:
    """``ExportError`` naming the first option that cannot work (before any slow step)."""
    if options.precision not in PRECISIONS:
        raise ExportError(f"--engine {options.precision!r} is not one of {', '.join(PRECISIONS)}")
    if options.backend is not None and options.backend not in BACKENDS:
        raise ExportError(f"--backend {options.backend!r} is not one of {', '.join(BACKENDS)}")
    if options.backend == "tensorrt":
        missing = tensorrt_missing()
        if missing:
            raise ExportError(missing)
    if options.fp32_io and options.precision != "fp16":
        raise ExportError("--fp32-io applies to --engine fp16 only (fp32 graphs already take and give float32)")
    low, opt, high = options.batch_range or DEFAULT_BATCH_RANGE
    if not 1 <= low <= opt <= high:
        raise ExportError(f"--batch-range {low}:{opt}:{high} is not valid; expected 1 <= MIN <= OPT <= MAX")
    if high < UNET_ROWS_PER_IMAGE:
        raise ExportError(f"--batch-range {low}:{opt}:{high} has MAX {high}; expected at least {UNET_ROWS_PER_IMAGE} "
                          f"(classifier-free guidance runs {UNET_ROWS_PER_IMAGE} UNet rows per image)")
    if high > MAX_BATCH_ROWS:  # the runtime refuses an engine dir past it: say so before the export, not after
        raise ExportError(f"--batch-range {low}:{opt}:{high} has MAX {high}; expected at most {MAX_BATCH_ROWS} UNet "
                          f"rows, the most an engine dir may hold")
    if options.size_range is not None and options.size_range[1] > LARGEST_IMAGE_SIDE:
        smallest, largest = options.size_range
        raise ExportError(f"--size-range {smallest}:{largest} has MAX {largest}; expected at most {LARGEST_IMAGE_SIDE} "
                          f"pixels, the largest side an engine dir may hold")
    slots = options.lora_slots
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int)
                              or not 1 <= slots <= MAX_ADAPTER_RANK * MAX_REQUEST_ADAPTERS):
        raise ExportError(f"--lora-slots is {slots!r}; expected a rank from 1 to "
                          f"{MAX_ADAPTER_RANK * MAX_REQUEST_ADAPTERS} (the summed ranks a request may name)")
    if slots is not None and options.backend == "tensorrt":
        raise ExportError("--lora-slots applies to --backend onnxruntime; expected no --lora-slots for tensorrt")
    seed = options.validation_seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed <= MAX_VALIDATION_SEED):
        raise ExportError(f"--validation-seed is {seed!r}; expected an integer from 0 to 2**32 - 1")
    if options.opset is not None and not 18 <= options.opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"--opset {options.opset} is not supported; expected 18 (the dynamo exporter's lowest) "
                          f"to {onnx.defs.onnx_opset_version()} (this onnx package's highest)")


def resolve_dims(modules: CheckpointNetworks, options: ExportOptions) -> dict[str, DimRange]:
    """The named axis ranges of the export; ``ExportError`` for a range that does not fit the model."""
    low, opt, high = options.batch_range or DEFAULT_BATCH_RANGE  # checked by check_options
    image_size = modules.config.image_size
    multiple = modules.config.image_size_multiple
    smallest, largest = options.size_range or (image_size, modules.config.max_image_size)
    if smallest % multiple or largest % multiple or not multiple <= smallest <= largest:
        raise ExportError(f"--size-range {smallest}:{largest} is not valid; expected MIN <= MAX, both multiples of "
                          f"{multiple} (the autoencoder's factor times the UNet's downsampling)")
    if not smallest <= image_size <= largest:
        raise ExportError(f"--size-range {smallest}:{largest} leaves out the model's image size {image_size}; "
                          f"expected a range that contains it")
    return export_dims(modules, DimRange(low, opt, high), DimRange(smallest, image_size, largest, multiple))


def _copy_tokenizer(modules: CheckpointNetworks, folder: Path) -> dict[str, str]:
    """Copy the checkpoint's tokenizer files; write tokenizer.json from the loaded fast tokenizer when the
    checkpoint has none (the runtime reads tokenizer.json with the ``tokenizers`` library only)."""
    target = folder / TOKENIZER_DIR
    target.mkdir()
    for source in sorted((modules.folder / TOKENIZER_DIR).iterdir()):
        if source.is_file():
            shutil.copyfile(source, target / source.name)
    if not (target / "tokenizer.json").is_file():
        tokenizer = modules.text_encoder.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise ExportError(f"the tokenizer of {modules.folder} has no tokenizer.json and no fast version; the "
                              f"runtime needs a Hugging Face tokenizers file")
        tokenizer.backend_tokenizer.save(str(target / "tokenizer.json"))
    return {path.name: sha256_file(path) for path in sorted(target.iterdir())}


def _name_axes(model: onnx.ModelProto, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
    """Name the graph's dynamic axes as the manifest does ("batch", "latent_height", ...)."""
    for value, spec in zip([*model.graph.input, *model.graph.output], [*inputs, *outputs]):
        for dim, axis in zip(value.type.tensor_type.shape.dim, spec.shape):
            if isinstance(axis, str) and not dim.HasField("dim_value"):
                dim.dim_param = axis


def export_engine(checkpoint_dir: str | Path, out: str | Path, options: ExportOptions,
                  log: Callable[[str], None] = lambda line: None,
                  show_report: Callable[[str], None] = lambda table: None) -> Path:
    """Export checkpoint dir ``checkpoint_dir`` to engine dir ``out``; returns ``out``.

    Raises ``CheckpointError`` (bad checkpoint), ``ExportError`` (bad option, existing --out, missing tool)
    or ``ValidationFailedError`` (graphs off the eager model; the report went to ``show_report`` first).
    """
    out = Path(out)
    if options.backend is None:
        options = dataclasses.replace(options, backend=default_backend())
    check_options(options)
    check_out(out, options.force)
    started = time.perf_counter()
    modules = load_checkpoint_to_export(checkpoint_dir)
    config = modules.config
    stored_preview = load_latent_preview(modules.folder, config.autoencoder.latent_channels, config.autoencoder.factor)
    checkpoint_sha256, checkpoint_files = checkpoint_digest(modules.folder, modules.config)
    dims = resolve_dims(modules, options)
    specs = graph_specs(modules, options.lora_slots)
    precision_of = {name: options.precision for name in specs}
    notes: dict[str, dict] = {name: {} for name in specs}
    if options.precision == "fp16":
        peak = decoder_activation_peak(DecoderGraph(modules.autoencoder).eval(), _typical_latents(modules, dims))
        notes["vae_decoder"]["activation_peak"] = peak
        if decoder_needs_fp32(peak):
            precision_of["vae_decoder"] = "fp32"
            notes["vae_decoder"]["kept_fp32_because"] = f"activations reach {peak:.0f}, past the fp16 margin"
    log(f"loaded {modules.folder} ({time.perf_counter() - started:.1f} s)")

    def convert(name: str, model: onnx.ModelProto) -> onnx.ModelProto:
        _name_axes(model, specs[name].inputs, specs[name].outputs)
        if precision_of[name] == "fp16":
            fp32_attention = name == "unet" and modules.config.unet.upcast_attention
            model = convert_to_fp16(model, keep_io_types=options.fp32_io, fp32_attention=fp32_attention)
            if fp32_attention:
                notes[name]["fp32_attention"] = "upcast_attention: attention scores, softmax and values in fp32"
        return model

    with temporary_folder(out) as staging:  # also removes what killed exports of --out left beside it
        written = export_all(specs, modules, dims, options.opset, convert, staging, log)
        graphs = {}
        for name, graph in written.items():
            spec = specs[name]
            graphs[name] = GraphEntry(
                file=spec.file, files={file: sha256_file(staging / file) for file in graph.files},
                sizes={file: (staging / file).stat().st_size for file in graph.files},
                precision=precision_of[name],
                inputs=tuple(TensorSpec(t.name, dtype, t.shape)
                             for t, dtype in zip(spec.inputs, graph.input_dtypes)),
                outputs=tuple(TensorSpec(t.name, dtype, t.shape)
                              for t, dtype in zip(spec.outputs, graph.output_dtypes)),
                notes=notes[name])
        io_dtype = "float16" if options.precision == "fp16" and not options.fp32_io else "float32"
        tokenizer_files = _copy_tokenizer(modules, staging)
        manifest = build_manifest(
            modules=modules, precision=options.precision, backend=options.backend, io_dtype=io_dtype,
            opset=written["unet"].opset, dims=dims, graphs=graphs,
            tokenizer_files=tokenizer_files, checkpoint_sha256=checkpoint_sha256,
            checkpoint_files=checkpoint_files, validation=None, tensorrt=None,
            tokenizer_sizes={name: (staging / TOKENIZER_DIR / name).stat().st_size for name in tokenizer_files})
        if options.lora_slots is not None:
            manifest["lora_slots"] = lora_slots_record(modules, specs, options.lora_slots)
        _write_manifest(staging, manifest)
        load_manifest(staging)  # what the runtime will read must parse

        if options.skip_validation:
            manifest["validation"] = {"skipped": True}
        else:
            seed = options.validation_seed if options.validation_seed is not None else secrets.randbelow(2**31)
            log("validating against the eager PyTorch model")
            report = validate_engine(staging, specs, modules, dims, precision_of, options.precision, seed)
            show_report(report.table())
            if not report.passed:
                raise ValidationFailedError(f"validation failed ({'; '.join(report.failures())}); nothing was "
                                            f"written to {out}")
            manifest["validation"] = report.to_dict()
        if options.backend == "tensorrt":
            manifest["tensorrt"] = build_plans(staging, manifest, log)
        _write_manifest(staging, manifest)
        log(_write_preview(modules, stored_preview, staging))
        _move_into_place(staging, out, options.force)
    log(f"wrote {out} ({time.perf_counter() - started:.1f} s)")
    return out


def _write_preview(modules: CheckpointNetworks, stored: LatentPreview | None, folder: Path) -> str:
    """The checkpoint's latent preview map (``stored``, checked as the export began) copied into ``folder``, or one
    fitted now on the eager model; returns a line saying which."""
    if stored is None:
        return write_fitted_preview(TorchEngine(modules, device="cpu"), folder)
    shutil.copyfile(modules.folder / PREVIEW_FILE, folder / PREVIEW_FILE)
    return f"copied {modules.folder / PREVIEW_FILE}"


def _typical_latents(modules: CheckpointNetworks, dims: dict[str, DimRange]) -> torch.Tensor:
    """Unscaled latents with the training latents' spread (latent_scale_factor = 1 / their std), at opt size."""
    generator = torch.Generator().manual_seed(0)
    shape = (1, modules.config.autoencoder.latent_channels, dims["latent_height"].opt, dims["latent_width"].opt)
    return torch.randn(shape, generator=generator) / modules.config.latent_scale_factor


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST_JSON).write_text(json.dumps(manifest, indent=2) + "\n")


def _move_into_place(staging: Path, out: Path, force: bool) -> None:
    """Put the finished staging folder at ``out`` in one step; an old engine dir there (--force) is deleted only
    after the new one is in place (``replace_folder``, as a checkpoint save does)."""
    check_out(out, force)  # --out may have appeared while the export ran
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp made it private; an engine dir is read by servers too
    replace_folder(staging, out)
