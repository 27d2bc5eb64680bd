"""PatchGAN discriminator for the autoencoder's adversarial loss (pix2pix / taming "NLayerDiscriminator").

The layer structure and initialisation follow taming-transformers: 4x4 convolutions, the first
``num_layers`` with stride 2, then two with stride 1, LeakyReLU(0.2), channels doubling up to 8x.
The one change is the normalisation: GroupNorm instead of BatchNorm. GroupNorm's statistics are
per sample, so the discriminator behaves the same in train and eval, at batch size 1, and under
DDP (no running buffers to synchronise, no SyncBatchNorm), and the separate real and fake forward
passes cannot leak batch statistics into each other.

Output size: an input side ``s`` gives ``s // 2**num_layers - 2`` logits per side (each stride-2
conv halves, each stride-1 4x4 conv with padding 1 removes one). With the default three layers a
32 px image gives 2x2 logits and 64 px gives 6x6; each logit sees a 70 px receptive field, so at
32 px every logit judges the whole image. ``num_layers=2`` gives 6x6 logits over 34 px patches at
32 px, closer to the PatchGAN idea of judging local texture.
"""

from __future__ import annotations

import math

import torch
from torch import nn

KERNEL_SIZE = 4
MAX_CHANNEL_MULT = 8
MAX_GROUPS = 32
MIN_OUTPUT_SIDE = 2  # a 1x1 map would turn the patch discriminator into a global one


def weights_init(module: nn.Module) -> None:
    """taming's initialisation: conv weights ~ N(0, 0.02); norm scales ~ N(1, 0.02), norm shifts 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(MAX_GROUPS, channels), channels)


class PatchDiscriminator(nn.Module):
    """(B, in_channels, H, W) images in [-1, 1] -> (B, 1, H // 2**L - 2, W // 2**L - 2) float logits.

    Each logit says whether its receptive field looks real (> 0) or reconstructed (< 0).
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        assert num_layers >= 1, num_layers
        self.num_layers = num_layers
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, KERNEL_SIZE, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        channels = base_channels
        for level in range(1, num_layers + 1):
            out_channels = base_channels * min(2**level, MAX_CHANNEL_MULT)
            stride = 2 if level < num_layers else 1
            # no conv bias: the GroupNorm shift that follows makes it redundant
            layers += [
                nn.Conv2d(channels, out_channels, KERNEL_SIZE, stride=stride, padding=1, bias=False),
                _group_norm(out_channels),
                nn.LeakyReLU(0.2),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, KERNEL_SIZE, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(weights_init)

    def output_side(self, input_side: int) -> int:
        """Logits per side for an input side of ``input_side`` pixels."""
        return input_side // 2**self.num_layers - 2

    @property
    def min_input_side(self) -> int:
        """The smallest image side that still gives a 2x2 map of logits."""
        return (MIN_OUTPUT_SIDE + 2) * 2**self.num_layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, H, W) float in [-1, 1] -> (B, 1, h, w) logits, h = H // 2**num_layers - 2."""
        height, width = images.shape[-2:]
        if min(height, width) < self.min_input_side:
            raise ValueError(
                f"discriminator input {height}x{width} is too small for num_layers={self.num_layers}; "
                f"expected both sides >= {self.min_input_side} (or fewer layers)"
            )
        return self.layers(images)
