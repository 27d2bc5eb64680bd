"""The Triton flash-style attention forward against a float64 reference, and its torch.library op."""

from __future__ import annotations

import pytest
import torch

import ldm_kernels
from ldm_kernels.attention import attention_op, attention_reference, attention_triton

# (batch, heads, query_len, key_len, head_dim, mask, layout, launch overrides); interpreter-sized.
# "bshd" builds q/k/v/out as (B, L, H, D) memory seen through a transpose, as a model's projections give them.
CASES = {
    "self_d40_lq_not_block_multiple": (1, 2, 70, 70, 40, "none", "bhsd", {}),
    "cross_d64_77_text_tokens_masked": (2, 2, 50, 77, 64, "padding", "bhsd", {}),
    "cross_d80_strided_bshd": (2, 2, 33, 77, 80, "none", "bshd", {}),
    "cross_d160_masked": (1, 2, 40, 77, 160, "padding", "bhsd", {}),
    "single_key": (2, 2, 45, 1, 64, "none", "bhsd", {}),
    "small_blocks_many_key_blocks": (1, 1, 37, 61, 40, "padding", "bshd", {"block_m": 16, "block_n": 16}),
}


def make_qkv(batch, heads, query_len, key_len, head_dim, layout, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)

    def tensor(length):
        if layout == "bshd":
            return torch.randn(batch, length, heads, head_dim, generator=generator).to(device, dtype).transpose(1, 2)
        return torch.randn(batch, heads, length, head_dim, generator=generator).to(device, dtype)

    return tensor(query_len), tensor(key_len), tensor(key_len)


def make_padding_mask(batch, key_len, device, seed):
    """(B, Lk) bool, True = attend: about 70% of keys at random, key 0 always (no fully masked row)."""
    mask = torch.rand(batch, key_len, generator=torch.Generator().manual_seed(seed)) < 0.7
    mask[:, 0] = True
    return mask.to(device)


def poisoned_output(q, layout):
    batch, heads, query_len, head_dim = q.shape
    shape = (batch, query_len, heads, head_dim) if layout == "bshd" else q.shape
    out = torch.full(shape, float("nan"), dtype=q.dtype, device=q.device)
    return out.transpose(1, 2) if layout == "bshd" else out


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_attention_triton_writes_every_element_within_twice_pytorch_error(
        case, dtype, device, triton_path, assert_within_twice_pytorch_error):
    batch, heads, query_len, key_len, head_dim, mask_kind, layout, launch = case
    q, k, v = make_qkv(batch, heads, query_len, key_len, head_dim, layout, dtype, device, seed=head_dim + key_len)
    mask = make_padding_mask(batch, key_len, device, seed=key_len) if mask_kind == "padding" else None
    poisoned = poisoned_output(q, layout)  # an element the kernel skips stays NaN

    out = attention_triton(q, k, v, mask, out=poisoned, **launch)

    exact = attention_reference(q.double(), k.double(), v.double(), mask)
    assert out.data_ptr() == poisoned.data_ptr()
    assert_within_twice_pytorch_error(out, exact, attention_reference(q, k, v, mask))


def test_attention_triton_honours_an_explicit_scale(device, triton_path, assert_within_twice_pytorch_error):
    q, k, v = make_qkv(1, 2, 20, 30, 64, "bhsd", torch.float32, device, seed=1)

    out = attention_triton(q, k, v, scale=0.5)

    exact = attention_reference(q.double(), k.double(), v.double(), scale=0.5)
    assert_within_twice_pytorch_error(out, exact, attention_reference(q, k, v, scale=0.5))
    default_scale = attention_reference(q.double(), k.double(), v.double())
    assert (exact - default_scale).abs().max() > 1e-2  # the scale changes the answer, so the test can fail


@pytest.mark.parametrize("implementation", ["reference", "triton"])
def test_attention_batch_element_with_every_key_masked_returns_zeros(
        implementation, dtype, device, request, assert_within_twice_pytorch_error):
    if implementation == "triton":
        request.getfixturevalue("triton_path")
    q, k, v = make_qkv(2, 2, 19, 77, 40, "bhsd", dtype, device, seed=2)
    mask = make_padding_mask(2, 77, device, seed=2)
    mask[0] = False
    run = attention_triton if implementation == "triton" else attention_reference

    out = run(q, k, v, mask)

    assert torch.equal(out[0], torch.zeros_like(out[0]))
    exact = attention_reference(q[1:].double(), k[1:].double(), v[1:].double(), mask[1:])
    assert_within_twice_pytorch_error(out[1:], exact, attention_reference(q[1:], k[1:], v[1:], mask[1:]))


def test_attention_op_passes_torch_library_opcheck(device, triton_path):
    q, k, v = make_qkv(1, 2, 20, 9, 40, "bhsd", torch.float32, device, seed=4)
    mask = make_padding_mask(1, 9, device, seed=4)
    torch.library.opcheck(attention_op, (q, k, v, mask, None))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.gpu)])
def test_attention_compiles_fullgraph_on_triton_path(backend, device, triton_path, monkeypatch):
    monkeypatch.setenv("LDM_KERNELS", "triton")
    q, k, v = make_qkv(2, 2, 24, 77, 40, "bhsd", torch.float32, device, seed=6)
    mask = make_padding_mask(2, 77, device, seed=6)

    def cross_attention(q, k, v, mask):
        return ldm_kernels.attention(q * 2, k, v, mask).transpose(1, 2).flatten(2)

    torch._dynamo.reset()
    compiled = torch.compile(cross_attention, backend=backend, fullgraph=True)

    torch.testing.assert_close(compiled(q, k, v, mask), cross_attention(q, k, v, mask))


def test_attention_rejects_key_value_shape_mismatch(device):
    q, k, v = make_qkv(1, 2, 8, 8, 40, "bhsd", torch.float32, device, seed=8)
    with pytest.raises(ValueError, match=r"k \(1, 2, 8, 40\) and v \(1, 2, 7, 40\)"):
        ldm_kernels.attention(q, k, v[:, :, :7])


def test_attention_rejects_a_float_padding_mask(device):
    q, k, v = make_qkv(1, 2, 8, 8, 40, "bhsd", torch.float32, device, seed=9)
    with pytest.raises(ValueError, match="key_padding_mask must be bool of shape"):
        ldm_kernels.attention(q, k, v, torch.ones(1, 8, device=device))


def test_attention_triton_rejects_head_dim_above_256(device, triton_path):
    q, k, v = make_qkv(1, 1, 4, 4, 264, "bhsd", torch.float32, device, seed=10)
    with pytest.raises(ValueError, match="head dim 264 exceeds"):
        attention_triton(q, k, v)


@pytest.mark.gpu
def test_attention_offsets_past_int32_range_stay_correct(device):
    # q and out hold 2**31 + 2**27 fp16 elements: batch * stride_b overflows int32 for the last batch elements.
    q = torch.zeros(544, 16, 4096, 64, dtype=torch.float16, device=device)
    q[-2:].normal_()
    k = torch.randn(544, 16, 77, 64, dtype=torch.float16, device=device)
    v = torch.randn_like(k)

    out = attention_triton(q, k, v)

    exact = attention_reference(q[-2:].double(), k[-2:].double(), v[-2:].double())
    pytorch = attention_reference(q[-2:], k[-2:], v[-2:])
    error, pytorch_error = (out[-2:].double() - exact).abs().max(), (pytorch.double() - exact).abs().max()
    assert error <= 2 * pytorch_error


SD15_SHAPES = [(4096, 4096, 40), (4096, 77, 40), (1024, 1024, 80), (256, 77, 160), (64, 64, 160)]


@pytest.mark.gpu
@pytest.mark.parametrize("query_len,key_len,head_dim", SD15_SHAPES, ids=[f"{q}x{k}_d{d}" for q, k, d in SD15_SHAPES])
def test_attention_triton_at_sd15_unet_shapes_with_default_tiles(
        query_len, key_len, head_dim, dtype, device, assert_within_twice_pytorch_error):
    q, k, v = make_qkv(2, 8, query_len, key_len, head_dim, "bshd", dtype, device, seed=query_len + head_dim)

    out = attention_triton(q, k, v)

    exact = attention_reference(q.double(), k.double(), v.double())
    assert_within_twice_pytorch_error(out, exact, attention_reference(q, k, v))
