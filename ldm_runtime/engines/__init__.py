"""Engines: the same four calls over eager PyTorch, onnxruntime, OpenVINO, Triton kernels or TensorRT.

``load_engine`` opens a folder: a checkpoint dir (``model.json``, written by ``ldm-train``) runs on the
torch engine (or, on a CUDA GPU, the triton engine), an engine dir (``manifest.json``, written by
``ldm-export``) on onnxruntime or openvino. Each engine's module is imported only when it is asked for, so
serving an engine dir needs neither torch nor ``train``.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from ldm_runtime.engines.base import Engine, EngineInfo

ENGINE_NAMES = ("auto", "torch", "triton", "onnxruntime", "openvino")
ENGINE_DIR_ENGINES = ("onnxruntime", "openvino")  # the engines that run an engine dir
CHECKPOINT_MARKER = "model.json"
ENGINE_DIR_MARKER = "manifest.json"
log = logging.getLogger(__name__)


class EngineLoadError(ValueError):
    """A model folder or engine name a user gave cannot be opened; the message is one sentence."""


def pick_engine(path: str | Path, device: str = "auto") -> tuple[str, str]:
    """(the engine "auto" runs ``path`` on, one sentence saying why). A checkpoint dir runs on torch. An engine
    dir runs on openvino where it imports and the engine runs on the CPU (measured as fast as onnxruntime at 2
    UNet rows and faster at 16: BENCHMARKS.md), else on onnxruntime (on a GPU, or without openvino)."""
    folder = _existing_folder(path)
    if (folder / CHECKPOINT_MARKER).is_file():
        return "torch", f"{folder} is a checkpoint dir, which runs eagerly on torch"
    if not (folder / ENGINE_DIR_MARKER).is_file():
        raise EngineLoadError(f"{folder} has neither {CHECKPOINT_MARKER} nor {ENGINE_DIR_MARKER}; expected a "
                              f"checkpoint dir (ldm-train) or an engine dir (ldm-export)")
    if device.startswith("cuda"):
        return "onnxruntime", f"device {device!r} is a GPU, which the openvino engine does not run on"
    if device == "auto" and _onnxruntime_sees_a_gpu():
        return "onnxruntime", "onnxruntime sees a CUDA GPU"
    if importlib.util.find_spec("openvino") is None:
        return "onnxruntime", "openvino is not installed (pip install 'ldm-runtime[openvino]' for the faster CPU engine)"
    return "openvino", "openvino is installed, and on the CPU it is as fast as onnxruntime or faster"


def _existing_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise EngineLoadError(f"model folder {str(folder)!r} does not exist or is not a folder; expected a "
                              f"checkpoint dir (ldm-train) or an engine dir (ldm-export)")
    return folder


def _onnxruntime_sees_a_gpu() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def load_engine(path: str | Path, engine: str = "auto", device: str = "auto", **options: Any) -> Engine:
    """The engine for ``path``: "torch" or "triton" for a checkpoint dir, "onnxruntime" or "openvino" for an
    engine dir; "auto" takes ``pick_engine``'s choice and logs it. ``options`` go to the engine's constructor
    (e.g. ``dtype``, ``unet_chunk_size`` for torch; ``intra_op_threads`` for onnxruntime and openvino).

    Raises ``EngineLoadError`` for an unknown engine name or a folder that is neither kind, and the engine's
    own ``ValueError`` subclass (e.g. ``CheckpointError``) for a folder of the right kind that is broken.
    """
    if engine not in ENGINE_NAMES:
        raise EngineLoadError(f"engine {engine!r} is not one of {', '.join(ENGINE_NAMES)}")
    folder = _existing_folder(path)
    is_checkpoint = (folder / CHECKPOINT_MARKER).is_file()
    is_engine_dir = (folder / ENGINE_DIR_MARKER).is_file()
    if engine == "auto":
        engine, reason = pick_engine(folder, device)
        log.info("--engine auto picked %s: %s", engine, reason)
    if engine in ("torch", "triton"):
        if not is_checkpoint:
            raise EngineLoadError(f"{folder} has no {CHECKPOINT_MARKER}; the {engine} engine runs a checkpoint dir "
                                  f"written by ldm-train")
        if engine == "triton":
            from ldm_runtime.engines.triton_engine import TritonEngine

            return TritonEngine(folder, device=device, **options)
        from ldm_runtime.engines.torch_engine import TorchEngine

        return TorchEngine(folder, device=device, **options)
    if not is_engine_dir:
        raise EngineLoadError(f"{folder} has no {ENGINE_DIR_MARKER}; the {engine} engine runs an engine dir "
                              f"written by ldm-export")
    if engine == "openvino":
        from ldm_runtime.engines.openvino_engine import OpenVinoEngine

        return OpenVinoEngine(folder, device=device, **options)
    from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine

    return OnnxRuntimeEngine(folder, device=device, **options)


__all__ = ["ENGINE_DIR_ENGINES", "ENGINE_NAMES", "Engine", "EngineInfo", "EngineLoadError", "load_engine",
           "pick_engine"]
