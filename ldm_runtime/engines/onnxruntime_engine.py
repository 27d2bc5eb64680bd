"""The onnxruntime engine: the ONNX graphs of an engine dir written by ``ldm-export``, on numpy arrays.

Imports numpy, onnxruntime and the ``tokenizers`` library only (never torch or the training code), so an
engine dir is served on a machine without them. Engine arrays are host numpy float32 arrays whatever the
graphs' precision: each call casts its inputs to the dtypes the manifest lists for the graph (fp16 for an
fp16 engine without ``--fp32-io``) and returns float32, so the sampler's arithmetic runs in float32.

On CUDA (onnxruntime-gpu with a visible GPU) every call goes through IO binding: inputs are copied to the
device once, outputs are allocated there by onnxruntime and copied back once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_errors

from ldm_runtime.engines.engine_dir_engine import EngineDirEngine
from ldm_runtime.errors import EngineLoadError
from ldm_runtime.manifest import EngineDirError

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
# onnxruntime's element types -> numpy's dtype names (as the manifest writes them)
ELEMENT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
                 "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
                 "tensor(bool)": "bool"}
ALLOW_SPINNING = "session.intra_op.allow_spinning"  # the session option that lets idle threads spin


class OnnxRuntimeEngine(EngineDirEngine):
    """An engine dir's four graphs in onnxruntime sessions, behind the Engine protocol (numpy arrays).

    providers: onnxruntime execution providers; None picks from ``device`` ("auto": CUDA when onnxruntime-gpu
    sees a GPU, else the CPU; "cpu"; "cuda" / "cuda:N"). intra_op_threads: threads per graph (None:
    onnxruntime's default, one per core). graph_optimization_level: "disable", "basic", "extended" or "all"
    (the level onnxruntime optimises each graph at when it loads it). verify: check every graph's and the
    tokenizer's sha256 against the manifest first (``EngineDirError`` naming the file that differs).
    Batches and image sizes outside the exported ranges raise ``OutOfRangeError`` naming the allowed range.
    adapters: {name: LoRA .safetensors file} for requests to name, on an engine dir with LoRA slots
    (``EngineDirEngine.load_adapters``). spinning: whether each session's threads spin while waiting for work
    (onnxruntime's default) rather than sleep. Off by default: every graph is a session with a thread pool of its
    own, and a sampling run switches graphs (text encoder, UNet, its shallow part under feature caching, decoder),
    so the threads of the session that just ran spin on the cores the next one needs (measured with and without:
    BENCHMARKS.md, "The speed-quality frontier").
    """

    def __init__(self, engine_dir: str | Path, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None, graph_optimization_level: str = "all", verify: bool = True,
                 device: str = "auto", adapters: Mapping[str, str | Path] | None = None, spinning: bool = False):
        self._open_engine_dir(engine_dir, "onnxruntime", verify)
        self.load_adapters(adapters or {})
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
        options.add_session_config_entry(ALLOW_SPINNING, "1" if spinning else "0")
        self.sessions: dict[str, ort.InferenceSession] = {}
        for name, graph in self.manifest.graphs.items():
            path = self.engine_dir / graph.file
            try:
                self.sessions[name] = ort.InferenceSession(str(path), options, providers=self.providers)
            except SESSION_LOAD_ERRORS as error:
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise EngineDirError(f"onnxruntime cannot load {path} ({first_line})") from None
            session = self.sessions[name]
            self.check_graph_tensors(name, [_tensor(arg) for arg in session.get_inputs()],
                                     [_tensor(arg) for arg in session.get_outputs()])
        self.use_io_binding = CUDA in self.sessions["unet"].get_providers()

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run graph ``graph`` on named host arrays: each is cast to the dtype the manifest lists for that
        input; float outputs come back as float32, in the manifest's output order."""
        output_names = [spec.name for spec in self.manifest.graphs[graph].outputs]
        outputs = self._run_session(self.sessions[graph], self.cast_inputs(graph, feeds), output_names)
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


def _tensor(arg) -> tuple[str, str, tuple[int | None, ...] | None]:
    """A session's input or output (an onnxruntime NodeArg) as (name, numpy dtype name, shape: None for an axis of
    any size)."""
    shape = arg.shape
    sizes = None if shape is None else tuple(size if isinstance(size, int) else None for size in shape)
    return arg.name, ELEMENT_TYPES.get(arg.type, arg.type), sizes


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
