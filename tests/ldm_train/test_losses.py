"""The autoencoder's losses (ldm_train/losses.py) and its PatchGAN discriminator (ldm_train/discriminator.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_runtime.config import ConfigError
from ldm_train.discriminator import PatchDiscriminator
from ldm_train.losses import (
    AutoencoderLoss,
    AutoencoderLossConfig,
    PerceptualLoss,
    hinge_d_loss,
    hinge_g_loss,
)


def random_shapes_images(batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, 3, height, width) float32 in [-0.8, 0.8]: flat discs and squares on a shaded background."""
    rows = torch.linspace(-1, 1, height).view(1, 1, height, 1)
    cols = torch.linspace(-1, 1, width).view(1, 1, 1, width)
    background = torch.rand(batch, 3, 1, 1, generator=generator) * 1.2 - 0.6
    shading = (torch.rand(batch, 3, 1, 1, generator=generator) - 0.5) * 0.3
    images = (background + shading * cols).expand(batch, 3, height, width).clone()
    for shape_index in range(4):
        center_row = torch.rand(batch, 1, 1, 1, generator=generator) * 1.6 - 0.8
        center_col = torch.rand(batch, 1, 1, 1, generator=generator) * 1.6 - 0.8
        radius = torch.rand(batch, 1, 1, 1, generator=generator) * 0.4 + 0.2
        color = torch.rand(batch, 3, 1, 1, generator=generator) * 1.6 - 0.8
        if shape_index % 2:
            mask = (rows - center_row) ** 2 + (cols - center_col) ** 2 < radius**2
        else:
            mask = ((rows - center_row).abs() < radius) & ((cols - center_col).abs() < radius)
        images = torch.where(mask, color, images)
    return images.clamp(-0.8, 0.8)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, H, W) -> same shape, blurred with a separable Gaussian (reflect padding)."""
    radius = int(round(3 * sigma))
    positions = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(positions**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels, size = images.shape[1], kernel.numel()
    padded = F.pad(images, (radius,) * 4, mode="reflect")
    padded = F.conv2d(padded, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return F.conv2d(padded, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def smooth_shading(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A brightness field as large as the image, varying smoothly (bilinear over a 2x2 grid), per channel."""
    batch, channels, height, width = images.shape
    corners = torch.randn(batch, channels, 2, 2, generator=generator)
    return F.interpolate(corners, size=(height, width), mode="bilinear", align_corners=True)


# --- perceptual loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(16, 16), (32, 32), (64, 64), (48, 40), (37, 45)])
def test_perceptual_loss_is_zero_for_identical_images_and_positive_for_perturbed_ones(size):
    generator = torch.Generator().manual_seed(11)
    images = random_shapes_images(3, *size, generator)
    perturbed = images + 0.05 * torch.randn(images.shape, generator=generator)
    loss = PerceptualLoss()
    same = loss(images, images.clone())
    different = loss(images, perturbed)
    assert same.shape == () and same.dtype == torch.float32
    assert same.abs().item() < 1e-6
    assert torch.isfinite(different) and different.item() > 1e-2


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (48, 40)])
def test_perceptual_loss_ranks_edge_blur_worse_than_smooth_shading_with_equal_l1(size):
    # L1 sees the two copies as equally wrong by construction; a perceptual term must not
    generator = torch.Generator().manual_seed(5)
    images = random_shapes_images(4, *size, generator)
    blurred = gaussian_blur(images, sigma=1.0)
    blur_l1 = (blurred - images).abs().mean()
    shading = smooth_shading(images, generator)
    shaded = images + shading * blur_l1 / shading.abs().mean()
    torch.testing.assert_close((shaded - images).abs().mean(), blur_l1)
    loss = PerceptualLoss()
    assert loss(images, blurred) > 2.0 * loss(images, shaded)


def test_perceptual_loss_gradient_step_moves_blurred_reconstruction_towards_sharp_image():
    generator = torch.Generator().manual_seed(3)
    images = random_shapes_images(2, 32, 32, generator)
    reconstructions = gaussian_blur(images, sigma=1.0).requires_grad_(True)
    loss = PerceptualLoss()
    value = loss(images, reconstructions)
    value.backward()
    gradient = reconstructions.grad
    assert torch.isfinite(gradient).all() and gradient.abs().max() > 0
    stepped = reconstructions.detach() - 0.05 * gradient / gradient.abs().max()  # at most 0.05 per pixel
    assert loss(images, stepped) < value.detach()
    assert (stepped - images).abs().mean() < (reconstructions.detach() - images).abs().mean()


def test_perceptual_loss_ignores_bfloat16_autocast():
    generator = torch.Generator().manual_seed(8)
    images = random_shapes_images(2, 32, 32, generator)
    reconstructions = gaussian_blur(images, sigma=0.8)
    loss = PerceptualLoss()
    expected = loss(images, reconstructions)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = loss(images, reconstructions)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, expected, rtol=1e-6, atol=1e-7)


def test_perceptual_loss_has_no_parameters_and_no_checkpoint_state():
    loss = PerceptualLoss()
    assert list(loss.parameters()) == []
    assert loss.state_dict() == {}


@pytest.mark.parametrize("size", [(15, 32), (32, 8)])
def test_perceptual_loss_rejects_images_smaller_than_16_px(size):
    images = torch.rand(1, 3, *size) * 2 - 1
    with pytest.raises(ValueError, match="16"):
        PerceptualLoss()(images, images)


# --- hinge losses ------------------------------------------------------------------------------


def test_hinge_d_loss_matches_hand_computed_value():
    logits_real = torch.tensor([[2.0, 0.5], [-1.0, 0.25]])  # relu(1 - x): 0, 0.5, 2, 0.75 -> mean 0.8125
    logits_fake = torch.tensor([[-3.0, 0.5], [1.0, -0.5]])  # relu(1 + x): 0, 1.5, 2, 0.5 -> mean 1.0
    torch.testing.assert_close(hinge_d_loss(logits_real, logits_fake), torch.tensor(0.90625))


def test_hinge_g_loss_is_minus_mean_fake_logit_by_hand():
    logits_fake = torch.tensor([[-3.0, 0.5], [1.0, -0.5]])  # mean -0.5
    torch.testing.assert_close(hinge_g_loss(logits_fake), torch.tensor(0.5))


# --- discriminator -----------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "expected"), [((32, 32), (2, 2)), ((64, 64), (6, 6)), ((48, 40), (4, 3))])
def test_patch_discriminator_gives_at_least_2x2_logits_from_32_px(size, expected):
    discriminator = PatchDiscriminator(base_channels=8)
    logits = discriminator(torch.rand(2, 3, *size) * 2 - 1)
    assert logits.shape == (2, 1, *expected)
    assert tuple(discriminator.output_side(side) for side in size) == expected


def test_patch_discriminator_with_two_layers_gives_6x6_logits_at_32_px():
    logits = PatchDiscriminator(base_channels=8, num_layers=2)(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert logits.shape == (1, 1, 6, 6)


def test_patch_discriminator_rejects_images_below_its_minimum_side():
    discriminator = PatchDiscriminator(base_channels=8)
    with pytest.raises(ValueError, match="32"):
        discriminator(torch.rand(1, 3, 16, 64))


def test_patch_discriminator_uses_group_norm_and_taming_initialisation():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator()
    assert not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in discriminator.modules())
    norms = [module for module in discriminator.modules() if isinstance(module, nn.GroupNorm)]
    assert len(norms) == 3
    convs = [module for module in discriminator.modules() if isinstance(module, nn.Conv2d)]
    widest_conv = max(convs, key=lambda conv: conv.weight.numel())
    assert abs(widest_conv.weight.std().item() - 0.02) < 0.001
    assert abs(widest_conv.weight.mean().item()) < 0.001
    scales = torch.cat([norm.weight.detach() for norm in norms])
    assert abs(scales.mean().item() - 1.0) < 0.01 and abs(scales.std().item() - 0.02) < 0.005
    assert all(torch.equal(norm.bias, torch.zeros_like(norm.bias)) for norm in norms)


def test_discriminator_loss_falls_under_a_few_adam_steps_on_real_vs_blurred_images():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    real = random_shapes_images(8, 32, 32, generator)
    fake = gaussian_blur(real, sigma=1.5) + 0.1 * torch.randn(real.shape, generator=generator)
    loss = AutoencoderLoss(AutoencoderLossConfig(disc_start=0), PatchDiscriminator(base_channels=16))
    optimizer = torch.optim.Adam(loss.discriminator.parameters(), lr=1e-3, betas=(0.5, 0.9))
    losses = []
    for _ in range(12):
        value, logs = loss.discriminator_loss(real, fake, step=0)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(logs["discriminator"])
    assert losses[-1] < 0.7 * losses[0]
    assert logs["logits_real"] > logs["logits_fake"]


# --- AutoencoderLoss ---------------------------------------------------------------------------


class DiscriminatorThatMustNotRun(nn.Module):
    """Fails if run: proves that a code path does no discriminator work."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the discriminator ran before disc_start")


def linear_decoder_setup(generator: torch.Generator, size: int = 32):
    """Latents (2, 4, size, size), a 1x1-conv 'decoder' to 3 channels, and target images."""
    latents = torch.randn(2, 4, size, size, generator=generator)
    decoder = nn.Conv2d(4, 3, kernel_size=1, bias=False)
    with torch.no_grad():
        decoder.weight.copy_(0.3 * torch.randn(decoder.weight.shape, generator=generator))
    images = random_shapes_images(2, size, size, generator)
    return latents, decoder, images


def test_no_discriminator_work_before_disc_start():
    generator = torch.Generator().manual_seed(4)
    latents, decoder, images = linear_decoder_setup(generator)
    loss = AutoencoderLoss(AutoencoderLossConfig(disc_start=100), DiscriminatorThatMustNotRun())
    value, logs = loss.generator_loss(images, decoder(latents), torch.tensor(3.0), step=99,
                                      last_layer_weight=decoder.weight)
    assert logs["generator_adversarial"] == 0.0 and logs["adaptive_weight"] == 0.0
    d_value, d_logs = loss.discriminator_loss(images, decoder(latents).detach(), step=99)
    assert d_value.item() == 0.0 and not d_value.requires_grad and d_logs["discriminator"] == 0.0
    assert not loss.discriminator_active(99) and loss.discriminator_active(100)


def test_gan_term_is_absent_before_disc_start_and_present_from_it():
    generator = torch.Generator().manual_seed(6)
    latents, decoder, images = linear_decoder_setup(generator)
    torch.manual_seed(6)
    config = AutoencoderLossConfig(disc_start=10)
    loss = AutoencoderLoss(config, PatchDiscriminator(base_channels=8))
    kl = torch.tensor(250.0)
    reconstructions = decoder(latents)
    without_gan = (
        (images - reconstructions).abs().mean()
        + PerceptualLoss()(images, reconstructions)
        + config.kl_weight / (3 * 32 * 32) * kl
    )

    before, before_logs = loss.generator_loss(images, reconstructions, kl, step=9, last_layer_weight=decoder.weight)
    torch.testing.assert_close(before, without_gan)
    before.backward()
    assert all(parameter.grad is None for parameter in loss.discriminator.parameters())

    reconstructions = decoder(latents)
    after, after_logs = loss.generator_loss(images, reconstructions, kl, step=10, last_layer_weight=decoder.weight)
    assert after_logs["adaptive_weight"] > 0
    expected = without_gan.detach() + after_logs["adaptive_weight"] * after_logs["generator_adversarial"]
    torch.testing.assert_close(after.detach(), expected)
    assert abs(after.item() - without_gan.item()) > 1e-6
    after.backward()
    assert all(parameter.grad is not None for parameter in loss.discriminator.parameters())
    assert before_logs["l1"] == pytest.approx(after_logs["l1"])


def linear_patch_discriminator(generator: torch.Generator, scale: float) -> nn.Conv2d:
    discriminator = nn.Conv2d(3, 1, kernel_size=1)
    with torch.no_grad():
        discriminator.weight.copy_(scale * torch.randn(discriminator.weight.shape, generator=generator))
    return discriminator


def test_adaptive_weight_matches_closed_form_gradients_of_linear_decoder():
    generator = torch.Generator().manual_seed(9)
    latents, decoder, images = linear_decoder_setup(generator)
    discriminator = linear_patch_discriminator(generator, scale=0.5)
    config = AutoencoderLossConfig(perceptual_weight=0.0, l1_weight=2.0, disc_start=0, disc_weight=0.7)
    loss = AutoencoderLoss(config, discriminator)
    reconstructions = decoder(latents)
    value, logs = loss.generator_loss(images, reconstructions, torch.tensor(0.0), step=0,
                                      last_layer_weight=decoder.weight)

    # reconstructions[b, c] = sum_j W[c, j] latents[b, j]; logits = sum_c v[c] reconstructions[b, c] + bias
    residual_sign = torch.sign(reconstructions.detach() - images)
    l1_gradient = config.l1_weight * torch.einsum("bchw,bjhw->cj", residual_sign, latents) / residual_sign.numel()
    pixels_per_channel = latents.shape[0] * latents.shape[2] * latents.shape[3]
    v = discriminator.weight.detach().view(3)
    adversarial_gradient = -v[:, None] * latents.sum(dim=(0, 2, 3))[None, :] / pixels_per_channel
    expected_weight = config.disc_weight * l1_gradient.norm() / (adversarial_gradient.norm() + 1e-4)
    assert logs["adaptive_weight"] == pytest.approx(expected_weight.item(), rel=1e-4)

    l1 = (reconstructions.detach() - images).abs().mean()
    adversarial = -discriminator(reconstructions.detach()).mean()
    expected_loss = config.l1_weight * l1 + expected_weight * adversarial
    torch.testing.assert_close(value.detach(), expected_loss, rtol=1e-4, atol=1e-6)


def test_adaptive_weight_is_clamped_at_1e4_times_disc_weight():
    generator = torch.Generator().manual_seed(2)
    latents, decoder, images = linear_decoder_setup(generator)
    config = AutoencoderLossConfig(perceptual_weight=0.0, l1_weight=100.0, disc_start=0, disc_weight=0.5)
    loss = AutoencoderLoss(config, linear_patch_discriminator(generator, scale=1e-9))
    _, logs = loss.generator_loss(images, decoder(latents), torch.tensor(0.0), step=0,
                                  last_layer_weight=decoder.weight)
    assert logs["adaptive_weight"] == pytest.approx(0.5e4)


def test_fixed_gan_weight_is_disc_weight_when_adaptive_weight_is_off():
    generator = torch.Generator().manual_seed(12)
    latents, decoder, images = linear_decoder_setup(generator)
    config = AutoencoderLossConfig(disc_start=0, disc_weight=0.3, adaptive_weight=False)
    loss = AutoencoderLoss(config, linear_patch_discriminator(generator, scale=0.5))
    _, logs = loss.generator_loss(images, decoder(latents), torch.tensor(0.0), step=0,
                                  last_layer_weight=decoder.weight)
    assert logs["adaptive_weight"] == pytest.approx(0.3)


def test_adaptive_weight_is_zero_without_autograd_as_in_ldm_validation():
    generator = torch.Generator().manual_seed(13)
    latents, decoder, images = linear_decoder_setup(generator)
    loss = AutoencoderLoss(AutoencoderLossConfig(disc_start=0), linear_patch_discriminator(generator, scale=0.5))
    with torch.no_grad():
        value, logs = loss.generator_loss(images, decoder(latents), torch.tensor(0.0), step=0,
                                          last_layer_weight=decoder.weight)
    assert logs["adaptive_weight"] == 0.0 and logs["generator_adversarial"] != 0.0
    assert value.item() == pytest.approx(logs["reconstruction"])


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_regularization_weight_is_kl_weight_per_pixel_or_codebook_weight(kind):
    generator = torch.Generator().manual_seed(14)
    latents, decoder, images = linear_decoder_setup(generator)
    config = AutoencoderLossConfig(kl_weight=0.3, codebook_weight=0.25, disc_start=10**6)
    loss = AutoencoderLoss(config, DiscriminatorThatMustNotRun(), kind=kind)
    regularization = torch.rand((), generator=generator) * 100 + 1
    value, logs = loss.generator_loss(images, decoder(latents), regularization, step=0,
                                      last_layer_weight=decoder.weight)
    weight = 0.3 / (3 * 32 * 32) if kind == "kl" else 0.25
    assert value.item() == pytest.approx(logs["reconstruction"] + weight * regularization.item(), rel=1e-6)
    assert logs["kl" if kind == "kl" else "codebook"] == pytest.approx(regularization.item())


@pytest.mark.parametrize("change", [{"kl_weight": -1e-6}, {"disc_weight": float("nan")}, {"disc_start": -1}])
def test_autoencoder_loss_rejects_invalid_config(change):
    config = dataclasses.replace(AutoencoderLossConfig(), **change)
    with pytest.raises(ConfigError, match=next(iter(change))):
        AutoencoderLoss(config, DiscriminatorThatMustNotRun())


def test_autoencoder_loss_rejects_unknown_kind():
    with pytest.raises(ConfigError, match="'gaussian'"):
        AutoencoderLoss(AutoencoderLossConfig(), DiscriminatorThatMustNotRun(), kind="gaussian")
