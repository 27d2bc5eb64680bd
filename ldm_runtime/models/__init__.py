"""The three networks of a latent diffusion model: the autoencoder, the UNet and the text encoder.

torch (and ``ldm_kernels`` for GroupNorm and attention) is imported here: only what runs a network imports this.
"""

from torch import nn

from ldm_runtime.models.autoencoder import Autoencoder, AutoencoderOutput, LatentDistribution
from ldm_runtime.models.text_encoder import TextEncoder, resolve_text_encoder_path
from ldm_runtime.models.unet import UNet


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``module`` (only those with requires_grad when ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "Autoencoder",
    "AutoencoderOutput",
    "LatentDistribution",
    "TextEncoder",
    "UNet",
    "count_parameters",
    "resolve_text_encoder_path",
]
