"""The tensorrt engine: the TensorRT plans of an engine dir (``ldm-export --backend tensorrt``), on torch CUDA
tensors. Not yet run on a GPU: ``scripts/gpu_check.sh`` checks it against the onnxruntime engine wherever
TensorRT imports.

TensorRT 10 Python API: a ``Runtime`` deserializes each ``<graph>.plan``; every optimisation profile of a plan gets
its own execution context (``set_optimization_profile_async`` once, at load); tensors are bound by the names the
manifest lists (``set_input_shape``, ``set_tensor_address``) and a call is ``execute_async_v3`` on torch's current
CUDA stream, so it orders with the sampler's own arithmetic and nothing waits on the host.

Buffers: a call of B rows is padded with copies of its last row up to a batch bucket (the powers of two of the
profile's batch range, and its maximum: ``tensorrt_plans.plan_call``). Input and output buffers are allocated
once per (profile, padded shapes) and reused by every later call of that shape, so a sampling loop allocates
only the rows it returns. The sampler's latents stay on the GPU for the whole loop; only the timesteps (host
integers, one per row) and the tokenizer's ids cross from the host.

CUDA graphs: each UNet shape (bucket, latent size) is captured once in a CUDA graph (``cuda_graph.CapturedCall``)
and replayed: one launch instead of one per layer, which is what small batches are bound by. The context is
re-bound to a graph's shapes and buffers before it is replayed, so that the context's state always matches the
graph it runs. The text encoder and the autoencoder run uncaptured (once per request), and so does a UNet
plan whose capture fails (a warning says so).

Batch invariance: a row's result does not depend on the rows beside it in its bucket (every row of these graphs
is computed on its own); across buckets TensorRT's kernels may differ, which moves results in the last bits.

Checks at load: TensorRT and a CUDA GPU are here (``TensorRtUnavailable``, one line), the plans were built for
this GPU and TensorRT version (``EngineDirError`` saying how to rebuild), their sha256 match the manifest, and
each plan's I/O tensors are the manifest's names and dtypes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import logging

import numpy as np
import torch

from ldm_runtime.arrays import host_to_array_like
from ldm_runtime.engines import tensorrt_plans
from ldm_runtime.engines.cuda_graph import CapturedCall
from ldm_runtime.engines.engine_dir_engine import EngineDirEngine
from ldm_runtime.engines.tensorrt_plans import (
    POWERS_OF_TWO,
    REBUILD_HINT,
    CallPlan,
    PlanProfile,
    check_plan_tensors,
    missing_plans,
    plan_call,
)
from ldm_runtime.errors import EngineDirError, EngineLoadError
from ldm_runtime.manifest import (
    DEEP_FEATURES,
    SHALLOW_UNET_GRAPH,
    GraphEntry,
    check_tensorrt_plans,
    verify_engine_files,
)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32,
                "bool": torch.bool}
CAPTURED_GRAPHS = ("unet", SHALLOW_UNET_GRAPH)  # the graphs the sampling loop calls every step
log = logging.getLogger(__name__)


class TensorRtUnavailable(EngineLoadError):
    """This machine cannot run the tensorrt engine; the message is one sentence saying what is missing."""


def tensorrt_device(device: str) -> torch.device:
    """The CUDA device the tensorrt engine runs on for ``device`` ("auto", "cuda", "cuda:N"), or
    ``TensorRtUnavailable`` naming what is missing (tensorrt, a GPU) or why the device cannot be used."""
    if device == "cpu":
        raise TensorRtUnavailable("device 'cpu' is not valid for the tensorrt engine, which runs on a CUDA GPU; "
                                  "expected 'auto', 'cuda' or 'cuda:N' (use --engine onnxruntime on the CPU)")
    index = device.partition(":")[2]
    if not (device in ("auto", "cuda") or (device.startswith("cuda:") and index.isdigit())):
        raise TensorRtUnavailable(f"device {device!r} is not valid for the tensorrt engine; expected 'auto', "
                                  f"'cuda' or 'cuda:N'")
    missing = tensorrt_plans.tensorrt_missing("the tensorrt engine")
    if missing:
        raise TensorRtUnavailable(missing)
    count = torch.cuda.device_count()
    if int(index or 0) >= count:
        raise TensorRtUnavailable(f"device {device!r} is not available (this machine has {count} CUDA devices); "
                                  f"expected 'auto', 'cuda' or 'cuda:N' with N below {count}")
    return torch.device("cuda", int(index or 0))


def gpu_identity(device: torch.device) -> tuple[str, str]:
    """(GPU name, compute capability) of ``device``, as the plans' builder recorded them."""
    return tensorrt_plans.gpu_identity(device.index or 0)


class TensorRtEngine(EngineDirEngine):
    """An engine dir's four TensorRT plans behind the Engine protocol (torch tensors on one CUDA device).

    device: "auto", "cuda" or "cuda:N". cuda_graphs: capture each UNet shape in a CUDA graph (False runs every
    call uncaptured; always False off CUDA). batch_buckets: the batch sizes calls are padded to, within each
    profile's batch range (its maximum is always one). verify: check the plans' and the tokenizer's sha256
    against the manifest first. Batches and image sizes outside the exported ranges raise ``OutOfRangeError``
    naming the allowed range.
    """

    name = "tensorrt"

    def __init__(self, engine_dir: str | Path, device: str = "auto", cuda_graphs: bool = True,
                 batch_buckets: tuple[int, ...] = POWERS_OF_TWO, verify: bool = True):
        self.device = tensorrt_device(device)
        if not batch_buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_buckets):
            raise ValueError(f"batch_buckets is {batch_buckets!r}; expected positive integers")
        import tensorrt as trt

        # the plans, not the ONNX graphs, are what runs: verify_engine_files below checks those
        self._open_engine_dir(engine_dir, self.name, verify=False)
        plans = (self.manifest.tensorrt or {}).get("plans") or {}
        if not plans:
            raise EngineDirError(f"engine dir {self.engine_dir} holds no TensorRT plans; export it with "
                                 f"`ldm-export --backend tensorrt` on a GPU, or use --engine onnxruntime")
        absent = missing_plans(plans, self.manifest.graphs)
        if absent:
            raise EngineDirError(f"engine dir {self.engine_dir} has no TensorRT plan for {', '.join(absent)}; "
                                 f"{REBUILD_HINT}")
        check_tensorrt_plans(self.manifest, trt.__version__, *gpu_identity(self.device))
        if verify:
            verify_engine_files(self.engine_dir, self.manifest, graphs=(), plans=True)
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.batch_buckets = tuple(sorted(set(batch_buckets)))
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.plans = {name: PlanRunner(self.runtime, self.engine_dir / plans[name]["file"], name, graph,
                                       self.device, self.batch_buckets, self._stream,
                                       capture=self.cuda_graphs and name in CAPTURED_GRAPHS, pool=self._graph_pool)
                      for name, graph in self.manifest.graphs.items()}

    # --- the Engine protocol -------------------------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """B prompts -> (context (B, L, D) float32, context_mask (B, L) bool: True = a token the UNet attends to;
        every token, padding included, for a model with ``mask_padding`` false), on the GPU."""
        if isinstance(prompts, str):
            raise TypeError(f"prompts is the string {prompts!r}; expected a list of strings")
        self.manifest.check_batch(len(prompts), "text encoder batch")
        input_ids, attention_mask = self.tokenize(list(prompts))
        mask = self._device_tensor(attention_mask)
        (context,) = self.run("text_encoder", {"input_ids": self._device_tensor(input_ids), "attention_mask": mask})
        if not self.manifest.model.mask_padding:
            return context, torch.ones_like(mask, dtype=torch.bool)
        return context, mask.bool()

    def unet(self, latents: torch.Tensor, timesteps: np.ndarray, context: torch.Tensor,
             context_mask: torch.Tensor) -> torch.Tensor:
        """latents (B, C, h, w) scaled, timesteps (B,) int64 on the host (one per sample), context (B, L, D),
        context_mask (B, L) bool -> the UNet's prediction (B, C, h, w) float32 on the GPU."""
        return self.unet_with_deep_features(latents, timesteps, context, context_mask)[0]

    def unet_with_deep_features(self, latents: torch.Tensor, timesteps: np.ndarray, context: torch.Tensor,
                                context_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``unet``'s prediction and the deep features DeepCache keeps (None from plans without them)."""
        timesteps = self.unet_timesteps(latents, timesteps)
        outputs = self.run("unet", {"latents": latents, "timesteps": self._device_tensor(timesteps),
                                    "context": context, "context_mask": context_mask})
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)

    def unet_shallow(self, latents: torch.Tensor, timesteps: np.ndarray, context: torch.Tensor,
                     context_mask: torch.Tensor, deep_features: torch.Tensor) -> torch.Tensor:
        """The prediction from the UNet's shallow part on deep features kept from ``unet_with_deep_features``."""
        timesteps = self.unet_timesteps(latents, timesteps)
        (noise_pred,) = self.run(SHALLOW_UNET_GRAPH, {
            "latents": latents, "timesteps": self._device_tensor(timesteps), "context": context,
            "context_mask": context_mask, DEEP_FEATURES: deep_features})
        return noise_pred

    def to_array(self, values: np.ndarray, like: torch.Tensor | None = None) -> torch.Tensor:
        """Host values as a tensor on the engine's device (``like``'s dtype when given, else the values' dtype)."""
        if like is not None:
            return host_to_array_like(values, like)
        return self._device_tensor(values)

    def to_host(self, array: torch.Tensor) -> np.ndarray:
        """A tensor as a host numpy array of the same dtype and shape."""
        return array.detach().cpu().numpy()

    # --- below the protocol --------------------------------------------------------------------------------

    def run(self, graph: str, feeds: dict[str, Any]) -> list[torch.Tensor]:
        """Run plan ``graph`` on named inputs of B rows (tensors or host arrays): outputs of B rows in the
        manifest's order, floats as float32, each a fresh tensor on the engine's device."""
        return self.plans[graph].run({name: self._device_tensor(value) for name, value in feeds.items()})

    @property
    def captured_shapes(self) -> list[tuple]:
        """(graph, profile, padded input shapes) of every call shape captured in a CUDA graph so far."""
        return sorted((name, *key) for name, plan in self.plans.items() for key in plan.graphs)

    def _device_tensor(self, values: Any) -> torch.Tensor:
        if isinstance(values, torch.Tensor):
            return values.to(self.device)
        return torch.as_tensor(np.array(values), device=self.device)  # np.array copies: torch needs writable memory

    def _stream(self) -> int:
        """The handle of torch's current stream on the engine's device (0, the default stream, off CUDA)."""
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0


class PlanRunner:
    """One graph's plan: its deserialized engine, one execution context per optimisation profile, and the buffers
    (and, with ``capture``, the CUDA graph) of every call shape it has run."""

    def __init__(self, runtime: Any, path: Path, name: str, graph: GraphEntry, device: torch.device,
                 buckets: tuple[int, ...], stream: Callable[[], int], capture: bool = False, pool: Any = None):
        self.name, self.device, self.buckets, self.stream = name, device, buckets, stream
        self.capture, self.pool = capture, pool
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineDirError(f"TensorRT cannot load the plan {path} (its log above says why); {REBUILD_HINT}")
        tensors = {}
        for index in range(self.engine.num_io_tensors):
            tensor = self.engine.get_tensor_name(index)
            tensors[tensor] = (self.engine.get_tensor_mode(tensor).name, self.engine.get_tensor_dtype(tensor).name)
        check_plan_tensors(f"TensorRT plan {path}", graph, tensors)
        self.inputs = [spec.name for spec in graph.inputs]
        self.outputs = [spec.name for spec in graph.outputs]
        self.dtypes = {spec.name: TORCH_DTYPES[spec.dtype] for spec in (*graph.inputs, *graph.outputs)}
        self.profiles = [
            PlanProfile({tensor: tuple(tuple(int(size) for size in shape)
                                       for shape in self.engine.get_tensor_profile_shape(tensor, index))
                         for tensor in self.inputs})
            for index in range(self.engine.num_optimization_profiles)]
        self.contexts = []
        for index in range(len(self.profiles)):
            context = self.engine.create_execution_context()
            if context is None or not context.set_optimization_profile_async(index, self.stream()):
                raise EngineDirError(f"TensorRT cannot make an execution context for profile {index} of {path} "
                                     f"(out of GPU memory?)")
            self.contexts.append(context)
        self.buffers: dict[tuple, dict[str, torch.Tensor]] = {}  # (profile, padded shapes) -> tensor buffers
        self.graphs: dict[tuple, CapturedCall] = {}  # (profile, padded shapes) -> the captured call
        self._bound: list[tuple | None] = [None] * len(self.profiles)  # what each context's shapes/addresses are

    def run(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Named device tensors of B rows -> the outputs' first B rows (floats as float32, fresh tensors)."""
        if set(feeds) != set(self.inputs):
            raise ValueError(f"{self.name} takes inputs {sorted(self.inputs)}; got {sorted(feeds)}")
        call = plan_call(self.name, self.profiles, {name: tuple(feeds[name].shape) for name in self.inputs},
                         self.buckets)
        batch = next(iter(feeds.values())).shape[0]
        key = (call.profile, tuple(call.shapes[name] for name in self.inputs))
        buffers = self._buffers(call, key)
        for name in self.inputs:
            _fill_padded(buffers[name], feeds[name])
        captured = self._replay(call, key, buffers) if self.capture else None
        if captured is not None:
            outputs = captured
        else:
            self._bind(call, key, buffers)
            if not self.contexts[call.profile].execute_async_v3(self.stream()):
                raise RuntimeError(f"TensorRT failed to run {self.name} on shapes {call.shapes} (its log says why)")
            outputs = [buffers[name] for name in self.outputs]
        return [output[:batch].to(torch.float32 if output.is_floating_point() else output.dtype, copy=True)
                for output in outputs]

    def _buffers(self, call: CallPlan, key: tuple) -> dict[str, torch.Tensor]:
        """The input and output buffers of this call shape, allocated on its first call."""
        buffers = self.buffers.get(key)
        if buffers is None:
            context = self.contexts[call.profile]
            for name in self.inputs:
                if not context.set_input_shape(name, call.shapes[name]):
                    raise RuntimeError(f"TensorRT refused {self.name} input {name} of shape {call.shapes[name]}")
            self._bound[call.profile] = None
            buffers = {name: torch.empty(call.shapes[name], dtype=self.dtypes[name], device=self.device)
                       for name in self.inputs}
            buffers.update({name: torch.empty(tuple(context.get_tensor_shape(name)), dtype=self.dtypes[name],
                                              device=self.device) for name in self.outputs})
            self.buffers[key] = buffers
        return buffers

    def _bind(self, call: CallPlan, key: tuple, buffers: dict[str, torch.Tensor], tag: str = "buffers") -> None:
        """Give the profile's context this call's shapes and buffer addresses, unless it already has them."""
        if self._bound[call.profile] == (tag, key):
            return
        context = self.contexts[call.profile]
        for name in self.inputs:
            if not context.set_input_shape(name, call.shapes[name]):
                raise RuntimeError(f"TensorRT refused {self.name} input {name} of shape {call.shapes[name]}")
        for name, tensor in buffers.items():
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of {self.name} tensor {name}")
        self._bound[call.profile] = (tag, key)

    def _replay(self, call: CallPlan, key: tuple, buffers: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
        """Run this call shape from its CUDA graph, capturing it on the first call. None, and no more captures
        for this plan, when the capture fails: the call then runs uncaptured."""
        context = self.contexts[call.profile]
        output_buffers = {name: buffers[name] for name in self.outputs}

        def enqueue(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            self._bind(call, key, {**dict(zip(self.inputs, inputs)), **output_buffers}, tag="graph")
            if not context.execute_async_v3(self.stream()):  # torch's current stream: the capturing one
                raise RuntimeError(f"TensorRT failed to run {self.name} on shapes {call.shapes}")
            return tuple(output_buffers.values())

        captured = self.graphs.get(key)
        if captured is None:
            try:
                captured = CapturedCall(enqueue, [buffers[name] for name in self.inputs], self.pool)
            except RuntimeError as error:  # a plan with layers TensorRT cannot run inside a stream capture
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                log.warning("the TensorRT plan of %s cannot be captured in a CUDA graph (%s); it runs uncaptured",
                            self.name, first_line)
                self.capture, self._bound[call.profile] = False, None
                return None
            self.graphs[key] = captured
        self._bind(call, key, {**dict(zip(self.inputs, captured.static_inputs)), **output_buffers}, tag="graph")
        return list(captured.replay([buffers[name] for name in self.inputs]))


def _fill_padded(buffer: torch.Tensor, value: torch.Tensor) -> None:
    """``value``'s B rows into ``buffer``'s first B rows, copies of its last row into the rest (cast to the
    buffer's dtype)."""
    rows = value.shape[0]
    buffer[:rows].copy_(value)
    if buffer.shape[0] > rows:
        buffer[rows:].copy_(value[-1:].expand(buffer.shape[0] - rows, *value.shape[1:]))
