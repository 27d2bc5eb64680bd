"""The time-conditional UNet ε_θ(z_t, t, τ(y)) with cross-attention to the text condition.

Same block structure and parameter names as diffusers' ``UNet2DConditionModel`` built with
``block_out_channels = model_channels * channel_mult``, ``layers_per_block = num_res_blocks``,
``CrossAttnDownBlock2D`` / ``DownBlock2D`` per ``attention_levels`` (mirrored on the way up),
``attention_head_dim = num_heads`` (in SD 1.x diffusers that argument is the number of heads),
so Stable Diffusion UNet weights load with ``load_state_dict`` as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm_runtime.config import UNetConfig
from ldm_runtime.models.attention import SpatialTransformer
from ldm_runtime.models.layers import Downsample, GroupNorm, ResnetBlock, Upsample

RESNET_EPS = 1e-5


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding as diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``.

    timesteps: (B,) int or float -> (B, dim) float32, cosines first.
    """
    half_dim = dim // 2
    exponent = -math.log(max_period) * torch.arange(half_dim, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(exponent / half_dim)
    angles = timesteps.float()[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedding(nn.Module):
    """Linear-SiLU-Linear MLP on the sinusoidal embedding."""

    def __init__(self, in_features: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, in_features) -> (B, time_embed_dim)."""
        return self.linear_2(F.silu(self.linear_1(embedding)))


class DownBlock(nn.Module):
    """ResnetBlocks, each followed by a SpatialTransformer when ``with_attention``, then a stride-2 conv."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int,
                 cfg: UNetConfig, with_attention: bool, add_downsample: bool, heads: int):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, temb_channels, cfg.num_groups,
                        RESNET_EPS)
            for i in range(num_layers)
        ])
        self.attentions = nn.ModuleList(
            [_spatial_transformer(out_channels, cfg, heads) for _ in range(num_layers)] if with_attention else []
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels, padding=1)] if add_downsample else [])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the block output and the skip connections it leaves for the up path, in order."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            if self.attentions:
                hidden_states = self.attentions[i](hidden_states, context, context_mask)
            skips.append(hidden_states)
        for downsampler in self.downsamplers:
            hidden_states = downsampler(hidden_states)
            skips.append(hidden_states)
        return hidden_states, skips


class MidBlock(nn.Module):
    """ResnetBlock, SpatialTransformer, ResnetBlock (diffusers' UNetMidBlock2DCrossAttn)."""

    def __init__(self, channels: int, temb_channels: int, cfg: UNetConfig):
        super().__init__()
        self.attentions = nn.ModuleList([_spatial_transformer(channels, cfg, cfg.heads(-1))])
        self.resnets = nn.ModuleList(
            [ResnetBlock(channels, channels, temb_channels, cfg.num_groups, RESNET_EPS) for _ in range(2)]
        )

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        hidden_states = self.attentions[0](hidden_states, context, context_mask)
        return self.resnets[1](hidden_states, temb)


class UpBlock(nn.Module):
    """ResnetBlocks over [hidden, skip] concatenations (optionally each followed by a SpatialTransformer),
    then a nearest-x2 upsample and conv."""

    def __init__(self, in_channels: int, prev_output_channels: int, out_channels: int, temb_channels: int,
                 num_layers: int, cfg: UNetConfig, with_attention: bool, add_upsample: bool, heads: int):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in_channels = prev_output_channels if i == 0 else out_channels
            resnets.append(ResnetBlock(resnet_in_channels + skip_channels, out_channels, temb_channels,
                                       cfg.num_groups, RESNET_EPS))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(
            [_spatial_transformer(out_channels, cfg, heads) for _ in range(num_layers)] if with_attention else []
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if add_upsample else [])

    def forward(self, hidden_states: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor,
                context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        """skips: this block's skip connections in the order the down path produced them (consumed last first)."""
        assert len(skips) == len(self.resnets), (len(skips), len(self.resnets))
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips))):
            hidden_states = resnet(torch.cat([hidden_states, skip], dim=1), temb)
            if self.attentions:
                hidden_states = self.attentions[i](hidden_states, context, context_mask)
        for upsampler in self.upsamplers:
            hidden_states = upsampler(hidden_states)
        return hidden_states


def _spatial_transformer(channels: int, cfg: UNetConfig, heads: int) -> SpatialTransformer:
    return SpatialTransformer(channels, heads, cfg.transformer_depth, cfg.context_dim, cfg.num_groups,
                              cfg.use_linear_projection, cfg.upcast_attention)


class UNet(nn.Module):
    """ε-prediction (or v-prediction) UNet; state_dict keys and shapes equal diffusers' UNet2DConditionModel."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        block_channels = [cfg.model_channels * mult for mult in cfg.channel_mult]
        time_embed_dim = 4 * cfg.model_channels
        levels = len(block_channels)

        self.conv_in = nn.Conv2d(cfg.in_channels, block_channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(cfg.model_channels, time_embed_dim)

        down_blocks = []
        output_channels = block_channels[0]
        for level in range(levels):
            input_channels, output_channels = output_channels, block_channels[level]
            down_blocks.append(DownBlock(input_channels, output_channels, time_embed_dim, cfg.num_res_blocks, cfg,
                                         with_attention=cfg.attention_levels[level],
                                         add_downsample=level < levels - 1, heads=cfg.heads(level)))
        self.down_blocks = nn.ModuleList(down_blocks)

        self.mid_block = MidBlock(block_channels[-1], time_embed_dim, cfg)

        up_blocks = []
        reversed_channels = block_channels[::-1]
        output_channels = reversed_channels[0]
        for level in range(levels):
            prev_output_channels, output_channels = output_channels, reversed_channels[level]
            input_channels = reversed_channels[min(level + 1, levels - 1)]
            up_blocks.append(UpBlock(input_channels, prev_output_channels, output_channels, time_embed_dim,
                                     cfg.num_res_blocks + 1, cfg,
                                     with_attention=cfg.attention_levels[levels - 1 - level],
                                     add_upsample=level < levels - 1, heads=cfg.heads(levels - 1 - level)))
        self.up_blocks = nn.ModuleList(up_blocks)

        self.conv_norm_out = GroupNorm(cfg.num_groups, block_channels[0], RESNET_EPS, activation="silu")
        self.conv_out = nn.Conv2d(block_channels[0], cfg.out_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise (or v) in ``latents``.

        latents: (B, in_channels, h, w) with h, w divisible by 2 ** (levels - 1) (an inpainting UNet's: the latents,
        the mask and the masked image's latents, ``ldm_runtime.config.inpainting_channels``); timesteps: (B,) int or
        float, one per sample (a 0-d or (1,) tensor is broadcast); context: (B, L, context_dim) text hidden states;
        context_mask: (B, L) bool, True = real token, or None (attend to every token).
        Returns (B, out_channels, h, w) in latents' dtype.
        """
        return self.forward_with_deep_features(latents, timesteps, context, context_mask)[0]

    def forward_with_deep_features(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                                   context_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``'s prediction and the deep features: the hidden state that enters the last up-block (the
        block of the outermost skip connections), ``(B, deep_feature_channels, h, w)``, what DeepCache keeps
        between steps (``forward_shallow``)."""
        temb, context, context_mask = self._conditioning(latents, timesteps, context, context_mask)
        hidden_states, skips = self._shallow_down(latents, temb, context, context_mask)
        block = self.down_blocks[0]
        for downsampler in block.downsamplers:
            hidden_states = downsampler(hidden_states)
            skips.append(hidden_states)
        for block in self.down_blocks[1:]:
            hidden_states, block_skips = block(hidden_states, temb, context, context_mask)
            skips.extend(block_skips)

        hidden_states = self.mid_block(hidden_states, temb, context, context_mask)

        for block in self.up_blocks[:-1]:
            count = len(block.resnets)
            hidden_states = block(hidden_states, skips[-count:], temb, context, context_mask)
            skips = skips[:-count]
        return self._shallow_up(hidden_states, skips, temb, context, context_mask), hidden_states

    def forward_shallow(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                        context_mask: torch.Tensor | None, deep_features: torch.Tensor) -> torch.Tensor:
        """The prediction from the shallow part alone (``conv_in``, the first down-block's layers, the last
        up-block, the output head) on ``deep_features`` kept from an earlier call of
        ``forward_with_deep_features``: DeepCache's cheap step (Ma et al. 2024). With the deep features of the
        same inputs it equals ``forward`` (the same operations in the same order)."""
        temb, context, context_mask = self._conditioning(latents, timesteps, context, context_mask)
        _, skips = self._shallow_down(latents, temb, context, context_mask)
        return self._shallow_up(deep_features.to(latents.dtype), skips, temb, context, context_mask)

    @property
    def deep_feature_channels(self) -> int:
        """The channels of ``forward_with_deep_features``' deep features."""
        return deep_feature_channels(self.cfg)

    def _conditioning(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                      context_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The time embedding, the context in latents' dtype and the attention mask every block takes."""
        timesteps = timesteps.reshape(-1).expand(latents.shape[0])
        temb = self.time_embedding(timestep_embedding(timesteps, self.cfg.model_channels).to(latents.dtype))
        context = context.to(latents.dtype)
        if context_mask is not None:
            # A row with no real token attends to all of them (as diffusers' additive -10000 bias does), never NaN.
            context_mask = context_mask.bool()
            context_mask = context_mask | ~context_mask.any(dim=1, keepdim=True)
        return temb, context, context_mask

    def _shallow_down(self, latents: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                      context_mask: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``conv_in`` and the first down-block's layers (not its downsampler): the hidden state and the skip
        connections the last up-block consumes."""
        hidden_states = self.conv_in(latents)
        skips = [hidden_states]
        block = self.down_blocks[0]
        for i, resnet in enumerate(block.resnets):
            hidden_states = resnet(hidden_states, temb)
            if block.attentions:
                hidden_states = block.attentions[i](hidden_states, context, context_mask)
            skips.append(hidden_states)
        return hidden_states, skips

    def _shallow_up(self, hidden_states: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor,
                    context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        """The last up-block on ``skips`` (exactly the ones it consumes) and the output head."""
        hidden_states = self.up_blocks[-1](hidden_states, skips, temb, context, context_mask)
        return self.conv_out(self.conv_norm_out(hidden_states))


class DeepFeaturesUNet(nn.Module):
    """``UNet.forward_with_deep_features`` as a module: what the exported "unet" graph computes."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.unet.forward_with_deep_features(latents, timesteps, context, context_mask)


class ShallowUNet(nn.Module):
    """``UNet.forward_shallow`` as a module holding only the shallow part's weights (shared with ``unet``): what
    the exported "unet_shallow" graph computes."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.cfg = unet.cfg
        for name in ("conv_in", "time_embedding", "conv_norm_out", "conv_out"):
            setattr(self, name, getattr(unet, name))
        self.down_blocks = nn.ModuleList([unet.down_blocks[0]])
        self.up_blocks = nn.ModuleList([unet.up_blocks[-1]])

    _conditioning = UNet._conditioning
    _shallow_down = UNet._shallow_down
    _shallow_up = UNet._shallow_up
    forward = UNet.forward_shallow


def deep_feature_channels(cfg: UNetConfig) -> int:
    """The channels of the deep features (``UNet.forward_with_deep_features``): the second level's width, or the
    only level's in a one-level UNet."""
    return cfg.model_channels * cfg.channel_mult[min(1, len(cfg.channel_mult) - 1)]
