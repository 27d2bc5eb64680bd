"""What a TensorRT plan can serve, decided without TensorRT or a GPU: which optimisation profile and batch bucket
run a call, whether its shapes fit, whether a plan matches its manifest, and what this machine lacks.

A plan (``ldm-export --backend tensorrt``, ``ldm_export/tensorrt_build.py``) holds one or more optimisation profiles;
each gives every input a min / opt / max shape. A call of B rows is padded with copies of its last row up to a
batch bucket: the powers of two inside a profile's batch range, and the range's maximum. Buffers and CUDA graphs
are made once per (profile, bucket, other axes), so a handful of shapes serve every batch.

Imports the library's manifest only; ``tensorrt_missing`` and ``gpu_identity`` import tensorrt and torch, lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from ldm_runtime.errors import EngineDirError, OutOfRangeError
from ldm_runtime.manifest import GraphEntry

POWERS_OF_TWO = tuple(2**power for power in range(11))  # 1 .. 1024 UNet rows
INSTALL_HINT = "pip install 'ldm-runtime[tensorrt]'"
REBUILD_HINT = "rebuild them here with `ldm-export --rebuild-plans ENGINE_DIR`"
# TensorRT's DataType member names -> the numpy dtype names the manifest uses
TENSORRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT64": "int64", "INT32": "int32", "BOOL": "bool"}

Shape = tuple[int, ...]


def tensorrt_missing(what: str = "--backend tensorrt") -> str | None:
    """One line saying what this machine lacks for ``what`` (the tensorrt package, or a CUDA GPU), or None when it
    has both. torch is imported only once tensorrt has imported."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"{what} needs the tensorrt Python package ({INSTALL_HINT}), which is not installed here"
    try:
        import torch
    except ImportError:
        return f"{what} needs torch with CUDA (it holds the GPU buffers), which is not installed here"
    if not torch.cuda.is_available():
        return f"{what} needs a CUDA GPU, and none is visible on this machine"
    return None


def gpu_identity(device_index: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of CUDA device ``device_index``: what a plan is built for."""
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return torch.cuda.get_device_name(device_index), f"{major}.{minor}"


@dataclass(frozen=True)
class PlanProfile:
    """One optimisation profile of a plan: input name -> (min, opt, max) shape."""

    shapes: Mapping[str, tuple[Shape, Shape, Shape]]

    @property
    def batch_range(self) -> tuple[int, int]:
        """(fewest, most) rows every input accepts on its first axis."""
        return (max(low[0] for low, _, _ in self.shapes.values()), min(high[0] for _, _, high in self.shapes.values()))

    def batch_buckets(self, buckets: Iterable[int] = POWERS_OF_TWO) -> tuple[int, ...]:
        """The batch sizes calls are padded to: ``buckets`` inside the batch range, then its maximum."""
        low, high = self.batch_range
        return tuple(sorted({bucket for bucket in buckets if low <= bucket < high} | {high}))

    def accepts(self, shapes: Mapping[str, Shape]) -> bool:
        """Whether every input shape lies between this profile's min and max, axis by axis."""
        if set(shapes) != set(self.shapes):
            return False
        for name, shape in shapes.items():
            low, _, high = self.shapes[name]
            if len(shape) != len(low) or not all(a <= s <= b for a, s, b in zip(low, shape, high)):
                return False
        return True

    def describe(self, name: str) -> str:
        """Input ``name``'s range, axis by axis: "(1..8, 4, 8..16, 8..16)"."""
        low, _, high = self.shapes[name]
        return "(" + ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in zip(low, high)) + ")"


@dataclass(frozen=True)
class CallPlan:
    """How one call runs: the profile (and its execution context), and the batch its inputs are padded to."""

    profile: int
    bucket: int
    shapes: dict[str, Shape]  # the padded input shapes the context is given


def plan_call(graph: str, profiles: list[PlanProfile], shapes: Mapping[str, Shape],
              buckets: Iterable[int] = POWERS_OF_TWO) -> CallPlan:
    """The smallest bucket (then the first profile) that serves inputs of these ``shapes`` (all B rows on their
    first axis), with every input padded to it. ``OutOfRangeError`` naming the first input that no profile takes,
    its shape and the plan's range for it; ``ValueError`` if the inputs disagree on B."""
    rows = {shape[0] for shape in shapes.values()}
    if len(rows) != 1:
        raise ValueError(f"{graph} inputs have different batch sizes {sorted(rows)}; expected one")
    (batch,) = rows
    buckets = tuple(buckets)
    candidates = []
    for index, profile in enumerate(profiles):
        for bucket in profile.batch_buckets(buckets):
            padded = {name: (bucket, *shape[1:]) for name, shape in shapes.items()}
            if bucket >= batch and profile.accepts(padded):
                candidates.append((bucket, index, padded))
                break
    if candidates:
        bucket, index, padded = min(candidates, key=lambda candidate: candidate[:2])
        return CallPlan(profile=index, bucket=bucket, shapes=padded)
    raise OutOfRangeError(shape_error(graph, profiles, shapes))


def shape_error(graph: str, profiles: list[PlanProfile], shapes: Mapping[str, Shape]) -> str:
    """One sentence naming the first input whose shape no profile takes, and the ranges the plan has for it."""
    for name, shape in shapes.items():
        if not any(name in profile.shapes and _within(shape, profile.shapes[name]) for profile in profiles):
            ranges = " or ".join(profile.describe(name) for profile in profiles if name in profile.shapes)
            return (f"{graph} input {name} has shape {tuple(shape)}, outside the TensorRT plan's range "
                    f"{ranges or '(none: the plan has no such input)'}; re-export with a wider --batch-range or "
                    f"--size-range")
    return f"{graph} inputs of shapes {dict(shapes)} fit no single optimisation profile of the TensorRT plan"


def _within(shape: Shape, profile: tuple[Shape, Shape, Shape]) -> bool:
    low, _, high = profile
    return len(shape) == len(low) and all(a <= s <= b for a, s, b in zip(low, shape, high))


def check_plan_tensors(where: str, graph: GraphEntry, tensors: Mapping[str, tuple[str, str]]) -> None:
    """``EngineDirError`` unless the plan's I/O tensors (name -> ("INPUT" or "OUTPUT", TensorRT DataType name))
    are the manifest's inputs and outputs, with the same dtypes: tensors are bound by these names."""
    expected = {spec.name: ("INPUT", spec.dtype) for spec in graph.inputs}
    expected.update({spec.name: ("OUTPUT", spec.dtype) for spec in graph.outputs})
    found = {name: (mode, TENSORRT_DTYPES.get(dtype, dtype)) for name, (mode, dtype) in tensors.items()}
    if found != expected:
        differing = sorted(set(found.items()) ^ set(expected.items()))
        raise EngineDirError(f"{where} has I/O tensors {sorted(found.items())}, not the manifest's "
                             f"{sorted(expected.items())} (they differ in {differing[0][0]!r}); "
                             f"{REBUILD_HINT}")


def missing_plans(plans: Mapping[str, object], graphs: Iterable[str]) -> list[str]:
    """The graphs that have no plan."""
    return [name for name in graphs if name not in plans]
