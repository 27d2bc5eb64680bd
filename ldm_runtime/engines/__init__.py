"""Engines: the same four calls over eager PyTorch, onnxruntime, Triton kernels or TensorRT.

``load_engine`` opens a folder: a checkpoint dir (``model.json``, written by ``ldm-train``) runs on the
torch engine (or, on a CUDA GPU, the triton engine), an engine dir (``manifest.json``, written by
``ldm-export``) on onnxruntime. Each engine's
module is imported only when it is asked for, so serving an engine dir needs no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm_runtime.checkpoint import MODEL_JSON
from ldm_runtime.engines.base import Engine, EngineInfo
from ldm_runtime.errors import EngineLoadError
from ldm_runtime.manifest import MANIFEST_JSON

ENGINE_NAMES = ("auto", "torch", "triton", "onnxruntime")
CHECKPOINT_MARKER = MODEL_JSON
ENGINE_DIR_MARKER = MANIFEST_JSON
# The optional libraries an engine needs: a missing one is the user's to install, not a bug.
ENGINE_LIBRARIES = {"torch": ("torch", "transformers", "safetensors"), "triton": ("torch", "transformers",
                                                                                  "safetensors", "triton"),
                    "onnxruntime": ("onnxruntime", "tokenizers")}


def load_engine(path: str | Path, engine: str = "auto", device: str = "auto", **options: Any) -> Engine:
    """The engine for ``path``: "torch" or "triton" for a checkpoint dir, "onnxruntime" for an engine dir;
    "auto" picks torch or onnxruntime by the folder. ``options`` go to the engine's constructor (e.g. ``dtype``, ``unet_chunk_size`` for torch).

    Raises ``EngineLoadError`` for an unknown engine name, a folder that is neither kind, a device this machine
    lacks or an engine library that is not installed, and ``CheckpointError`` or ``EngineDirError`` for a folder
    of the right kind that is broken: all ``UserError``.
    """
    if engine not in ENGINE_NAMES:
        raise EngineLoadError(f"engine {engine!r} is not one of {', '.join(ENGINE_NAMES)}")
    folder = Path(path)
    if not folder.is_dir():
        raise EngineLoadError(f"model folder {str(folder)!r} does not exist or is not a folder; expected a "
                              f"checkpoint dir (ldm-train) or an engine dir (ldm-export)")
    is_checkpoint = (folder / CHECKPOINT_MARKER).is_file()
    is_engine_dir = (folder / ENGINE_DIR_MARKER).is_file()
    if engine == "auto":
        if not (is_checkpoint or is_engine_dir):
            raise EngineLoadError(f"{folder} has neither {CHECKPOINT_MARKER} nor {ENGINE_DIR_MARKER}; expected a "
                                  f"checkpoint dir (ldm-train) or an engine dir (ldm-export)")
        engine = "torch" if is_checkpoint else "onnxruntime"
    if engine in ("torch", "triton") and not is_checkpoint:
        raise EngineLoadError(f"{folder} has no {CHECKPOINT_MARKER}; the {engine} engine runs a checkpoint dir "
                              f"written by ldm-train")
    if engine == "onnxruntime" and not is_engine_dir:
        raise EngineLoadError(f"{folder} has no {ENGINE_DIR_MARKER}; the onnxruntime engine runs an engine dir "
                              f"written by ldm-export")
    try:
        return _engine_class(engine)(folder, device=device, **options)
    except ModuleNotFoundError as error:
        if error.name not in ENGINE_LIBRARIES[engine]:
            raise
        raise EngineLoadError(f"the {engine} engine needs the {error.name} package, which is not installed here; "
                              f"install it or use another engine") from None


def _engine_class(engine: str) -> type:
    """The class of engine ``engine`` ("torch", "triton" or "onnxruntime"), imported now."""
    if engine == "triton":
        from ldm_runtime.engines.triton_engine import TritonEngine

        return TritonEngine
    if engine == "torch":
        from ldm_runtime.engines.torch_engine import TorchEngine

        return TorchEngine
    from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine

    return OnnxRuntimeEngine


__all__ = ["ENGINE_NAMES", "Engine", "EngineInfo", "EngineLoadError", "load_engine"]
