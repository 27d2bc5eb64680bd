"""GroupNorm with optional fused SiLU.

In contiguous (B, C, *spatial) memory a group's channels are one contiguous run of
(C / groups) * spatial elements, so both kernels walk a group as a flat range:

1. ``_group_norm_partial_stats_kernel``, grid (B * groups, chunks): the count, mean and sum of
   squared deviations (M2) of one chunk of a group, in fp32: Welford's update per lane, the lanes
   merged with Chan et al.'s parallel formula (both stay accurate where sum-of-squares cancels).
   Every value is shifted by the group's first element before any sum, so a large common offset
   (a mean of thousands with a unit spread) costs no digits of the mean either.
2. ``_group_norm_apply_kernel``, same grid: merges its group's chunk statistics, then writes
   ``(x - mean) * rstd * weight + bias`` (and SiLU of it) for its chunk.

Splitting a group into chunks keeps the GPU busy when B * groups is small (64 programs for SD's
batch of 2 with 32 groups). ``group_norm_reference`` is the plain PyTorch definition the kernels must
match. ``ldm::group_norm`` is the torch.library op around the launcher; its backward is written in
plain PyTorch (see ``_group_norm_backward``).
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

ACTIVATIONS = (None, "silu")


def check_group_norm_args(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                          bias: torch.Tensor | None, activation: str | None) -> None:
    """Raises ValueError, in one sentence, for arguments neither implementation accepts."""
    if x.dim() < 2:
        raise ValueError(f"group_norm expects x of shape (B, C, *spatial), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"group_norm num_groups is {num_groups!r}; expected a positive integer")
    if channels % num_groups:
        raise ValueError(f"group_norm channels {channels} are not divisible by num_groups {num_groups}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and tuple(param.shape) != (channels,):
            raise ValueError(f"group_norm {name} has shape {tuple(param.shape)}, expected ({channels},)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm activation {activation!r} is not one of {ACTIVATIONS}")


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    activation: str | None = None,
) -> torch.Tensor:
    """x: (B, C, *spatial). Statistics in fp32 (float64 for float64 x); output in x's dtype.
    activation: None or "silu"."""
    check_group_norm_args(x, num_groups, weight, bias, activation)
    compute_dtype = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64 for tests
    out = F.group_norm(x.to(compute_dtype), num_groups, None if weight is None else weight.to(compute_dtype),
                       None if bias is None else bias.to(compute_dtype), eps)
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)


@jit
def _group_norm_partial_stats_kernel(
    x_ptr, stats_ptr,
    group_numel, chunk_numel, num_chunks,
    BLOCK: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)  # group * group_numel overflows int32 past 2**31 elements
    x_ptr += group * group_numel
    chunk_start = tl.program_id(1) * chunk_numel  # within a group offsets stay int32 (launcher checks)
    chunk_end = tl.minimum(chunk_start + chunk_numel, group_numel)
    pivot = tl.load(x_ptr).to(tl.float32)

    # Welford per lane: no cross-lane reduction inside the loop, so loads stream back to back.
    count = tl.zeros((BLOCK,), dtype=tl.float32)
    mean = tl.zeros((BLOCK,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for block_start in range(chunk_start, chunk_end, BLOCK):
        offsets = block_start + tl.arange(0, BLOCK)
        valid = offsets < chunk_end
        values = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32) - pivot
        count += valid.to(tl.float32)
        delta = values - mean
        mean += tl.where(valid, delta / tl.maximum(count, 1.0), 0.0)
        m2 += tl.where(valid, delta * (values - mean), 0.0)

    # Merge the lanes (parallel variance formula) into the chunk's count, mean and M2.
    chunk_count = tl.sum(count, axis=0)
    chunk_mean = tl.sum(count * mean, axis=0) / chunk_count
    spread = mean - chunk_mean
    chunk_m2 = tl.sum(m2, axis=0) + tl.sum(count * spread * spread, axis=0)

    stats = stats_ptr + (group * num_chunks + tl.program_id(1)) * 3
    tl.store(stats, chunk_count)
    tl.store(stats + 1, chunk_mean)
    tl.store(stats + 2, chunk_m2)


@jit
def _group_norm_apply_kernel(
    x_ptr, y_ptr, weight_ptr, bias_ptr, stats_ptr,
    group_numel, chunk_numel, num_chunks, num_groups, channels_per_group, spatial, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, APPLY_SILU: tl.constexpr,
    CHUNKS_POW2: tl.constexpr, BLOCK: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    first_channel = (tl.program_id(0) % num_groups) * channels_per_group
    chunk_start = tl.program_id(1) * chunk_numel
    chunk_end = tl.minimum(chunk_start + chunk_numel, group_numel)

    # Merge the group's chunk statistics (parallel variance formula), all in fp32.
    chunk_ids = tl.arange(0, CHUNKS_POW2)
    chunk_valid = chunk_ids < num_chunks
    stats = stats_ptr + (group * num_chunks + chunk_ids) * 3
    counts = tl.load(stats, mask=chunk_valid, other=0.0)
    means = tl.load(stats + 1, mask=chunk_valid, other=0.0)
    m2s = tl.load(stats + 2, mask=chunk_valid, other=0.0)
    count = tl.sum(counts, axis=0)
    mean = tl.sum(counts * means, axis=0) / count  # of x - pivot
    spread = means - mean
    variance = (tl.sum(m2s, axis=0) + tl.sum(counts * spread * spread, axis=0)) / count
    rstd = tl.rsqrt(variance + eps)

    x_ptr += group * group_numel
    y_ptr += group * group_numel
    pivot = tl.load(x_ptr).to(tl.float32)
    for block_start in range(chunk_start, chunk_end, BLOCK):
        offsets = block_start + tl.arange(0, BLOCK)
        valid = offsets < chunk_end
        values = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        normed = ((values - pivot) - mean) * rstd
        channels = first_channel + offsets // spatial
        if HAS_WEIGHT:
            normed = normed * tl.load(weight_ptr + channels, mask=valid, other=0.0).to(tl.float32)
        if HAS_BIAS:
            normed = normed + tl.load(bias_ptr + channels, mask=valid, other=0.0).to(tl.float32)
        if APPLY_SILU:
            normed = normed * tl.sigmoid(normed)
        tl.store(y_ptr + offsets, normed.to(y_ptr.dtype.element_ty), mask=valid)


def _launch_plan(rows: int, group_numel: int, block: int, chunks_per_group: int | None) -> tuple[int, int]:
    """(chunks per group, elements per chunk): about 512 programs in all, never more chunks than blocks."""
    blocks_per_group = triton.cdiv(group_numel, block)
    if chunks_per_group is None:
        chunks_per_group = triton.cdiv(512, rows)
    chunks = max(1, min(blocks_per_group, chunks_per_group))
    blocks_per_chunk = triton.cdiv(blocks_per_group, chunks)
    return triton.cdiv(blocks_per_group, blocks_per_chunk), blocks_per_chunk * block


def group_norm_triton(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    activation: str | None = None,
    *,
    out: torch.Tensor | None = None,
    block_size: int | None = None,
    chunks_per_group: int | None = None,
) -> torch.Tensor:
    """Launches the Triton kernels. x: (B, C, *spatial) fp32/fp16/bf16 -> same shape and dtype.

    ``out`` (contiguous, x's shape and dtype) receives the result when given; ``block_size`` (a power
    of two) and ``chunks_per_group`` override the launch plan, which tests use to reach every path.
    """
    assert triton is not None, "group_norm_triton needs Triton"
    check_group_norm_args(x, num_groups, weight, bias, activation)
    x = x.contiguous()
    if out is None:
        out = torch.empty_like(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    batch, channels = x.shape[:2]
    spatial = math.prod(x.shape[2:])
    channels_per_group = channels // num_groups
    group_numel = channels_per_group * spatial
    rows = batch * num_groups
    if x.numel() == 0:
        return out
    block = block_size or (4096 if x.device.type == "cpu" else 1024)  # cpu means the interpreter
    assert block & (block - 1) == 0, f"block_size {block} is not a power of two"
    if group_numel + block >= 2**31:
        raise ValueError(f"group_norm groups of {group_numel} elements exceed the Triton kernel's int32 offsets")
    chunks, chunk_numel = _launch_plan(rows, group_numel, block, chunks_per_group)
    stats = torch.empty((rows, chunks, 3), dtype=torch.float32, device=x.device)
    grid = (rows, chunks)
    _group_norm_partial_stats_kernel[grid](x, stats, group_numel, chunk_numel, chunks, BLOCK=block, num_warps=4)
    _group_norm_apply_kernel[grid](
        x, out,
        x if weight is None else weight.contiguous(),  # never read when absent
        x if bias is None else bias.contiguous(),
        stats,
        group_numel, chunk_numel, chunks, num_groups, channels_per_group, spatial, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, APPLY_SILU=activation == "silu",
        CHUNKS_POW2=triton.next_power_of_2(chunks), BLOCK=block, num_warps=4,
    )
    return out


@torch.library.custom_op("ldm::group_norm", mutates_args=())
def group_norm_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float, silu: bool) -> torch.Tensor:
    """The Triton GroupNorm as an opaque op for eager mode and torch.compile."""
    return group_norm_triton(x, num_groups, weight, bias, eps, "silu" if silu else None)


@group_norm_op.register_fake
def _group_norm_fake(x, num_groups, weight, bias, eps, silu):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _group_norm_setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.num_groups, ctx.eps, ctx.silu = num_groups, eps, silu


def _group_norm_backward(ctx, grad_out):
    """Analytic GroupNorm(+SiLU) gradients in fp32 plain PyTorch, recomputing the statistics from x.

    The fused kernels are there for inference speed; for training, the backward trades a fused kernel
    for code that torch.compile can trace and fuse, and the forward stores no mean/rstd for it.
    """
    x, weight, bias = ctx.saved_tensors
    batch, channels = x.shape[:2]
    grouped = x.float().reshape(batch, ctx.num_groups, -1)
    mean = grouped.mean(dim=2, keepdim=True)
    rstd = torch.rsqrt(grouped.var(dim=2, unbiased=False, keepdim=True) + ctx.eps)
    x_hat = ((grouped - mean) * rstd).reshape(batch, channels, -1)
    scale = 1.0 if weight is None else weight.float()[None, :, None]
    shift = 0.0 if bias is None else bias.float()[None, :, None]
    grad_pre = grad_out.float().reshape(batch, channels, -1)
    if ctx.silu:
        pre_activation = x_hat * scale + shift
        sigmoid = torch.sigmoid(pre_activation)
        grad_pre = grad_pre * sigmoid * (1 + pre_activation * (1 - sigmoid))
    grad_weight = None if weight is None else (grad_pre * x_hat).sum(dim=(0, 2)).to(weight.dtype)
    grad_bias = None if bias is None else grad_pre.sum(dim=(0, 2)).to(bias.dtype)
    grad_x_hat = (grad_pre * scale).reshape(batch, ctx.num_groups, -1)
    x_hat = x_hat.reshape(batch, ctx.num_groups, -1)
    grad_x = rstd * (grad_x_hat - grad_x_hat.mean(dim=2, keepdim=True)
                     - x_hat * (grad_x_hat * x_hat).mean(dim=2, keepdim=True))
    return grad_x.reshape(x.shape).to(x.dtype), None, grad_weight, grad_bias, None, None


group_norm_op.register_autograd(_group_norm_backward, setup_context=_group_norm_setup_context)
