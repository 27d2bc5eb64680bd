"""Fused (flash-style) attention forward for self- and cross-attention.

One program owns BLOCK_M query rows of one (batch, head) and makes one pass over the keys in
blocks of BLOCK_N, keeping the running row maximum, the running softmax denominator and the
unnormalised output in fp32 (the online softmax of Milakov & Gimelshein / FlashAttention). The head
dimension is padded to the next power of two inside the kernel (tl.arange needs one) and masked,
so SD's head sizes 40, 80 and 160 run as 64, 128 and 256 lanes.

Keys masked out by ``key_padding_mask`` get zero weight. A batch element whose keys are *all*
masked has no softmax to take; both implementations return zeros for its queries instead of NaN.

``attention_reference`` is the plain PyTorch definition the kernel must match; ``ldm::attention`` is
the torch.library op around the launcher (forward only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # Triton ships for Linux only; the reference path works without it
    triton = tl = None

    def jit(fn):
        return fn

MAX_HEAD_DIM = 256  # the padded head dimension of one program's q and accumulator tiles


def check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         key_padding_mask: torch.Tensor | None) -> None:
    """Raises ValueError, in one sentence, for arguments neither implementation accepts."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-D q, k, v of shape (B, H, L, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    batch, heads, _, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, heads) or k.shape[3] != head_dim:
        raise ValueError(f"attention k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
                         f"({batch}, {heads}, Lk, {head_dim}) to match q {tuple(q.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (batch, k.shape[2])
                                         or key_padding_mask.device != q.device):
        raise ValueError(f"attention key_padding_mask must be bool of shape ({batch}, {k.shape[2]}) on "
                         f"{q.device}, got {key_padding_mask.dtype} of shape {tuple(key_padding_mask.shape)} "
                         f"on {key_padding_mask.device}")


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D); key_padding_mask: (B, Lk) bool, True = attend.
    Returns (B, H, Lq, D) in q's dtype; zeros for a batch element whose keys are all masked."""
    check_attention_args(q, k, v, key_padding_mask)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    attend = key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=scale)
    return torch.where(attend.any(dim=-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))


@jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mask_b, stride_mask_n,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, num_query_blocks, query_len, key_len, head_dim, qk_scale_log2e,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One flat grid axis (2**31 programs, where a second axis stops at 65535), query blocks fastest
    # so that the programs reading one (batch, head)'s keys run together.
    query_block = tl.program_id(0) % num_query_blocks
    batch_head = tl.program_id(0) // num_query_blocks
    batch = (batch_head // num_heads).to(tl.int64)  # batch * stride overflows int32 on large tensors
    head = (batch_head % num_heads).to(tl.int64)
    q_ptr += batch * stride_qb + head * stride_qh
    k_ptr += batch * stride_kb + head * stride_kh
    v_ptr += batch * stride_vb + head * stride_vh
    out_ptr += batch * stride_ob + head * stride_oh
    mask_ptr += batch * stride_mask_b

    rows = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_valid = rows < query_len
    dim_valid = dims < head_dim
    q = tl.load(q_ptr + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # in log2 units
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for key_start in range(0, key_len, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        key_in_range = keys < key_len
        attend = key_in_range
        if HAS_MASK:
            attend = attend & (tl.load(mask_ptr + keys * stride_mask_n, mask=key_in_range, other=0) != 0)
        k_t = tl.load(k_ptr + keys[None, :] * stride_kn + dims[:, None] * stride_kd,
                      mask=key_in_range[None, :] & dim_valid[:, None], other=0.0)
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale_log2e
        scores = tl.where(attend[None, :], scores, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # A row with no attended key yet has max -inf; shifting by 0 keeps exp2 at 0 instead of NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        weights = tl.exp2(scores - shift[:, None])
        rescale = tl.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(weights, axis=1)
        v = tl.load(v_ptr + keys[:, None] * stride_vn + dims[None, :] * stride_vd,
                    mask=key_in_range[:, None] & dim_valid[None, :], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]  # all keys masked -> zeros
    tl.store(out_ptr + rows[:, None] * stride_om + dims[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])


def _launch_config(padded_head_dim: int, element_size: int, interpreted: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by the padded head dimension and the element size."""
    if interpreted:
        return 32, 32, 4, 1  # each program is a numpy loop: few, mid-sized blocks are fastest
    # Chosen so that ptxas reports no register spills for sm_80 and sm_90 (fp32 tiles also fit an
    # A100's shared memory); fp32 is the correctness path, fp16/bf16 the fast one.
    if element_size == 4:
        if padded_head_dim <= 64:
            return 32, 32, 4, 2
        if padded_head_dim <= 128:
            return 32, 32, 8, 2
        return 32, 16, 8, 2
    if padded_head_dim <= 64:
        return 128, 64, 4, 3
    if padded_head_dim <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Launches the Triton kernel. q: (B, H, Lq, D), k/v: (B, H, Lk, D), fp32/fp16/bf16, any strides;
    key_padding_mask: (B, Lk) bool (True = attend). Returns (B, H, Lq, D) in q's dtype.

    ``out`` ((B, H, Lq, D), q's dtype, any strides) receives the result when given; ``block_m`` and
    ``block_n`` (powers of two >= 16) override the tile sizes, which tests use to reach every edge.
    """
    assert triton is not None, "attention_triton needs Triton"
    check_attention_args(q, k, v, key_padding_mask)
    batch, heads, query_len, head_dim = q.shape
    key_len = k.shape[2]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"attention head dim {head_dim} exceeds the Triton kernel's maximum {MAX_HEAD_DIM}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == q.dtype
    if out.numel() == 0:
        return out

    padded_head_dim = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    default_m, default_n, num_warps, num_stages = _launch_config(
        padded_head_dim, q.element_size(), q.device.type == "cpu")
    block_m, block_n = block_m or default_m, block_n or default_n
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    # bool and uint8 share a byte layout; the view avoids loading i1 pointers
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    mask_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    num_query_blocks = triton.cdiv(query_len, block_m)
    _attention_forward_kernel[(num_query_blocks * batch * heads,)](
        q, k, v, mask, out,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        heads, num_query_blocks, query_len, key_len, head_dim, scale * math.log2(math.e),
        HAS_MASK=key_padding_mask is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32, not TF32
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=padded_head_dim,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


@torch.library.custom_op("ldm::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                 scale: float | None) -> torch.Tensor:
    """The Triton attention forward as an opaque op for eager mode and torch.compile."""
    return attention_triton(q, k, v, key_padding_mask, scale)


@attention_op.register_fake
def _attention_fake(q, k, v, key_padding_mask, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
