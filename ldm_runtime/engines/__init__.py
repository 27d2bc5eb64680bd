"""Engines: the same four calls over eager PyTorch, onnxruntime, OpenVINO, Triton kernels or TensorRT.

``load_engine`` opens a folder: a checkpoint dir (``model.json``, written by ``ldm-train``) runs on the
torch engine (or, on a CUDA GPU, the triton engine), an engine dir (``manifest.json``, written by
``ldm-export``) on onnxruntime or openvino, or, where it holds TensorRT plans, on tensorrt. Each engine's module is imported only when it is asked for, so
serving an engine dir needs no torch.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Mapping

from ldm_runtime.adapters import AdapterError, check_adapter_file
from ldm_runtime.checkpoint import MODEL_JSON
from ldm_runtime.engines import tensorrt_plans
from ldm_runtime.engines.base import Engine, EngineInfo
from ldm_runtime.errors import EngineDirError, EngineLoadError
from ldm_runtime.manifest import MANIFEST_JSON, check_tensorrt_plans, load_manifest

ENGINE_NAMES = ("auto", "torch", "triton", "onnxruntime", "openvino", "tensorrt")
ENGINE_DIR_ENGINES = ("onnxruntime", "openvino", "tensorrt")  # the engines that run an engine dir
THREADED_ENGINES = ("onnxruntime", "openvino")  # the engines that take intra_op_threads (their CPU threads)
PRECISION_NAMES = ("auto", "fp32", "bf16")  # --precision: the openvino engine's; auto, the default, fits any engine
# What --precision does, for the commands' --help
PRECISION_HELP = ("the openvino engine's inference precision: auto takes bf16 where the CPU has native bf16 (AVX-512 "
                  "BF16 or AMX) and bf16 met the fidelity bar on this engine, else fp32, and says which; bf16 only "
                  "on a CPU with native bf16; other engines keep their own precision under auto and refuse fp32 and "
                  "bf16 (default: auto)")
CHECKPOINT_MARKER = MODEL_JSON
ENGINE_DIR_MARKER = MANIFEST_JSON
DIFFUSERS_MARKER = "model_index.json"  # a diffusers pipeline folder, which ldm-import converts to a checkpoint dir
# The optional libraries an engine needs: a missing one is the user's to install, not a bug.
ENGINE_LIBRARIES = {"torch": ("torch", "transformers", "safetensors"), "triton": ("torch", "transformers",
                                                                                  "safetensors", "triton"),
                    "onnxruntime": ("onnxruntime", "tokenizers"), "openvino": ("openvino", "tokenizers"),
                    "tensorrt": ("tensorrt", "torch", "onnxruntime", "tokenizers")}
# What --engine auto does (``pick_engine``), for the commands' --help
AUTO_ENGINE_HELP = ("auto picks torch for a checkpoint dir and, for an engine dir, tensorrt where it holds TensorRT "
                    "plans built for this GPU, openvino on the CPU where it is installed, else onnxruntime")
log = logging.getLogger(__name__)


def pick_engine(path: str | Path, device: str = "auto") -> tuple[str, str]:
    """(the engine "auto" runs ``path`` on, one sentence saying why). A checkpoint dir runs on torch. An engine
    dir runs on tensorrt where it holds TensorRT plans built for this machine's GPU and TensorRT version; else on
    openvino where it imports and the engine runs on the CPU (measured as fast as onnxruntime at 2 UNet rows and
    faster at 16: BENCHMARKS.md), else on onnxruntime (on a GPU, or without openvino). ``EngineLoadError`` for a
    folder that holds both markers (which kind it is cannot be told) or neither (naming a diffusers pipeline's
    model_index.json, which ldm-import converts, where the folder holds one)."""
    folder = _existing_folder(path)
    # a marker that is there but no regular file is the loader's to name (a named pipe, a folder...)
    is_checkpoint, is_engine_dir = (folder / CHECKPOINT_MARKER).exists(), (folder / ENGINE_DIR_MARKER).exists()
    if is_checkpoint and is_engine_dir:
        raise EngineLoadError(f"{folder} holds both {CHECKPOINT_MARKER} (a checkpoint dir's) and {ENGINE_DIR_MARKER} "
                              f"(an engine dir's), so --engine auto cannot tell which it is; expected one of them: "
                              f"remove the stray file, or name the engine (--engine torch for the checkpoint, "
                              f"--engine onnxruntime for the engine dir)")
    if is_checkpoint:
        return "torch", f"{folder} is a checkpoint dir, which runs eagerly on torch"
    if not is_engine_dir:
        raise EngineLoadError(f"{folder} has neither {CHECKPOINT_MARKER} nor {ENGINE_DIR_MARKER}; expected a "
                              f"checkpoint dir (ldm-train) or an engine dir (ldm-export){_diffusers_hint(folder)}")
    if device != "cpu" and _tensorrt_runs(folder, device):
        return "tensorrt", "the engine dir holds TensorRT plans built for this GPU and TensorRT version"
    if device.startswith("cuda"):
        return "onnxruntime", f"device {device!r} is a GPU, which the openvino engine does not run on"
    if device == "auto" and _onnxruntime_sees_a_gpu():
        return "onnxruntime", "onnxruntime sees a CUDA GPU"
    if importlib.util.find_spec("openvino") is None:
        return "onnxruntime", "openvino is not installed (pip install 'ldm-runtime[openvino]' for the faster CPU engine)"
    return "openvino", "openvino is installed, and on the CPU it is as fast as onnxruntime or faster"


def _diffusers_hint(folder: Path) -> str:
    """For a message about a folder that is no model folder: where it holds a diffusers pipeline
    (``model_index.json``), how to make a checkpoint dir of it; else ""."""
    if not (folder / DIFFUSERS_MARKER).exists():
        return ""
    return (f"; it holds {DIFFUSERS_MARKER}, a diffusers pipeline: convert it with "
            f"`ldm-import {folder} --out CHECKPOINT_DIR` first")


def _existing_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise EngineLoadError(f"model folder {str(folder)!r} does not exist or is not a folder; expected a "
                              f"checkpoint dir (ldm-train) or an engine dir (ldm-export)")
    return folder


def _tensorrt_runs(folder: Path, device: str) -> bool:
    """Whether the engine dir has TensorRT plans and this machine has TensorRT, torch and the GPU they were built
    for (torch and tensorrt are imported only when the plans are there and both are installed)."""
    manifest = load_manifest(folder)
    if not (manifest.tensorrt or {}).get("plans"):
        return False
    if any(importlib.util.find_spec(name) is None for name in ("tensorrt", "torch")):
        return False
    if tensorrt_plans.tensorrt_missing() is not None:
        return False
    import tensorrt

    index = device.partition(":")[2]
    try:
        check_tensorrt_plans(manifest, tensorrt.__version__, *tensorrt_plans.gpu_identity(int(index or 0)))
    except (EngineDirError, ValueError, RuntimeError):  # plans for another GPU or version, or no such device
        return False
    return True


def _onnxruntime_sees_a_gpu() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def load_engine(path: str | Path, engine: str = "auto", device: str = "auto", **options: Any) -> Engine:
    """The engine for ``path``: "torch" or "triton" for a checkpoint dir, "onnxruntime", "openvino" or "tensorrt"
    (an engine dir exported with --backend tensorrt) for an engine dir; "auto" takes ``pick_engine``'s choice and logs it at debug level (the commands name the engine
    in their own output, after the flags that depend on it have been checked). ``options`` go to the engine's constructor
    (e.g. ``dtype``, ``unet_chunk_size`` for torch; ``intra_op_threads`` for onnxruntime and openvino; ``precision``
    for openvino, where ``precision="auto"`` is dropped for every other engine, which keeps its own).

    Raises ``EngineLoadError`` for an unknown engine name, a folder that is neither kind, a device this machine
    lacks or an engine library that is not installed, and ``CheckpointError`` or ``EngineDirError`` for a folder
    of the right kind that is broken: all ``UserError``.
    """
    if engine not in ENGINE_NAMES:
        raise EngineLoadError(f"engine {engine!r} is not one of {', '.join(ENGINE_NAMES)}")
    folder = _existing_folder(path)
    # there, as any kind of file: the engine's loader says what is wrong with one that is no regular file
    is_checkpoint = (folder / CHECKPOINT_MARKER).exists()
    is_engine_dir = (folder / ENGINE_DIR_MARKER).exists()
    if engine == "auto":
        engine, reason = pick_engine(folder, device)
        log.debug("--engine auto picked %s: %s", engine, reason)
    if engine in ("torch", "triton") and not is_checkpoint:
        raise EngineLoadError(f"{folder} has no {CHECKPOINT_MARKER}; the {engine} engine runs a checkpoint dir "
                              f"written by ldm-train{_diffusers_hint(folder)}")
    if options.get("precision") == "auto" and engine != "openvino":
        options = {name: value for name, value in options.items() if name != "precision"}
    if engine in ENGINE_DIR_ENGINES and not is_engine_dir:
        raise EngineLoadError(f"{folder} has no {ENGINE_DIR_MARKER}; the {engine} engine runs an engine dir "
                              f"written by ldm-export{_diffusers_hint(folder)}")
    try:
        return _engine_class(engine)(folder, device=device, **options)
    except ModuleNotFoundError as error:
        if error.name not in ENGINE_LIBRARIES[engine]:
            raise
        raise EngineLoadError(f"the {engine} engine needs the {error.name} package, which is not installed here; "
                              f"install it or use another engine") from None


def load_engine_with_adapters(model: str | Path, engine: str, device: str, options: Mapping[str, Any],
                              files: Mapping[str, str | Path]) -> Any:
    """``load_engine(model, engine, device, **options)`` with the LoRA files ``files`` {name: path} loaded for
    requests to name (checked as files before the engine loads). ``AdapterError`` for a file the engine cannot
    serve, or an engine that applies no adapters per request (``adapters_missing`` says why)."""
    if not files:
        return load_engine(model, engine=engine, device=device, **options)
    for path in files.values():
        check_adapter_file(Path(path))
    if engine == "auto":
        engine, _ = pick_engine(model, device)
    if engine == "torch":  # it loads them while it builds its hooks
        return load_engine(model, engine=engine, device=device, adapters=dict(files), **options)
    loaded = load_engine(model, engine=engine, device=device, **options)
    if getattr(loaded, "adapters", None) is None or not hasattr(loaded, "load_adapters"):
        why = getattr(loaded, "adapters_missing", None) or "it has no adapter support"
        raise AdapterError(f"adapters {', '.join(files)} cannot be served: the {loaded.info.name} engine applies no "
                           f"adapters per request ({why}); expected the torch engine or an engine dir exported with "
                           f"ldm-export --lora-slots, or the adapters fused with ldm-import --lora")
    loaded.load_adapters(files)
    return loaded


def engine_for_flags(path: str | Path, engine: str, device: str = "auto", precision: str | None = None,
                     threads: int | None = None) -> tuple[str, dict[str, Any]]:
    """The engine name and ``load_engine`` options that a command's ``--engine``, ``--precision`` and
    ``--threads`` ask for. "auto" stays "auto" (``load_engine`` picks, and a failure while loading keeps its
    traceback) unless a flag depends on the choice. ``threads`` becomes the sessions' ``intra_op_threads`` for
    the CPU engine-dir engines; the torch engines and tensorrt leave it to the caller (``torch.set_num_threads``).
    ``precision`` "auto" fits any engine (``load_engine`` gives it to the openvino engine, which takes bf16 or fp32:
    ``precision_note`` says which, and leaves every other engine at its own precision). ``EngineLoadError`` when
    ``--precision`` fp32 or bf16 names an engine that has no such setting."""
    if engine == "auto" and (precision not in (None, "auto") or threads is not None):
        engine, _ = pick_engine(path, device)
    options: dict[str, Any] = {}
    if precision == "auto" and engine in ("auto", "openvino"):
        options["precision"] = precision
    elif precision not in (None, "auto"):
        if engine != "openvino":
            raise EngineLoadError(f"--precision {precision} applies to the openvino engine, not {engine}; "
                                  f"expected --engine openvino or --precision auto")
        options["precision"] = precision
    if threads is not None and engine in THREADED_ENGINES:
        options["intra_op_threads"] = threads
    return engine, options


def precision_note(engine: Engine, precision: str | None) -> str | None:
    """The openvino engine's one sentence saying what ``--precision auto`` took and why; None for any other
    ``precision`` and for the other engines, which keep their own precision under auto without a word."""
    return getattr(engine, "precision_choice", None) if precision == "auto" else None


def _engine_class(engine: str) -> type:
    """The class of engine ``engine`` ("torch", "triton", "onnxruntime", "openvino" or "tensorrt"), imported now."""
    if engine == "triton":
        from ldm_runtime.engines.triton_engine import TritonEngine

        return TritonEngine
    if engine == "torch":
        from ldm_runtime.engines.torch_engine import TorchEngine

        return TorchEngine
    if engine == "openvino":
        from ldm_runtime.engines.openvino_engine import OpenVinoEngine

        return OpenVinoEngine
    if engine == "tensorrt":
        from ldm_runtime.engines.tensorrt_engine import TensorRtEngine

        return TensorRtEngine
    from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine

    return OnnxRuntimeEngine


__all__ = ["ENGINE_DIR_ENGINES", "ENGINE_NAMES", "PRECISION_NAMES", "THREADED_ENGINES", "Engine", "EngineInfo",
           "EngineLoadError", "engine_for_flags", "load_engine", "pick_engine", "precision_note"]
