"""Which implementation ldm_kernels.group_norm / ldm_kernels.attention run, under each LDM_KERNELS value."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import ldm_kernels
from ldm_kernels import dispatch
from ldm_kernels.attention import attention_reference
from ldm_kernels.group_norm import group_norm_reference

REPO_ROOT = Path(__file__).resolve().parents[2]


class TritonOpSpy:
    """Stands in for a torch.ops.ldm op: records that dispatch chose it and returns a marker."""

    def __init__(self):
        self.calls = 0

    def __call__(self, first, *args):
        self.calls += 1
        return torch.full_like(first, 7.0)


@pytest.fixture
def spies(monkeypatch):
    group_norm_spy, attention_spy = TritonOpSpy(), TritonOpSpy()
    monkeypatch.setattr(dispatch, "group_norm_op", group_norm_spy)
    monkeypatch.setattr(dispatch, "attention_op", attention_spy)
    return group_norm_spy, attention_spy


def small_inputs(device):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 5, generator=generator).to(device)
    q, k, v = (torch.randn(1, 2, length, 16, generator=generator).to(device) for length in (6, 9, 9))
    return x, q, k, v


def call_both(x, q, k, v):
    return ldm_kernels.group_norm(x, 2, None, None, activation="silu"), ldm_kernels.attention(q, k, v)


def test_auto_runs_the_reference_on_cpu_tensors(spies):
    x, q, k, v = small_inputs("cpu")

    normed, attended = call_both(x, q, k, v)

    assert [spy.calls for spy in spies] == [0, 0]
    assert torch.equal(normed, group_norm_reference(x, 2, None, None, 1e-5, "silu"))
    assert torch.equal(attended, attention_reference(q, k, v))


@pytest.mark.gpu
def test_auto_runs_the_triton_ops_on_cuda_tensors(spies, device):
    call_both(*small_inputs(device))
    assert [spy.calls for spy in spies] == [1, 1]


def test_ldm_kernels_is_read_on_every_call(spies, device, triton_path, monkeypatch):
    inputs = small_inputs(device)
    monkeypatch.setenv("LDM_KERNELS", "reference")
    call_both(*inputs)
    assert [spy.calls for spy in spies] == [0, 0]

    monkeypatch.setenv("LDM_KERNELS", "triton")
    normed, attended = call_both(*inputs)

    assert [spy.calls for spy in spies] == [1, 1]
    assert (normed == 7).all() and (attended == 7).all()


def inputs_the_kernels_cannot_take(device):
    """(description, call) pairs: float64, a head dim over 256, attention inputs that need gradients."""
    x, q, k, v = small_inputs(device)
    wide = torch.randn(1, 2, 6, 264, device=device)
    q_grad = q.clone().requires_grad_()
    return [
        ("float64", lambda: ldm_kernels.group_norm(x.double(), 2, None, None)),
        ("head dim 264", lambda: ldm_kernels.attention(wide, wide, wide)),
        ("needs gradients", lambda: ldm_kernels.attention(q_grad, k, v)),
    ]


def test_triton_forced_rejects_inputs_the_kernels_cannot_take(spies, device, triton_path, monkeypatch):
    monkeypatch.setenv("LDM_KERNELS", "triton")
    for description, call in inputs_the_kernels_cannot_take(device):
        with pytest.raises(ValueError, match=f"LDM_KERNELS=triton cannot run .*{description}"):
            call()
    assert [spy.calls for spy in spies] == [0, 0]


@pytest.mark.parametrize("backend", [None, "reference", "triton"])
def test_integer_tensors_are_refused_by_every_backend(backend, device):
    x = torch.arange(2 * 4 * 9, device=device).reshape(2, 4, 3, 3)  # the reference truncated its result
    q = torch.ones(1, 1, 3, 8, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="floating-point tensors, not torch.int64"):
        ldm_kernels.group_norm(x, 2, None, None, backend=backend)
    with pytest.raises(ValueError, match="floating-point tensors, not torch.int64"):
        ldm_kernels.attention(q, q, q, backend=backend)


def test_bfloat16_under_the_interpreter_goes_to_the_reference_or_is_refused(triton_path, device):
    if device.type == "cuda":
        pytest.skip("the compiled kernels take bfloat16")
    q, k, v = (torch.randn(1, 2, 10, 40).bfloat16() for _ in range(3))  # the interpreted kernel returned ~1e8
    assert torch.equal(ldm_kernels.attention(q, k, v), attention_reference(q, k, v))
    with pytest.raises(ValueError, match="bfloat16 tensors under Triton's interpreter"):
        ldm_kernels.attention(q, k, v, backend="triton")


@pytest.mark.parametrize("call, message", [
    (lambda: ldm_kernels.attention(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0)), "expects 4-D q, k, v"),
    (lambda: ldm_kernels.group_norm(torch.ones(1, 4, 2, 2), 0, None, None), "num_groups is 0; expected a positive"),
    (lambda: ldm_kernels.group_norm(torch.ones(1, 4, 2, 2), 2.0, None, None), "num_groups is 2.0; expected a"),
])
def test_malformed_arguments_are_one_sentence(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_pin_to_triton_leaves_only_attention_wider_than_the_kernel_on_the_reference(triton_path, device):
    from ldm_runtime.models.attention import Attention, SpatialSelfAttention

    torch.manual_seed(0)
    wide = SpatialSelfAttention(512, 32, 1e-6).to(device).eval()  # an SD autoencoder's mid-block attention
    narrow = Attention(64, heads=2, head_dim=32).to(device).eval()
    model = torch.nn.ModuleDict({"wide": wide, "narrow": narrow})
    dispatch.use_backend(model, "triton")
    assert (wide.kernel_backend, wide.group_norm.kernel_backend, narrow.kernel_backend) == (
        "reference", "triton", "triton")
    pixels = torch.randn(1, 512, 3, 3, device=device)
    with torch.no_grad():
        pinned = wide(pixels)  # raised "cannot run attention with head dim 512"
        dispatch.use_backend(model, "reference")
        reference = wide(pixels)
    torch.testing.assert_close(pinned, reference, rtol=1e-5, atol=1e-5)
    dispatch.use_backend(model, None)
    assert (wide.kernel_backend, narrow.kernel_backend) == (None, None)


@pytest.mark.gpu
def test_auto_sends_inputs_the_kernels_cannot_take_to_the_reference(spies, device):
    for _, call in inputs_the_kernels_cannot_take(device):
        assert not (call() == 7).all()
    assert [spy.calls for spy in spies] == [0, 0]


def test_unknown_ldm_kernels_raises_value_error_naming_it_and_the_choices(monkeypatch):
    monkeypatch.setenv("LDM_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"LDM_KERNELS='cuda' is not one of auto, reference, triton"):
        call_both(*small_inputs("cpu"))


def test_reference_path_records_only_plain_torch_ops(monkeypatch):
    # What ONNX export traces on CPU: no ldm:: op may reach the graph under the default setting.
    def ldm_ops_in_graph():
        graph = make_fx(call_both)(*small_inputs("cpu")).graph
        return {str(node.target) for node in graph.nodes if str(node.target).startswith("ldm.")}

    assert ldm_ops_in_graph() == set()
    if dispatch.kernels_interpreted():  # the same trace on the triton path does record them
        monkeypatch.setenv("LDM_KERNELS", "triton")
        assert ldm_ops_in_graph() == {"ldm.group_norm.default", "ldm.attention.default"}


def run_python(code: str, **env_overrides: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for name, value in env_overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_triton_forced_on_cpu_without_the_interpreter_fails_in_one_sentence():
    result = run_python("""
        import torch, ldm_kernels
        ldm_kernels.group_norm(torch.randn(1, 4, 3, 3), 2, None, None)
    """, LDM_KERNELS="triton", TRITON_INTERPRET=None)

    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == ("RuntimeError: LDM_KERNELS=triton cannot run on a cpu tensor unless "
                         "TRITON_INTERPRET=1 is set before ldm_kernels is imported")


def test_kernels_import_and_run_the_reference_without_triton_installed():
    result = run_python("""
        import sys
        sys.modules["triton"] = None  # what a platform without Triton wheels looks like to an import
        import os, torch, ldm_kernels
        from ldm_kernels.group_norm import group_norm_reference
        x = torch.randn(1, 4, 3, 3)
        assert torch.equal(ldm_kernels.group_norm(x, 2, None, None), group_norm_reference(x, 2, None, None))
        os.environ["LDM_KERNELS"] = "triton"
        ldm_kernels.group_norm(x, 2, None, None)
    """, LDM_KERNELS=None)

    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "RuntimeError: LDM_KERNELS=triton but the triton package is not installed")
