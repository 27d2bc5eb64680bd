"""The Triton GroupNorm(+SiLU) against a float64 reference, its autograd formula, and its torch.library op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ldm_kernels
from ldm_kernels.group_norm import group_norm_op, group_norm_reference, group_norm_triton

# (shape, groups, activation, affine, launch overrides); interpreter-sized, each one edge of the kernel.
CASES = {
    "8x8_silu": ((2, 8, 8, 8), 4, "silu", "both", {}),
    "17x23_partial_blocks_three_chunks": ((1, 6, 17, 23), 3, "silu", "both",
                                          {"block_size": 128, "chunks_per_group": 3}),
    "96x96_few_channels": ((1, 4, 96, 96), 2, "silu", "both", {}),
    "one_group_no_affine": ((2, 6, 9, 7), 1, None, "none", {}),
    "channels_equal_groups_weight_only": ((2, 8, 5, 5), 8, "silu", "weight", {}),
    "many_groups": ((1, 64, 3, 3), 32, "silu", "both", {}),
    "sequence_bcl_bias_only": ((2, 16, 40), 4, None, "bias", {"block_size": 32, "chunks_per_group": 2}),
}


def make_inputs(shape, affine, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    x = (torch.randn(shape, generator=generator) * 3 + 1).to(device, dtype)
    weight = torch.randn(channels, generator=generator) + 1
    bias = torch.randn(channels, generator=generator)
    weight = weight.to(device, dtype) if affine in ("both", "weight") else None
    bias = bias.to(device, dtype) if affine in ("both", "bias") else None
    return x, weight, bias


def to_float64(tensor):
    return None if tensor is None else tensor.double()


def group_norm_in_dtype(x, groups, weight, bias, activation):
    """Plain PyTorch in x's precision: torch's group_norm, then silu as its own op."""
    out = F.group_norm(x, groups, weight, bias, 1e-5)
    return F.silu(out) if activation == "silu" else out


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_group_norm_triton_writes_every_element_within_twice_pytorch_error(
        case, dtype, device, triton_path, assert_within_twice_pytorch_error):
    shape, groups, activation, affine, launch = case
    x, weight, bias = make_inputs(shape, affine, dtype, device, seed=len(shape) * 100 + shape[1])
    poisoned = torch.full_like(x, float("nan"))  # an element the kernel skips stays NaN

    out = group_norm_triton(x, groups, weight, bias, 1e-5, activation, out=poisoned, **launch)

    exact = group_norm_reference(x.double(), groups, to_float64(weight), to_float64(bias), 1e-5, activation)
    assert out.data_ptr() == poisoned.data_ptr()
    assert_within_twice_pytorch_error(out, exact, group_norm_in_dtype(x, groups, weight, bias, activation))


def test_group_norm_triton_statistics_survive_a_large_mean(device, triton_path, assert_within_twice_pytorch_error):
    # E[x^2] - E[x]^2 in fp32 loses the variance (spread 3) under a mean of 3000; shifted M2 keeps it.
    x, weight, bias = make_inputs((2, 4, 16, 16), "both", torch.float32, device, seed=7)
    x = x + 3000

    out = group_norm_triton(x, 2, weight, bias, 1e-5, "silu", block_size=64)

    exact = group_norm_reference(x.double(), 2, weight.double(), bias.double(), 1e-5, "silu")
    assert_within_twice_pytorch_error(out, exact, group_norm_in_dtype(x, 2, weight, bias, "silu"))


@pytest.mark.parametrize("activation,affine", [("silu", "both"), (None, "none")])
def test_group_norm_op_backward_matches_float64_autograd(
        activation, affine, dtype, device, triton_path, assert_within_twice_pytorch_error):
    x, weight, bias = make_inputs((2, 6, 7, 5), affine, dtype, device, seed=11)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(12)).to(device, dtype)

    def gradients(function, x, weight, bias):
        x, weight, bias = (None if t is None else t.detach().requires_grad_() for t in (x, weight, bias))
        function(x, 3, weight, bias, 1e-5, activation).backward(grad_out.to(x.dtype))
        return [t.grad for t in (x, weight, bias) if t is not None]

    def triton_op(x, groups, weight, bias, eps, activation):
        return group_norm_op(x, groups, weight, bias, eps, activation == "silu")

    def pytorch_in_dtype(x, groups, weight, bias, eps, activation):
        return group_norm_in_dtype(x, groups, weight, bias, activation)

    kernel_grads = gradients(triton_op, x, weight, bias)
    exact_grads = gradients(group_norm_reference, x.double(), to_float64(weight), to_float64(bias))
    pytorch_grads = gradients(pytorch_in_dtype, x, weight, bias)
    for kernel_grad, exact_grad, pytorch_grad in zip(kernel_grads, exact_grads, pytorch_grads, strict=True):
        assert_within_twice_pytorch_error(kernel_grad, exact_grad, pytorch_grad)


def test_group_norm_op_passes_torch_library_opcheck(device, triton_path):
    x, weight, bias = make_inputs((2, 4, 3, 5), "both", torch.float32, device, seed=3)
    torch.library.opcheck(group_norm_op, (x.requires_grad_(), 2, weight, bias, 1e-5, True))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.gpu)])
def test_group_norm_compiles_fullgraph_on_triton_path_with_backward(backend, device, triton_path, monkeypatch):
    monkeypatch.setenv("LDM_KERNELS", "triton")
    x, weight, bias = make_inputs((2, 8, 6, 6), "both", torch.float32, device, seed=5)

    def block(x, weight, bias):
        return ldm_kernels.group_norm(x, 4, weight, bias, activation="silu") * 2 + 1

    torch._dynamo.reset()
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    x_compiled, x_eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_compiled, out_eager = compiled(x_compiled, weight, bias), block(x_eager, weight, bias)
    out_compiled.square().sum().backward()
    out_eager.square().sum().backward()

    torch.testing.assert_close(out_compiled, out_eager)
    # inductor fuses the backward's reductions in another order than eager: fp32 rounding, not a bug
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_group_norm_rejects_channels_not_divisible_by_groups(backend, device, monkeypatch, request):
    if backend == "triton":
        request.getfixturevalue("triton_path")
    monkeypatch.setenv("LDM_KERNELS", backend)
    with pytest.raises(ValueError, match="channels 6 are not divisible by num_groups 4"):
        ldm_kernels.group_norm(torch.randn(1, 6, 4, 4, device=device), 4, None, None)


def test_group_norm_rejects_unknown_activation(device):
    with pytest.raises(ValueError, match="activation 'gelu'"):
        ldm_kernels.group_norm(torch.randn(1, 4, 4, 4, device=device), 2, None, None, activation="gelu")


@pytest.mark.gpu
def test_group_norm_offsets_past_int32_range_stay_correct(device):
    # 2**31 + 2**27 fp16 elements: group * group_numel overflows int32 for the last batch element.
    x = torch.zeros(17, 32, 2048, 2048, dtype=torch.float16, device=device)
    x[-1].normal_()
    weight, bias = torch.randn(2, 32, dtype=torch.float16, device=device)

    out = group_norm_triton(x, 32, weight, bias, 1e-5, "silu")

    exact = group_norm_reference(x[-1:].double(), 32, weight.double(), bias.double(), 1e-5, "silu")
    pytorch = group_norm_in_dtype(x[-1:], 32, weight, bias, "silu")
    assert (out[-1:].double() - exact).abs().max() <= 2 * (pytorch.double() - exact).abs().max()


SD15_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SD15_SHAPES, ids=["x".join(map(str, shape)) for shape in SD15_SHAPES])
def test_group_norm_triton_at_sd15_unet_shapes_with_default_plan(
        shape, dtype, device, assert_within_twice_pytorch_error):
    x, weight, bias = make_inputs(shape, "both", dtype, device, seed=shape[1])
    poisoned = torch.full_like(x, float("nan"))

    out = group_norm_triton(x, 32, weight, bias, 1e-5, "silu", out=poisoned)

    exact = group_norm_reference(x.double(), 32, weight.double(), bias.double(), 1e-5, "silu")
    assert_within_twice_pytorch_error(out, exact, group_norm_in_dtype(x, 32, weight, bias, "silu"))
