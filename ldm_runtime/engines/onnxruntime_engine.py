"""The onnxruntime engine: the ONNX graphs of an engine dir written by ``ldm-export``, on numpy arrays.

Imports numpy, onnxruntime and the ``tokenizers`` library only (never torch or the training code), so an
engine dir is served on a machine without them. Engine arrays are host numpy float32 arrays whatever the
graphs' precision: each call casts its inputs to the dtypes the manifest lists for the graph (fp16 for an
fp16 engine without ``--fp32-io``) and returns float32, so the sampler's arithmetic runs in float32.

On CUDA (onnxruntime-gpu with a visible GPU) every call goes through IO binding: inputs are copied to the
device once, outputs are allocated there by onnxruntime and copied back once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_errors

from ldm_runtime.engines.base import EngineInfo
from ldm_runtime.errors import EngineLoadError
from ldm_runtime.manifest import (
    TOKENIZER_DIR,
    EngineDirError,
    EngineManifest,
    load_manifest,
    verify_engine_files,
)

# onnxruntime's load-time graph optimisation. "all" is the default: on the shapes UNet (1 CPU thread, fastest
# of 15 interleaved calls) it takes batch 1 from 6.6 ms ("disable") to 5.9 ms; at batch 8 all levels are
# within 3% (34.4-36.0 ms), as the exporter has already folded constants and removed dead nodes.
GRAPH_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
CPU = "CPUExecutionProvider"
SESSION_LOAD_ERRORS = (_ort_errors.Fail, _ort_errors.InvalidGraph, _ort_errors.InvalidProtobuf, _ort_errors.NoSuchFile,
                       _ort_errors.InvalidArgument, _ort_errors.NotImplemented, RuntimeError)
CUDA = "CUDAExecutionProvider"


class OnnxRuntimeEngine:
    """An engine dir's four graphs in onnxruntime sessions, behind the Engine protocol (numpy arrays).

    providers: onnxruntime execution providers; None picks from ``device`` ("auto": CUDA when onnxruntime-gpu
    sees a GPU, else the CPU; "cpu"; "cuda" / "cuda:N"). intra_op_threads: threads per graph (None:
    onnxruntime's default, one per core). graph_optimization_level: "disable", "basic", "extended" or "all"
    (the level onnxruntime optimises each graph at when it loads it). verify: check every graph's and the
    tokenizer's sha256 against the manifest first (``EngineDirError`` naming the file that differs).
    Batches and image sizes outside the exported ranges raise ``OutOfRangeError`` naming the allowed range.
    """

    def __init__(self, engine_dir: str | Path, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None, graph_optimization_level: str = "all", verify: bool = True,
                 device: str = "auto"):
        self.engine_dir = Path(engine_dir)
        self.manifest: EngineManifest = load_manifest(self.engine_dir)
        if verify:
            verify_engine_files(self.engine_dir, self.manifest)
        if graph_optimization_level not in GRAPH_OPTIMIZATION_LEVELS:
            raise ValueError(f"graph_optimization_level {graph_optimization_level!r} is not one of "
                             f"{', '.join(GRAPH_OPTIMIZATION_LEVELS)}")
        if intra_op_threads is not None and (isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int)
                                             or intra_op_threads < 1):
            raise ValueError(f"intra_op_threads is {intra_op_threads!r}; expected a positive integer or None")
        self.providers, self.device_id = _resolve_providers(providers, device)
        options = ort.SessionOptions()
        options.graph_optimization_level = GRAPH_OPTIMIZATION_LEVELS[graph_optimization_level]
        options.log_severity_level = 3  # errors only: onnxruntime warns about every Cast it cannot fold
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        self.sessions: dict[str, ort.InferenceSession] = {}
        for name, graph in self.manifest.graphs.items():
            path = self.engine_dir / graph.file
            try:
                self.sessions[name] = ort.InferenceSession(str(path), options, providers=self.providers)
            except SESSION_LOAD_ERRORS as error:
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise EngineDirError(f"onnxruntime cannot load {path} ({first_line})") from None
        self.use_io_binding = CUDA in self.sessions["unet"].get_providers()
        self.tokenizer = _load_tokenizer(self.engine_dir / TOKENIZER_DIR, self.manifest.model.text_max_length)

        model = self.manifest.model
        image = self.manifest.image_size
        self.info = EngineInfo(
            name="onnxruntime",
            latent_channels=model.latent_channels,
            latent_factor=model.latent_factor,
            latent_scale_factor=float(model.latent_scale_factor),
            image_size=model.image_size,
            min_image_size=image.min,
            max_image_size=image.max,
            image_size_multiple=image.multiple,
            max_batch_size=self.manifest.batch.max,
            text_max_length=model.text_max_length,
            schedule=dict(self.manifest.schedule),
            sampler=dict(self.manifest.sampler),
        )

    # --- the Engine protocol -------------------------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """B prompts -> (context (B, L, D) float32, context_mask (B, L) bool: True = real token)."""
        if isinstance(prompts, str):
            raise TypeError(f"prompts is the string {prompts!r}; expected a list of strings")
        self.manifest.check_batch(len(prompts), "text encoder batch")
        input_ids, attention_mask = self.tokenize(list(prompts))
        (context,) = self.run("text_encoder", {"input_ids": input_ids, "attention_mask": attention_mask})
        if not self.manifest.model.mask_padding:
            return context, np.ones(attention_mask.shape, dtype=bool)
        return context, attention_mask.astype(bool)

    def unet(self, latents: np.ndarray, timesteps: np.ndarray, context: np.ndarray,
             context_mask: np.ndarray) -> np.ndarray:
        """latents (B, C, h, w) scaled, timesteps (B,) int64 (one per sample), context (B, L, D),
        context_mask (B, L) bool -> the UNet's prediction (B, C, h, w) float32."""
        batch = latents.shape[0]
        self.manifest.check_batch(batch, "UNet batch")
        self.manifest.check_latent_size(latents.shape[2], latents.shape[3])
        timesteps = np.asarray(timesteps, dtype=np.int64).reshape(-1)
        if timesteps.shape[0] == 1 and batch > 1:
            timesteps = np.repeat(timesteps, batch)
        (noise_pred,) = self.run("unet", {"latents": latents, "timesteps": timesteps, "context": context,
                                          "context_mask": np.asarray(context_mask, dtype=bool)})
        return noise_pred

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Unscaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) float32, roughly in [-1, 1]."""
        self.manifest.check_batch(latents.shape[0], "decoder batch")
        self.manifest.check_latent_size(latents.shape[2], latents.shape[3])
        (images,) = self.run("vae_decoder", {"latents": latents})
        return images

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """Images (B, 3, H, W) in [-1, 1] -> unscaled latents (B, C, H/f, W/f) float32, the posterior mode."""
        self.manifest.check_batch(images.shape[0], "encoder batch")
        self.manifest.check_image_size(images.shape[2], images.shape[3])
        (latents,) = self.run("vae_encoder", {"images": images})
        return latents

    def to_array(self, values: np.ndarray, like: np.ndarray | None = None) -> np.ndarray:
        """Host values as an engine array: a numpy array (``like``'s dtype when given)."""
        return np.asarray(values, dtype=None if like is None else like.dtype)

    def to_host(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    # --- below the protocol --------------------------------------------------------------------------------

    def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """B prompts -> (input_ids (B, L) int64, attention_mask (B, L) int64, 1 = token), padded or truncated
        to L = text_max_length exactly as the training tokenizer does."""
        encodings = self.tokenizer.encode_batch(prompts)
        input_ids = np.array([encoding.ids for encoding in encodings], dtype=np.int64)
        attention_mask = np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64)
        length = self.manifest.model.text_max_length
        assert input_ids.shape == (len(prompts), length), input_ids.shape
        return input_ids, attention_mask

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run graph ``graph`` on named host arrays: each is cast to the dtype the manifest lists for that
        input; float outputs come back as float32, in the manifest's output order."""
        entry = self.manifest.graphs[graph]
        expected = {spec.name for spec in entry.inputs}
        if set(feeds) != expected:
            raise ValueError(f"{graph} takes inputs {sorted(expected)}; got {sorted(feeds)}")
        cast = {}
        for spec in entry.inputs:
            value = np.asarray(feeds[spec.name])
            fixed = [(axis, size) for axis, size in enumerate(spec.shape) if isinstance(size, int)]
            if value.ndim != len(spec.shape) or any(value.shape[axis] != size for axis, size in fixed):
                raise ValueError(f"{graph} input {spec.name} has shape {value.shape}; expected {tuple(spec.shape)}")
            cast[spec.name] = np.ascontiguousarray(value, dtype=np.dtype(spec.dtype))
        outputs = self._run_session(self.sessions[graph], cast, [spec.name for spec in entry.outputs])
        return [output.astype(np.float32) if output.dtype.kind == "f" else output for output in outputs]

    def _run_session(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray],
                     output_names: list[str]) -> list[np.ndarray]:
        if not self.use_io_binding:
            return session.run(output_names, feeds)
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in output_names:
            binding.bind_output(name, "cuda", self.device_id)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


def _resolve_providers(providers: Sequence[str] | None, device: str) -> tuple[list, int]:
    """(the execution providers to use, the CUDA device id); ``EngineLoadError`` for a device this onnxruntime lacks."""
    available = ort.get_available_providers()
    if providers is not None:
        missing = [p for p in providers if (p[0] if isinstance(p, tuple) else p) not in available]
        if missing:
            raise EngineLoadError(f"onnxruntime providers {missing} are not available here; expected some of "
                                  f"{available}")
        return list(providers), 0
    if device in ("auto", "cpu"):
        if device == "auto" and CUDA in available:
            return [(CUDA, {"device_id": 0}), CPU], 0
        return [CPU], 0
    if device == "cuda" or device.startswith("cuda:"):
        if CUDA not in available:
            raise EngineLoadError(f"device {device!r} needs onnxruntime-gpu (this onnxruntime has {available}); "
                                  f"expected 'auto' or 'cpu'")
        index = device.partition(":")[2]
        if index and not index.isdigit():
            raise EngineLoadError(f"device {device!r} is not valid; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        device_id = int(index or 0)
        return [(CUDA, {"device_id": device_id}), CPU], device_id
    raise EngineLoadError(f"device {device!r} is not valid; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _load_tokenizer(folder: Path, max_length: int):
    """The engine dir's tokenizer.json as a ``tokenizers.Tokenizer`` that pads and truncates to ``max_length``."""
    from tokenizers import Tokenizer  # a Rust library with no torch dependency

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise EngineDirError(f"engine dir {folder.parent} has no {TOKENIZER_DIR}/tokenizer.json; re-export it")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise EngineDirError(f"{path} is not a tokenizer the tokenizers library can read ({error})") from None
    config_path = folder / "tokenizer_config.json"
    try:
        settings = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EngineDirError(f"cannot read {config_path} ({error})") from None
    pad_token = settings.get("pad_token") or "[PAD]"
    if isinstance(pad_token, dict):  # older transformers write AddedToken objects
        pad_token = pad_token.get("content", "[PAD]")
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise EngineDirError(f"{path} has no padding token {pad_token!r}; expected the tokenizer the model was "
                             f"trained with")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
    return tokenizer
