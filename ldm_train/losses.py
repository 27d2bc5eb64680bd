"""The autoencoder's training losses: reconstruction, perceptual, regularisation and PatchGAN terms.

This follows LDM / taming-transformers' ``LPIPSWithDiscriminator``: L1 + a perceptual term, plus the
KL (or VQ codebook) term, plus a hinge-loss PatchGAN switched on at ``disc_start`` and weighted by
lambda = ||grad_last L_rec|| / (||grad_last L_G|| + 1e-4), clamped to [0, 1e4], times ``disc_weight``.

The perceptual term. LPIPS compares VGG/AlexNet features, and those weights would have to be
downloaded; this project ships no pretrained vision network. A randomly initialised network is no
substitute: its features measure nothing in particular, and the loss would change with the seed.
``PerceptualLoss`` is instead built from fixed filters with no weights at all:

- multi-scale SSIM (1 - SSIM averaged over a few scales, Gaussian window as a depthwise conv) compares
  local contrasts and correlations at every scale and local means at the coarsest, so a blurred edge
  or lost texture costs a lot even when the per-pixel error is small, while a smooth change of
  brightness with the same L1 costs several times less;
- L1 on a Laplacian pyramid of the images compares band-pass detail (edges, fine structure) directly:
  a blurred edge loses most of its band-pass energy, while in an L1 on pixels its error is a thin
  rim averaged over the whole image.

Both are a few small convolutions, cheap on a CPU at 32-64 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm_runtime.config import ConfigError

SSIM_WINDOW_SIZE = 11
SSIM_WINDOW_SIGMA = 1.5
SSIM_C1 = 0.01**2  # (K1 * data range)^2 with the images mapped to [0, 1]
SSIM_C2 = 0.03**2
PYRAMID_KERNEL = (1.0, 4.0, 6.0, 4.0, 1.0)  # the binomial 5-tap filter of Burt & Adelson's pyramid
COARSEST_SIDE = 8  # an SSIM scale smaller than this is mostly window padding
MIN_IMAGE_SIDE = 2 * COARSEST_SIDE  # two scales at least, or the term is not multi-scale
ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4


def _gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    positions = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(positions**2) / (2 * sigma**2))
    return (kernel / kernel.sum()).float()


def _depthwise_blur(images: torch.Tensor, kernel: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, ceil(H / stride), ceil(W / stride)): separable blur with reflect padding."""
    channels = images.shape[1]
    size = kernel.numel()
    pad = size // 2
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    horizontal = kernel.view(1, 1, 1, size).expand(channels, 1, 1, size)
    vertical = kernel.view(1, 1, size, 1).expand(channels, 1, size, 1)
    blurred = F.conv2d(padded, horizontal, stride=(1, stride), groups=channels)
    return F.conv2d(blurred, vertical, stride=(stride, 1), groups=channels)


class PerceptualLoss(nn.Module):
    """Multi-scale (1 - SSIM) + L1 on a Laplacian pyramid. No learnable parameters.

    Scales: the image, then halvings while the side stays >= 8 px, at most ``num_scales``
    (16 px images get two scales, 32 px and larger three). The result is the mean over scales of
    (1 - SSIM) plus the mean over scales of the L1 between Laplacian bands, with images in [-1, 1];
    identical images give 0. As in MS-SSIM, SSIM's luminance factor enters at the coarsest scale
    only; the scales are averaged rather than combined as MS-SSIM's weighted product, whose
    fractional powers of contrast terms that can be negative give NaN gradients.
    """

    def __init__(self, num_scales: int = 3) -> None:
        super().__init__()
        assert num_scales >= 2, num_scales
        self.num_scales = num_scales
        # fixed filters, not state: kept out of the state dict so checkpoints do not carry them
        self.register_buffer("ssim_window", _gaussian_kernel(SSIM_WINDOW_SIZE, SSIM_WINDOW_SIGMA), persistent=False)
        pyramid = torch.tensor(PYRAMID_KERNEL)
        self.register_buffer("pyramid_kernel", pyramid / pyramid.sum(), persistent=False)

    def scale_count(self, height: int, width: int) -> int:
        """How many scales an image of ``height`` x ``width`` pixels is compared at."""
        side, count = min(height, width), 1
        while count < self.num_scales and math.ceil(side / 2) >= COARSEST_SIDE:
            side, count = math.ceil(side / 2), count + 1
        return count

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """images, reconstructions: (B, C, H, W) in [-1, 1], H and W >= 16 -> () float32 loss.

        Computed in float32 with autocast off: SSIM's variances are differences of squares that
        cancel catastrophically in half precision.
        """
        if images.shape != reconstructions.shape:
            raise ValueError(
                f"reconstructions have shape {tuple(reconstructions.shape)}; expected the images' shape "
                f"{tuple(images.shape)}"
            )
        height, width = images.shape[-2:]
        if min(height, width) < MIN_IMAGE_SIDE:
            raise ValueError(
                f"perceptual loss got {height}x{width} images; expected both sides >= {MIN_IMAGE_SIDE} px"
            )
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self._loss(images.float(), reconstructions.float())

    def _loss(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        num_scales = self.scale_count(*images.shape[-2:])
        # one Gaussian pyramid for both, so each level is a single conv call
        level = torch.cat([images, reconstructions])
        ssim_terms, laplacian_terms = [], []
        for scale in range(num_scales):
            coarser = _depthwise_blur(level, self.pyramid_kernel, stride=2)
            band = level - F.interpolate(coarser, size=level.shape[-2:], mode="bilinear", align_corners=False)
            laplacian_terms.append((band[:batch] - band[batch:]).abs().mean())
            unit_range = (level + 1) / 2
            luminance, contrast_structure = self._ssim_terms(unit_range[:batch], unit_range[batch:])
            # brightness only at the coarsest scale, as in MS-SSIM: the L1 term already covers it
            similarity = luminance * contrast_structure if scale == num_scales - 1 else contrast_structure
            ssim_terms.append(1 - similarity.mean())
            level = coarser
        return torch.stack(ssim_terms).mean() + torch.stack(laplacian_terms).mean()

    def _ssim_terms(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (B, C, H, W) in [0, 1] -> SSIM's luminance and contrast-structure maps, each (B, C, H, W)."""
        moments = _depthwise_blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), self.ssim_window)
        mean_x, mean_y, square_x, square_y, product = moments.chunk(5, dim=1)
        variance_x = square_x - mean_x**2
        variance_y = square_y - mean_y**2
        covariance = product - mean_x * mean_y
        luminance = (2 * mean_x * mean_y + SSIM_C1) / (mean_x**2 + mean_y**2 + SSIM_C1)
        contrast_structure = (2 * covariance + SSIM_C2) / (variance_x + variance_y + SSIM_C2)
        return luminance, contrast_structure


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 0.5 * (mean relu(1 - real) + mean relu(1 + fake)); any shapes -> ()."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss -mean(fake logits), the generator side of the hinge GAN; any shape -> ()."""
    return -logits_fake.mean()


@dataclass(frozen=True)
class AutoencoderLossConfig:
    """Weights of the autoencoder's loss terms (and the defaults of ``ldm-train autoencoder``'s flags for them).

    ``kl_weight`` is LDM's kl-f8 value, meant for a KL summed over latent elements and a
    reconstruction summed over pixels. The reconstruction here is a per-pixel mean, so the KL is
    divided by the image's C*H*W: LDM's objective divided by C*H*W, which has the same optimum and
    the same Adam steps (Adam ignores a constant loss scale, up to its epsilon).
    ``codebook_weight`` multiplies the VQ loss as in taming (per-element means).
    """

    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    disc_weight: float = 0.5
    disc_start: int = 1000  # steps of reconstruction-only training before the GAN term starts
    adaptive_weight: bool = True

    def validate(self) -> None:
        for name in ("l1_weight", "perceptual_weight", "kl_weight", "codebook_weight", "disc_weight"):
            value = getattr(self, name)
            if not value >= 0:
                raise ConfigError(f"autoencoder loss {name} is {value}; expected a number >= 0")
        if self.disc_start < 0:
            raise ConfigError(f"autoencoder loss disc_start is {self.disc_start}; expected a step >= 0")


class AutoencoderLoss(nn.Module):
    """LPIPSWithDiscriminator with ``PerceptualLoss`` in place of LPIPS. Holds the discriminator.

    A training step calls ``generator_loss`` (autoencoder update) and then ``discriminator_loss``
    (discriminator update, only when ``discriminator_active(step)``). The generator step's backward
    also leaves gradients on the discriminator's parameters: zero them before the discriminator step.
    """

    def __init__(self, config: AutoencoderLossConfig, discriminator: nn.Module, kind: str = "kl") -> None:
        super().__init__()
        config.validate()
        if kind not in ("kl", "vq"):
            raise ConfigError(f"autoencoder loss kind {kind!r} is not one of 'kl', 'vq'")
        self.config = config
        self.kind = kind
        self.discriminator = discriminator
        self.perceptual = PerceptualLoss()

    def discriminator_active(self, step: int) -> bool:
        """Whether the GAN terms are on at training step ``step`` (counted from 0)."""
        return step >= self.config.disc_start

    def generator_loss(
        self,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        regularization_loss: torch.Tensor,
        step: int,
        last_layer_weight: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The autoencoder's loss at ``step``.

        images, reconstructions: (B, C, H, W) in [-1, 1]; reconstructions carry the decoder's graph.
        regularization_loss: () float. kind "kl": the KL to N(0, I) summed over latent elements and
        averaged over the batch; kind "vq": the codebook + commitment loss.
        last_layer_weight: the decoder's last conv weight, for the adaptive GAN weight. Without
        autograd (validation under ``torch.no_grad``) that weight cannot be computed and is 0, as in LDM.
        Returns the () loss and its terms as floats.
        """
        assert images.shape == reconstructions.shape, (images.shape, reconstructions.shape)
        config = self.config
        l1 = (images - reconstructions).abs().mean()
        perceptual = self.perceptual(images, reconstructions)
        reconstruction = config.l1_weight * l1 + config.perceptual_weight * perceptual
        if self.kind == "kl":
            regularization_weight = config.kl_weight / images[0].numel()
        else:
            regularization_weight = config.codebook_weight
        loss = reconstruction + regularization_weight * regularization_loss

        generator_adversarial = torch.zeros((), device=images.device)
        adaptive_weight = torch.zeros((), device=images.device)
        if self.discriminator_active(step):
            generator_adversarial = hinge_g_loss(self.discriminator(reconstructions))
            adaptive_weight = self._adaptive_weight(reconstruction, generator_adversarial, last_layer_weight)
            loss = loss + adaptive_weight * generator_adversarial

        logs = {
            "loss": loss,
            "l1": l1,
            "perceptual": perceptual,
            "reconstruction": reconstruction,
            "kl" if self.kind == "kl" else "codebook": regularization_loss,
            "generator_adversarial": generator_adversarial,
            "adaptive_weight": adaptive_weight,
        }
        return loss, _as_floats(logs)

    def _adaptive_weight(self, reconstruction: torch.Tensor, generator_adversarial: torch.Tensor,
                         last_layer_weight: torch.Tensor) -> torch.Tensor:
        """() detached lambda * disc_weight: scales the GAN gradient at the last layer to the reconstruction's."""
        if not self.config.adaptive_weight:
            return torch.tensor(self.config.disc_weight, device=reconstruction.device)
        if not torch.is_grad_enabled():
            return torch.zeros((), device=reconstruction.device)
        (reconstruction_grad,) = torch.autograd.grad(reconstruction, last_layer_weight, retain_graph=True)
        (adversarial_grad,) = torch.autograd.grad(generator_adversarial, last_layer_weight, retain_graph=True)
        ratio = reconstruction_grad.norm() / (adversarial_grad.norm() + ADAPTIVE_WEIGHT_EPS)
        return ratio.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach() * self.config.disc_weight

    def discriminator_loss(self, images: torch.Tensor, reconstructions_detached: torch.Tensor,
                           step: int, discriminator: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss of the discriminator on real ``images`` vs. ``reconstructions``, both (B, C, H, W) in [-1, 1].

        ``discriminator``: the module to call, e.g. the DistributedDataParallel wrapper of ``self.discriminator``.
        Real and fake go through it in one call (one forward per backward, as DDP requires; GroupNorm keeps
        the two halves' statistics apart). Before ``disc_start`` the discriminator is not run: the loss is a
        constant 0 that needs no backward (check ``discriminator_active(step)`` before stepping its optimiser).
        Returns the () loss and {"discriminator", "logits_real", "logits_fake"} as floats.
        """
        if not self.discriminator_active(step):
            zero = torch.zeros((), device=images.device)
            return zero, {"discriminator": 0.0, "logits_real": 0.0, "logits_fake": 0.0}
        # detached here too, so the discriminator's loss can never reach the decoder
        discriminator = self.discriminator if discriminator is None else discriminator
        logits = discriminator(torch.cat([images.detach(), reconstructions_detached.detach()]))
        logits_real, logits_fake = logits.chunk(2)
        loss = hinge_d_loss(logits_real, logits_fake)
        logs = {"discriminator": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, _as_floats(logs)


def _as_floats(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    # one device-to-host copy for all the terms, not one sync per term
    values = torch.stack([value.detach().float().reshape(()) for value in logs.values()]).tolist()
    return dict(zip(logs, values))
