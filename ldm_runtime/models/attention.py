"""Attention modules: the autoencoder's spatial self-attention and the UNet's spatial transformer.

Parameter names follow diffusers (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``group_norm``, ``proj_in``,
``transformer_blocks``, ``ff.net.0.proj``...). Every attention runs through ``ldm_kernels.dispatch.attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_kernels import dispatch
from ldm_runtime.models.layers import GroupNorm


class Attention(nn.Module):
    """Multi-head attention of a sequence over itself or over ``context`` (diffusers' ``Attention``).
    ``kernel_backend`` pins the implementation (``ldm_kernels.dispatch.use_backend``); None follows LDM_KERNELS."""

    kernel_backend: str | None = None

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 qkv_bias: bool = False, upcast: bool = False):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim  # over the kernel's MAX_HEAD_DIM, a pin to "triton" runs the reference
        self.upcast = upcast
        inner_dim = heads * head_dim
        key_dim = query_dim if context_dim is None else context_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=qkv_bias)
        self.to_k = nn.Linear(key_dim, inner_dim, bias=qkv_bias)
        self.to_v = nn.Linear(key_dim, inner_dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim)])  # a list only for diffusers' "to_out.0" key

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: (B, Lq, query_dim); context: (B, Lk, context_dim) or None (self-attention);
        context_mask: (B, Lk) bool, True = attend, or None -> (B, Lq, query_dim)."""
        context = hidden_states if context is None else context
        query = self._split_heads(self.to_q(hidden_states))
        key = self._split_heads(self.to_k(context))
        value = self._split_heads(self.to_v(context))
        if self.upcast and query.dtype != torch.float32:
            # fp16 scores overflow on SD 2.1's weights (black images): compute them in fp32, as diffusers does
            dtype = query.dtype
            attended = dispatch.attention(query.float(), key.float(), value.float(), context_mask,
                                          backend=self.kernel_backend).to(dtype)
        else:
            attended = dispatch.attention(query, key, value, context_mask, backend=self.kernel_backend)
        return self.to_out[0](attended.transpose(1, 2).flatten(2))

    def _split_heads(self, projected: torch.Tensor) -> torch.Tensor:
        """(B, L, heads * head_dim) -> (B, heads, L, head_dim)."""
        return projected.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class SpatialSelfAttention(Attention):
    """The autoencoder's mid-block attention: GroupNorm, one head over all pixels, residual add."""

    def __init__(self, channels: int, num_groups: int, eps: float):
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True)
        self.group_norm = GroupNorm(num_groups, channels, eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        pixels = self.group_norm(hidden_states).flatten(2).transpose(1, 2)
        attended = super().forward(pixels)
        return _to_image(attended, hidden_states.shape) + hidden_states


class GEGLU(nn.Module):
    """Gated GELU: one projection to twice the width, the second half (through GELU) gates the first."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., dim_in) -> (..., dim_out)."""
        hidden, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with inner width 4 * dim; ``net`` indices match diffusers (1 is a no-op dropout)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, dim) -> (B, L, dim)."""
        return self.net(hidden_states)


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock: pre-LayerNorm self-attention, cross-attention, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast_attention: bool = False):
        super().__init__()
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast_attention)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, upcast=upcast_attention)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None) -> torch.Tensor:
        """hidden_states: (B, L, dim); context: (B, Lc, context_dim); context_mask: (B, Lc) bool or None."""
        hidden_states = self.attn1(self.norm1(hidden_states)) + hidden_states
        hidden_states = self.attn2(self.norm2(hidden_states), context, context_mask) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel on continuous input: GroupNorm, proj_in, transformer blocks, proj_out, residual.

    ``use_linear_projection`` picks Linear projections on the token sequence (SD 2.x) over 1x1 convs (SD 1.x).
    """

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, num_groups: int,
                 use_linear_projection: bool, upcast_attention: bool = False):
        super().__init__()
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(num_groups, channels, eps=1e-6)
        projection = nn.Linear if use_linear_projection else _pointwise_conv
        self.proj_in = projection(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, context_dim, upcast_attention) for _ in range(depth)]
        )
        self.proj_out = projection(channels, channels)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None) -> torch.Tensor:
        """hidden_states: (B, C, H, W); context: (B, Lc, context_dim); context_mask: (B, Lc) bool or None
        -> (B, C, H, W)."""
        tokens = self.norm(hidden_states)
        if self.use_linear_projection:
            tokens = self.proj_in(tokens.flatten(2).transpose(1, 2))
        else:
            tokens = self.proj_in(tokens).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, context_mask)
        if self.use_linear_projection:
            output = _to_image(self.proj_out(tokens), hidden_states.shape)
        else:
            output = self.proj_out(_to_image(tokens, hidden_states.shape))
        return output + hidden_states


def _to_image(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(B, H*W, C) tokens -> a contiguous (B, C, H, W) image. A plain transpose-reshape would be a channels-last
    view, and every convolution after it (through the residual add) would then convert its weights to
    channels-last on each call: on the CPU that copy cost more than the convolutions themselves."""
    return tokens.transpose(1, 2).contiguous().view(shape)


def _pointwise_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1)
