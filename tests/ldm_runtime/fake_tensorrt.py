"""A FAKE of the ``tensorrt`` module, for tests on a machine without TensorRT or a GPU. It is not TensorRT and
proves nothing about TensorRT itself: it checks how the tensorrt engine USES the TensorRT 10 API.

It offers the calls the engine makes (``Runtime.deserialize_cuda_engine``, the engine's I/O tensor and profile
queries, ``create_execution_context``, ``set_optimization_profile_async``, ``set_input_shape``,
``set_tensor_address``, ``get_tensor_shape``, ``execute_async_v3``) and records every call in ``CALLS``. A
"plan" here is JSON naming an ONNX graph and its profiles (``fake_plan_bytes``); ``execute_async_v3`` reads
the inputs from host memory at the bound addresses, runs the graph with onnxruntime, and writes the outputs to
the bound output addresses, so the engine's buffers, padding and binding are checked end to end on the CPU.
Like TensorRT it refuses shapes outside the context's profile and runs only once every input has a shape
and every tensor an address.
"""

from __future__ import annotations

import ctypes
import enum
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

__version__ = "10.99.0-fake"
CALLS: list[tuple] = []  # (call name, graph, arguments...) in the order the engine made them
LAST_EXECUTED: list = []  # [context, its tensor addresses, its input shapes] of the latest execute_async_v3
NUMPY_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_}


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    BOOL = 4
    INT64 = 8


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class Logger:
    WARNING = 2

    def __init__(self, severity: int = WARNING):
        self.severity = severity


ONNX_TO_DATATYPE = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF,
                    "tensor(int64)": DataType.INT64, "tensor(int32)": DataType.INT32, "tensor(bool)": DataType.BOOL}


def fake_plan_bytes(graph: str, onnx_path: Path, profiles: list[dict[str, list[list[int]]]]) -> bytes:
    """A fake plan: graph ``graph`` from ``onnx_path`` with ``profiles`` (input name -> [min, opt, max])."""
    return json.dumps({"fake_tensorrt_plan": graph, "onnx": str(onnx_path), "profiles": profiles}).encode()


class Runtime:
    def __init__(self, logger: Logger):
        CALLS.append(("Runtime",))

    def deserialize_cuda_engine(self, data: bytes):
        try:
            plan = json.loads(bytes(data))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None  # TensorRT logs an error and returns None for a plan it cannot read
        if not isinstance(plan, dict) or "fake_tensorrt_plan" not in plan:
            return None
        CALLS.append(("deserialize_cuda_engine", plan["fake_tensorrt_plan"]))
        return CudaEngine(plan)


class CudaEngine:
    def __init__(self, plan: dict):
        self.graph = plan["fake_tensorrt_plan"]
        self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
        self.profiles = [{name: [tuple(shape) for shape in shapes] for name, shapes in profile.items()}
                         for profile in plan["profiles"]]
        self.tensors = {node.name: (TensorIOMode.INPUT, ONNX_TO_DATATYPE[node.type])
                        for node in self.session.get_inputs()}
        self.tensors.update({node.name: (TensorIOMode.OUTPUT, ONNX_TO_DATATYPE[node.type])
                             for node in self.session.get_outputs()})
        self.output_shapes: dict[tuple, dict[str, tuple]] = {}

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def get_tensor_name(self, index: int) -> str:
        return list(self.tensors)[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.tensors[name][0] if name in self.tensors else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.tensors[name][1]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple]:
        return self.profiles[profile_index][name]

    def create_execution_context(self):
        CALLS.append(("create_execution_context", self.graph))
        return ExecutionContext(self)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


class ExecutionContext:
    def __init__(self, engine: CudaEngine):
        self.engine = engine
        self.profile = 0
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        CALLS.append(("set_optimization_profile_async", self.engine.graph, profile_index, stream_handle))
        if not 0 <= profile_index < len(self.engine.profiles):
            return False
        self.profile, self.shapes = profile_index, {}
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(size) for size in shape)
        CALLS.append(("set_input_shape", self.engine.graph, self.profile, name, shape))
        low, _, high = self.engine.profiles[self.profile][name]
        if len(shape) != len(low) or not all(a <= s <= b for a, s, b in zip(low, shape, high)):
            return False  # TensorRT refuses a shape outside the context's profile
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        CALLS.append(("set_tensor_address", self.engine.graph, self.profile, name, int(address)))
        self.addresses[name] = int(address)
        return name in self.engine.tensors

    def get_tensor_shape(self, name: str) -> tuple:
        if self.engine.tensors[name][0] is TensorIOMode.INPUT:
            return self.shapes[name]
        key = tuple(sorted(self.shapes.items()))
        if key not in self.engine.output_shapes:  # run once on zeros to learn the output shapes
            zeros = {input_name: np.zeros(self.shapes[input_name], NUMPY_DTYPES[dtype.name])
                     for input_name, (mode, dtype) in self.engine.tensors.items() if mode is TensorIOMode.INPUT}
            names = [name for name, (mode, _) in self.engine.tensors.items() if mode is TensorIOMode.OUTPUT]
            self.engine.output_shapes[key] = dict(zip(names, (o.shape for o in self.engine.run(zeros))))
        return self.engine.output_shapes[key][name]

    def execute_async_v3(self, stream_handle: int) -> bool:
        CALLS.append(("execute_async_v3", self.engine.graph, self.profile, stream_handle))
        LAST_EXECUTED[:] = [self, dict(self.addresses), dict(self.shapes)]
        return self.run_with(self.addresses, self.shapes)

    def run_with(self, addresses: dict[str, int], shapes: dict[str, tuple]) -> bool:
        """Run the graph on the tensors at ``addresses`` with input ``shapes`` (what a captured launch runs)."""
        inputs = [name for name, (mode, _) in self.engine.tensors.items() if mode is TensorIOMode.INPUT]
        if set(shapes) != set(inputs) or set(addresses) != set(self.engine.tensors):
            return False  # TensorRT refuses to run with a shape or an address unset
        feeds = {name: _host_array(addresses[name], shapes[name], self.engine.tensors[name][1]).copy()
                 for name in inputs}
        names = [name for name, (mode, _) in self.engine.tensors.items() if mode is TensorIOMode.OUTPUT]
        for name, output in zip(names, self.engine.run(feeds)):
            _host_array(addresses[name], output.shape, self.engine.tensors[name][1])[...] = output
        return True


def _host_array(address: int, shape: tuple, dtype: DataType) -> np.ndarray:
    """A numpy view of host memory at ``address`` (the fake's "device" memory is the CPU's)."""
    numpy_dtype = np.dtype(NUMPY_DTYPES[dtype.name])
    count = int(np.prod(shape, dtype=np.int64))
    buffer = (ctypes.c_char * (count * numpy_dtype.itemsize)).from_address(address)
    return np.frombuffer(buffer, dtype=numpy_dtype).reshape(shape)
