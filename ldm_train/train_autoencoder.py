"""Stage 1: the autoencoder (perceptual compression), trained as in LDM with L1 + perceptual + KL (or VQ)
losses and a PatchGAN discriminator switched on after ``disc_start`` steps."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ldm_runtime.checkpoint import load_tensors
from ldm_runtime.config import ModelConfig, channel_mult_for_factor, preset
from ldm_runtime.models import Autoencoder
from ldm_train.checkpoint import (
    load_train_state, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint, select_prefixed,
)
from ldm_train.data import ShapesDataset, build_dataset
from ldm_train.discriminator import PatchDiscriminator
from ldm_train.losses import AutoencoderLoss
from ldm_train.progress import TrainingProgress
from ldm_train.run import (
    METRICS_JSONL, AutoencoderSettings, LiveFolder, MetricsLog, Process, all_reduce_mean, autocast_context,
    batch_indices, check_finite,
    check_resume_settings, start_process, end_process, step_generator,
)
from ldm_train.samples import fetch_images, save_reconstruction_grid

STAGE = "autoencoder"
SCALE_FACTOR_SAMPLES = 512
VALIDATION_IMAGES = 256


def autoencoder_model_config(settings: AutoencoderSettings) -> ModelConfig:
    """The preset's model description with the flags' overrides applied, validated."""
    config = preset(settings.preset)
    autoencoder = config.autoencoder
    if settings.kind is not None:
        autoencoder = dataclasses.replace(autoencoder, kind=settings.kind)
    if settings.factor is not None:
        autoencoder = dataclasses.replace(autoencoder, channel_mult=channel_mult_for_factor(settings.factor))
    if settings.channels is not None:
        autoencoder = dataclasses.replace(autoencoder, base_channels=settings.channels)
    if settings.num_groups is not None:
        autoencoder = dataclasses.replace(autoencoder, num_groups=settings.num_groups)
    if settings.latent_channels is not None:
        autoencoder = dataclasses.replace(autoencoder, latent_channels=settings.latent_channels)
        config = dataclasses.replace(config, unet=dataclasses.replace(
            config.unet, in_channels=settings.latent_channels, out_channels=settings.latent_channels))
    config = dataclasses.replace(config, autoencoder=autoencoder)
    config.validate()
    return config


@torch.no_grad()
def latent_scale_factor(autoencoder: Autoencoder, dataset, device: torch.device, batch_size: int) -> float:
    """1 / std of posterior samples of (up to) the first SCALE_FACTOR_SAMPLES training images (LDM's recipe)."""
    count = min(len(dataset), SCALE_FACTOR_SAMPLES)
    generator = torch.Generator().manual_seed(0)
    latents = []
    for start in range(0, count, batch_size):
        images = fetch_images(dataset, range(start, min(start + batch_size, count))).to(device)
        posterior = autoencoder.encode(images)
        latents.append(posterior.sample(generator=generator.manual_seed(start)).float().cpu())
    return float(1.0 / torch.cat(latents).std())


@torch.no_grad()
def reconstruction_psnr(autoencoder: Autoencoder, dataset, device: torch.device, batch_size: int) -> float:
    """Mean per-image PSNR (dB, pixels in [0, 1]) of decode(mode(encode(x))) over ``dataset``."""
    scores = []
    for start in range(0, len(dataset), batch_size):
        images = fetch_images(dataset, range(start, min(start + batch_size, len(dataset)))).to(device)
        reconstruction = autoencoder.decode(autoencoder.encode(images).mode()).clamp(-1, 1)
        mse = ((reconstruction - images) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        scores.append(-10.0 * torch.log10(mse).cpu())
    return float(torch.cat(scores).mean())


def train_autoencoder(settings: AutoencoderSettings, resume: bool = False) -> Path:
    """Train (or resume) the autoencoder; returns the checkpoint dir."""
    settings.validate()
    config = autoencoder_model_config(settings)
    out = Path(settings.out)
    process = start_process(settings.device)
    try:
        return _train(settings, config, out, process, resume)
    finally:
        end_process(process)


def _train(settings: AutoencoderSettings, config: ModelConfig, out: Path, process: Process, resume: bool) -> Path:
    device = process.device
    start_step = 0
    if resume:
        state = load_train_state(out, STAGE, optimizers=("_optimizer", "_disc_optimizer"))
        check_resume_settings(state.settings, settings, out, state.step)
        start_step = state.step
    dataset = build_dataset(settings.data, config.image_size, settings.seed, skip_bad=settings.skip_bad_images)

    torch.manual_seed(settings.seed)  # identical initial weights on every rank
    autoencoder = Autoencoder(config.autoencoder).to(device)
    discriminator = PatchDiscriminator(in_channels=config.autoencoder.in_channels).to(device)
    loss_fn = AutoencoderLoss(settings.loss_config(), discriminator, kind=config.autoencoder.kind).to(device)
    # Adam betas (0.5, 0.9) as in taming-transformers / LDM for GAN-trained autoencoders.
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=settings.learning_rate, betas=(0.5, 0.9),
                                  weight_decay=settings.weight_decay)
    disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=settings.learning_rate, betas=(0.5, 0.9),
                                       weight_decay=settings.weight_decay)
    if resume:
        tensors = load_tensors(out / "train_state.safetensors")
        autoencoder.load_state_dict(select_prefixed(tensors, "autoencoder."))
        discriminator.load_state_dict(select_prefixed(tensors, "discriminator."))
        optimizer_from_tensors(optimizer, "optimizer", tensors, state.settings["_optimizer"])
        optimizer_from_tensors(disc_optimizer, "disc_optimizer", tensors, state.settings["_disc_optimizer"])
    model = autoencoder
    if process.world_size > 1:
        model = DistributedDataParallel(autoencoder)
        discriminator_ddp = DistributedDataParallel(discriminator)
    else:
        discriminator_ddp = discriminator

    preview = fetch_images(dataset, range(min(8, len(dataset))))
    # Held-out images for the PSNR in metrics.jsonl: the shapes evaluation split (other data: none).
    validation = (ShapesDataset.heldout(VALIDATION_IMAGES, config.image_size, settings.seed)
                  if settings.data.split(":")[0] == "shapes" else None)
    live = LiveFolder(out, resumed=resume, writer=process.is_main)
    log = MetricsLog(live.path / METRICS_JSONL, start_step if resume else None) if process.is_main else None
    progress = TrainingProgress(settings.steps, start_step, STAGE, enabled=process.is_main)

    try:  # the bar ends its line even when a step raises, so an error message starts on its own
        for step in range(start_step, settings.steps):
            generator = step_generator(settings.seed, step, process.rank)
            indices = batch_indices(len(dataset), step, settings.batch_size, process, settings.seed)
            images = fetch_images(dataset, indices.tolist()).to(device)

            autoencoder.train()
            discriminator.requires_grad_(False)
            with autocast_context(settings.precision, device):
                output = model(images, sample_posterior=True, generator=generator)
                loss, logs = loss_fn.generator_loss(images, output.reconstruction, output.regularization_loss, step,
                                                    autoencoder.decoder_last_layer)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), settings.grad_clip)
            loss_value = float(all_reduce_mean(loss.detach(), process))
            check_finite(step, out, loss=loss_value, gradient_norm=grad_norm)
            optimizer.step()

            discriminator.requires_grad_(True)
            if loss_fn.discriminator_active(step):
                with autocast_context(settings.precision, device):
                    disc_loss, disc_logs = loss_fn.discriminator_loss(images, output.reconstruction.detach(), step,
                                                                      discriminator=discriminator_ddp)
                disc_optimizer.zero_grad(set_to_none=True)  # also drops what the generator step left there
                disc_loss.backward()
                disc_grad_norm = torch.nn.utils.clip_grad_norm_(discriminator.parameters(), settings.grad_clip)
                check_finite(step, out, discriminator_gradient_norm=disc_grad_norm)
                disc_optimizer.step()
                logs.update(disc_logs)

            done = step + 1
            progress.update(loss=loss_value)
            if log is not None and (done % settings.log_every == 0 or done == settings.steps):
                log.write(done, {"loss": loss_value, "grad_norm": float(grad_norm), **logs})
            if process.is_main and (done % settings.sample_every == 0 or done == settings.steps):
                autoencoder.eval()
                with torch.no_grad():
                    reconstruction = autoencoder.decode(autoencoder.encode(preview.to(device)).mode()).cpu()
                save_reconstruction_grid(live.path / "samples" / f"step_{done:07d}.png", preview, reconstruction)
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                if log is not None and validation is not None:
                    autoencoder.eval()
                    log.write(done, {"val_psnr_db": reconstruction_psnr(autoencoder, validation, device, 64)})
                _save(out, settings, config, autoencoder, discriminator, optimizer, disc_optimizer, dataset, done,
                      process, first=live.first, logs=live.pending)
                live.saved(log)
    finally:
        progress.close()
        live.close()
    return out


def _save(out: Path, settings: AutoencoderSettings, config: ModelConfig, autoencoder: Autoencoder,
          discriminator: PatchDiscriminator, optimizer, disc_optimizer, dataset, step: int, process: Process,
          first: bool, logs: Path | None) -> None:
    if not process.is_main:
        return
    autoencoder.eval()
    scale = latent_scale_factor(autoencoder, dataset, process.device, settings.batch_size)
    config = dataclasses.replace(config, latent_scale_factor=scale)
    optimizer_tensors, optimizer_meta = optimizer_to_tensors(optimizer, "optimizer")
    disc_tensors, disc_meta = optimizer_to_tensors(disc_optimizer, "disc_optimizer")
    train_tensors = {
        **{f"autoencoder.{k}": v for k, v in autoencoder.state_dict().items()},
        **{f"discriminator.{k}": v for k, v in discriminator.state_dict().items()},
        **optimizer_tensors, **disc_tensors,
    }
    recorded = {**settings.to_dict(), "_optimizer": optimizer_meta, "_disc_optimizer": disc_meta}
    save_checkpoint(out, config, {"autoencoder": autoencoder.state_dict()}, train_tensors, STAGE, step, recorded,
                    first=first, logs=logs)
