"""Shared setup for the kernel tests: the device, the dtypes, and the float64 error rule.

On a CUDA machine the kernels run compiled on the GPU and bf16 joins the dtypes. Without CUDA they
run under Triton's interpreter, which needs TRITON_INTERPRET=1 in the environment before kernels is
imported (scripts/test.sh sets it); the interpreter has no bfloat16, so CPU runs cover fp32/fp16.
"""

from __future__ import annotations

import pytest
import torch

from ldm_kernels.dispatch import kernels_interpreted, triton_available

CUDA = torch.cuda.is_available() and not kernels_interpreted()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TRITON_REACHABLE = triton_available() and (CUDA or kernels_interpreted())
SKIP_REASON = "the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before ldm_kernels is imported"

# fp32 kernels and PyTorch sum in different orders; 64 fp32 ulps of the output's scale is rounding,
# not a bug, and stays far below any fp16/bf16 error.
FP32_ROUNDING_FLOOR = 64 * torch.finfo(torch.float32).eps


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") and not CUDA:
        pytest.skip("needs a CUDA device running the compiled kernels (TRITON_INTERPRET unset)")


def pytest_generate_tests(metafunc):
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])


@pytest.fixture(autouse=True)
def default_dispatch(monkeypatch):
    """Every test starts from LDM_KERNELS unset (auto), whatever the shell exported."""
    monkeypatch.delenv("LDM_KERNELS", raising=False)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def triton_path():
    """Skips the test where the Triton kernels cannot run."""
    if not TRITON_REACHABLE:
        pytest.skip(SKIP_REASON)


@pytest.fixture
def assert_within_twice_pytorch_error():
    """flash-attention's rule: ``out`` may be off the float64 ``exact`` by at most twice what plain
    PyTorch in the same precision (``pytorch``) is off by, plus FP32_ROUNDING_FLOOR x max|exact|."""

    def check(out: torch.Tensor, exact: torch.Tensor, pytorch: torch.Tensor) -> None:
        assert out.shape == exact.shape and out.dtype == pytorch.dtype
        assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} non-finite outputs"
        exact = exact.double()
        kernel_error = (out.double() - exact).abs().max().item()
        pytorch_error = (pytorch.double() - exact).abs().max().item()
        allowed = 2 * pytorch_error + FP32_ROUNDING_FLOOR * max(1.0, exact.abs().max().item())
        assert kernel_error <= allowed, (
            f"kernel error {kernel_error:.3g} exceeds {allowed:.3g} (PyTorch {out.dtype} error {pytorch_error:.3g})")

    return check
