"""The perceptual compression model (LDM's first stage): images <-> latents, KL- or VQ-regularised.

Kind "kl" has the state_dict of diffusers' ``AutoencoderKL`` and kind "vq" that of diffusers' ``VQModel``
(``down_block_types = ("DownEncoderBlock2D",) * levels``, ``block_out_channels = base_channels * channel_mult``,
``layers_per_block = num_res_blocks``, ``mid_block_add_attention = mid_attention``), so their weights load as
they are. Images are (B, 3, H, W) in [-1, 1]; latents are (B, latent_channels, H/f, W/f), f = 2 ** (levels - 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm_runtime.config import AutoencoderConfig
from ldm_runtime.models.attention import SpatialSelfAttention
from ldm_runtime.models.layers import Downsample, GroupNorm, ResnetBlock, Upsample

NORM_EPS = 1e-6


class LatentDistribution:
    """q(z | x): a diagonal Gaussian (``logvar`` given), or the point mass at ``mean`` (``logvar=None``, VQ)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor | None = None):
        self.mean = mean
        self.logvar = None if logvar is None else logvar.clamp(-30.0, 20.0)

    def mode(self) -> torch.Tensor:
        """(B, latent_channels, h, w), the mean."""
        return self.mean

    def std(self) -> torch.Tensor:
        """(B, latent_channels, h, w), the standard deviation exp(logvar / 2); zeros for a point mass."""
        if self.logvar is None:
            return torch.zeros_like(self.mean)
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, latent_channels, h, w): mean + std * ε with ε drawn from ``generator`` (the mean for a point mass)."""
        if self.logvar is None:
            return self.mean
        # Drawn on the generator's device, so a CPU generator gives the same noise for CUDA latents.
        device = self.mean.device if generator is None else generator.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std() * noise.to(self.mean.device)

    def kl(self) -> torch.Tensor:
        """(B,) KL(q(z|x) || N(0, I)) summed over latent channels and pixels; zeros for a point mass."""
        if self.logvar is None:
            return self.mean.new_zeros(self.mean.shape[0])
        return 0.5 * torch.sum(self.mean.pow(2) + torch.exp(self.logvar) - 1.0 - self.logvar, dim=[1, 2, 3])


@dataclass
class AutoencoderOutput:
    """reconstruction: (B, 3, H, W); latents: (B, latent_channels, h, w) (VQ: before quantisation);
    regularization_loss: scalar (KL: batch mean of the summed KL; VQ: codebook + beta * commitment)."""

    reconstruction: torch.Tensor
    latents: torch.Tensor
    regularization_loss: torch.Tensor


class EncoderBlock(nn.Module):
    """ResnetBlocks then an asymmetric-padded stride-2 conv (diffusers' DownEncoderBlock2D)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, num_groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, None, num_groups, NORM_EPS)
            for i in range(num_layers)
        ])
        self.downsamplers = nn.ModuleList([Downsample(out_channels, padding=0)] if add_downsample else [])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            hidden_states = layer(hidden_states)
        return hidden_states


class DecoderBlock(nn.Module):
    """ResnetBlocks then a nearest-x2 upsample and conv (diffusers' UpDecoderBlock2D)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, num_groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, None, num_groups, NORM_EPS)
            for i in range(num_layers)
        ])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if add_upsample else [])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            hidden_states = layer(hidden_states)
        return hidden_states


class MidBlock(nn.Module):
    """ResnetBlock, single-head spatial self-attention (when ``with_attention``), ResnetBlock."""

    def __init__(self, channels: int, num_groups: int, with_attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList(
            [SpatialSelfAttention(channels, num_groups, NORM_EPS)] if with_attention else []
        )
        self.resnets = nn.ModuleList(
            [ResnetBlock(channels, channels, None, num_groups, NORM_EPS) for _ in range(2)]
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states)
        for attention in self.attentions:
            hidden_states = attention(hidden_states)
        return self.resnets[1](hidden_states)


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, out_channels, H/f, W/f)."""

    def __init__(self, in_channels: int, out_channels: int, block_channels: list[int], num_res_blocks: int,
                 num_groups: int, mid_attention: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_channels[0], 3, padding=1)
        blocks = []
        output_channels = block_channels[0]
        for level, channels in enumerate(block_channels):
            input_channels, output_channels = output_channels, channels
            blocks.append(EncoderBlock(input_channels, output_channels, num_res_blocks, num_groups,
                                       add_downsample=level < len(block_channels) - 1))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(block_channels[-1], num_groups, mid_attention)
        self.conv_norm_out = GroupNorm(num_groups, block_channels[-1], NORM_EPS, activation="silu")
        self.conv_out = nn.Conv2d(block_channels[-1], out_channels, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(images)
        for block in self.down_blocks:
            hidden_states = block(hidden_states)
        hidden_states = self.mid_block(hidden_states)
        return self.conv_out(self.conv_norm_out(hidden_states))


class Decoder(nn.Module):
    """(B, in_channels, h, w) -> (B, out_channels, h*f, w*f); each up level has num_res_blocks + 1 ResnetBlocks."""

    def __init__(self, in_channels: int, out_channels: int, block_channels: list[int], num_res_blocks: int,
                 num_groups: int, mid_attention: bool):
        super().__init__()
        reversed_channels = block_channels[::-1]
        self.conv_in = nn.Conv2d(in_channels, reversed_channels[0], 3, padding=1)
        self.mid_block = MidBlock(reversed_channels[0], num_groups, mid_attention)
        blocks = []
        output_channels = reversed_channels[0]
        for level, channels in enumerate(reversed_channels):
            input_channels, output_channels = output_channels, channels
            blocks.append(DecoderBlock(input_channels, output_channels, num_res_blocks + 1, num_groups,
                                       add_upsample=level < len(block_channels) - 1))
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = GroupNorm(num_groups, block_channels[0], NORM_EPS, activation="silu")
        self.conv_out = nn.Conv2d(block_channels[0], out_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        hidden_states = self.mid_block(self.conv_in(latents))
        for block in self.up_blocks:
            hidden_states = block(hidden_states)
        return self.conv_out(self.conv_norm_out(hidden_states))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation with a straight-through gradient (van den Oord et al. 2017)."""

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents: (B, C, h, w) -> (quantized (B, C, h, w), loss scalar).

        ``quantized`` has the codebook entries' values and passes its gradient straight through to ``latents``;
        loss = ||sg[z] - e||² + beta ||z - sg[e]||² (diffusers' legacy default swaps the beta onto the first term).
        """
        channels_last = latents.permute(0, 2, 3, 1)
        flat = channels_last.reshape(-1, channels_last.shape[-1])
        codebook = self.embedding.weight
        # |z - e|^2 expanded, as plain matmuls that every exporter supports (unlike cdist).
        distances = flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ codebook.t() + codebook.pow(2).sum(1)[None, :]
        indices = distances.argmin(dim=1)
        quantized = self.embedding(indices).reshape(channels_last.shape).permute(0, 3, 1, 2)
        codebook_loss = F.mse_loss(quantized, latents.detach())
        commitment_loss = F.mse_loss(latents, quantized.detach())
        straight_through = latents + (quantized - latents).detach()
        return straight_through, codebook_loss + self.beta * commitment_loss


class Autoencoder(nn.Module):
    """KL- or VQ-regularised autoencoder with diffusers' parameter names."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        block_channels = [cfg.base_channels * mult for mult in cfg.channel_mult]
        # KL: the encoder predicts mean and log-variance; VQ: the latents themselves.
        moment_channels = 2 * cfg.latent_channels if cfg.kind == "kl" else cfg.latent_channels
        self.encoder = Encoder(cfg.in_channels, moment_channels, block_channels, cfg.num_res_blocks,
                               cfg.num_groups, cfg.mid_attention)
        self.quant_conv = nn.Conv2d(moment_channels, moment_channels, 1)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.latent_channels) if cfg.kind == "vq" else None
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg.latent_channels, cfg.in_channels, block_channels, cfg.num_res_blocks,
                               cfg.num_groups, cfg.mid_attention)

    def encode(self, images: torch.Tensor) -> LatentDistribution:
        """images: (B, 3, H, W) in [-1, 1] -> q(z | x) over (B, latent_channels, H/f, W/f) latents."""
        moments = self.quant_conv(self.encoder(images))
        if self.quantize is not None:
            return LatentDistribution(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return LatentDistribution(mean, logvar)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: (B, latent_channels, h, w) -> images (B, 3, h*f, w*f), roughly in [-1, 1] (not clamped).
        VQ quantises the latents first."""
        if self.quantize is not None:
            latents, _ = self.quantize(latents)
        return self.decoder(self.post_quant_conv(latents))

    def forward(self, images: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> AutoencoderOutput:
        """Encode, pick latents (a posterior sample, or its mode), decode; see ``AutoencoderOutput``."""
        posterior = self.encode(images)
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        if self.quantize is None:
            return AutoencoderOutput(self.decode(latents), latents, posterior.kl().mean())
        quantized, quantization_loss = self.quantize(latents)
        return AutoencoderOutput(self.decoder(self.post_quant_conv(quantized)), latents, quantization_loss)

    @property
    def decoder_last_layer(self) -> nn.Parameter:
        """The decoder's conv_out weight (out_channels, C, 3, 3), for LDM's adaptive GAN loss weight."""
        return self.decoder.conv_out.weight
