"""Convolutional building blocks shared by the autoencoder and the UNet.

Parameter names follow diffusers (``norm1``, ``conv1``, ``time_emb_proj``, ``conv_shortcut``, ``conv``) so
Stable Diffusion weights load without conversion. Every GroupNorm runs through ``ldm_kernels.dispatch``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_kernels import dispatch


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameter names) computed by ``ldm_kernels.dispatch.group_norm``.

    ``activation="silu"`` fuses the SiLU that follows the norm into the same kernel. ``kernel_backend``
    pins the implementation (``ldm_kernels.dispatch.use_backend``); None follows LDM_KERNELS.
    """

    kernel_backend: str | None = None

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, activation: str | None = None):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        assert activation in (None, "silu"), activation
        self.activation = activation

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> same shape and dtype."""
        return dispatch.group_norm(hidden_states, self.num_groups, self.weight, self.bias, self.eps, self.activation,
                                   self.kernel_backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D ("default" time norm, output scale 1): GN-SiLU-conv, + time, GN-SiLU-conv, + skip.

    ``temb_channels=None`` builds the autoencoder's variant without a time embedding.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, num_groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(num_groups, in_channels, eps, activation="silu")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = None if temb_channels is None else nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(num_groups, out_channels, eps, activation="silu")
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = None if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: (B, C_in, H, W); temb: (B, temb_channels) or None -> (B, C_out, H, W)."""
        residual = self.conv1(self.norm1(hidden_states))
        if self.time_emb_proj is not None:
            residual = residual + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        residual = self.conv2(self.norm2(residual))
        shortcut = hidden_states if self.conv_shortcut is None else self.conv_shortcut(hidden_states)
        return shortcut + residual


class Downsample(nn.Module):
    """Stride-2 3x3 conv. ``padding=0`` pads right/bottom by one first (the autoencoder's asymmetric padding)."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        assert padding in (0, 1), padding
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        if self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))
        return self.conv(hidden_states)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))
