"""The TensorRT builder's optimisation profiles and its one-line refusals (tensorrt is absent here)."""

import sys

import pytest

from ldm_export.engine_dir import ExportOptions, check_options, default_backend
from ldm_export.errors import ExportError
from ldm_export.tensorrt_build import _profile_shape, tensorrt_missing
from ldm_runtime.manifest import DimRange

DIMS = {"batch": DimRange(1, 2, 8), "latent_height": DimRange(8, 8, 16, 2), "latent_width": DimRange(8, 12, 16, 2)}


@pytest.mark.parametrize("which, expected", [("min", (1, 4, 8, 8)), ("opt", (2, 4, 8, 12)), ("max", (8, 4, 16, 16))])
def test_profile_shapes_come_from_the_export_ranges(which, expected):
    assert _profile_shape(["batch", 4, "latent_height", "latent_width"], DIMS, which) == expected


def test_without_tensorrt_the_backend_is_refused_in_one_line_and_onnxruntime_is_the_default(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    message = tensorrt_missing()
    assert message.startswith("--backend tensorrt needs the tensorrt Python package") and "\n" not in message
    assert default_backend() == "onnxruntime"
    with pytest.raises(ExportError, match="tensorrt Python package"):
        check_options(ExportOptions(backend="tensorrt"))


def test_without_a_gpu_the_backend_is_refused_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", type(sys)("tensorrt"))  # a tensorrt that imports
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert tensorrt_missing() == "--backend tensorrt needs a CUDA GPU, and none is visible on this machine"
