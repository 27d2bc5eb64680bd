"""Stage 2: the text-conditional UNet, trained on the frozen autoencoder's latents with the ε objective.

The autoencoder is frozen, so every image's posterior (mean, std) is computed once up front; a frozen text
encoder likewise encodes each distinct caption once. A step then costs only the UNet (and a text encoder
trained from scratch). A fraction ``cond_drop_prob`` of samples get the empty prompt, which is what
classifier-free guidance needs at sampling time.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ldm_runtime.checkpoint import TEXT_ENCODER_DIR, load_model_config, load_state_dict_file, load_tensors
from ldm_runtime.config import ConfigError, ModelConfig, inpainting_channels, preset
from ldm_runtime.engines.torch_engine import TorchEngine
from ldm_runtime.models import Autoencoder, TextEncoder, UNet
from ldm_runtime.previews import write_fitted_preview
from ldm_train.checkpoint import (
    load_train_state, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint, select_prefixed,
)
from ldm_train.data import build_dataset
from ldm_train.diffusion import ForwardProcess
from ldm_train.masks import random_masks
from ldm_train.progress import TrainingProgress
from ldm_train.run import (
    METRICS_JSONL, LiveFolder, MetricsLog, Process, UNetSettings, all_reduce_mean, autocast_context, batch_indices,
    check_finite,
    check_resume_settings, end_process, learning_rate_at, start_process, step_generator,
)
from ldm_train.samples import fetch_images, save_grid

STAGE = "unet"

logger = logging.getLogger(__name__)
PREVIEW_TIMESTEPS = (250, 500, 750)


class Denoiser(torch.nn.Module):
    """The UNet plus the text encoder, as one module so data parallelism syncs both when both train."""

    def __init__(self, unet: UNet, text_encoder: TextEncoder):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, noisy_latents, timesteps, context=None, context_mask=None, input_ids=None,
                attention_mask=None):
        if context is None:
            context = self.text_encoder(input_ids, attention_mask)
            context_mask = attention_mask.bool()
        return self.unet(noisy_latents, timesteps, context, context_mask)


@dataclass
class EncodedData:
    """Per-item latent posteriors and per-caption text, computed once. Caption id 0 is the empty prompt."""

    latent_mean: torch.Tensor  # (N, C, h, w) float32
    latent_std: torch.Tensor  # (N, C, h, w) float32 (zeros for a VQ autoencoder)
    caption_ids: torch.Tensor  # (N,) int64 into the tables below
    input_ids: torch.Tensor  # (U, L) int64
    attention_mask: torch.Tensor  # (U, L) int64
    context: torch.Tensor | None  # (U, L, D) float16, only for a frozen text encoder


def unet_model_config(settings: UNetSettings, autoencoder_config: ModelConfig) -> ModelConfig:
    """The preset's UNet and text encoder on top of the trained autoencoder's description."""
    config = preset(settings.preset)
    text = config.text_encoder
    if settings.text_encoder is not None:
        text = dataclasses.replace(text, path=settings.text_encoder)
    if settings.text_encoder_kind is not None:
        text = dataclasses.replace(text, kind=settings.text_encoder_kind)
    latent_channels = autoencoder_config.autoencoder.latent_channels
    in_channels = inpainting_channels(latent_channels) if settings.task == "inpaint" else latent_channels
    unet = dataclasses.replace(config.unet, in_channels=in_channels, out_channels=latent_channels)
    if settings.channels is not None:
        unet = dataclasses.replace(unet, model_channels=settings.channels)
    if settings.num_groups is not None:
        unet = dataclasses.replace(unet, num_groups=settings.num_groups)
    schedule = config.schedule
    if settings.prediction_type is not None:
        schedule = dataclasses.replace(schedule, prediction_type=settings.prediction_type)
    config = dataclasses.replace(
        config, schedule=schedule,
        image_size=autoencoder_config.image_size, autoencoder=autoencoder_config.autoencoder,
        latent_scale_factor=autoencoder_config.latent_scale_factor, unet=unet, text_encoder=text,
    )
    config.validate()
    return config


def train_unet(settings: UNetSettings, resume: bool = False) -> Path:
    """Train (or resume) the UNet on top of the autoencoder in ``settings.autoencoder``; returns the checkpoint dir."""
    settings.validate()
    if settings.autoencoder is None:
        raise ConfigError("the unet stage needs --autoencoder DIR (a checkpoint dir written by 'ldm-train autoencoder')")
    autoencoder_dir = Path(settings.autoencoder)
    config = unet_model_config(settings, load_model_config(autoencoder_dir))
    process = start_process(settings.device)
    try:
        return _train(settings, config, autoencoder_dir, Path(settings.out), process, resume)
    finally:
        end_process(process)


def _train(settings: UNetSettings, config: ModelConfig, autoencoder_dir: Path, out: Path, process: Process,
           resume: bool) -> Path:
    device = process.device
    start_step = 0
    if resume:
        state = load_train_state(out, STAGE, optimizers=("_optimizer",))
        check_resume_settings(state.settings, settings, out, state.step)
        start_step = state.step

    autoencoder = Autoencoder(config.autoencoder)
    load_state_dict_file(autoencoder, autoencoder_dir / "autoencoder.safetensors")
    autoencoder.to(device).eval().requires_grad_(False)
    torch.manual_seed(settings.seed)  # identical initial weights on every rank and in every run
    text_encoder = TextEncoder(config.text_encoder)
    # The UNet reads whatever width the text encoder produces.
    config = dataclasses.replace(config, unet=dataclasses.replace(config.unet, context_dim=text_encoder.hidden_size))
    config.validate()

    unet = UNet(config.unet)
    if settings.init_unet is not None:
        initialise_unet(unet, Path(settings.init_unet))
    denoiser = Denoiser(unet, text_encoder).to(device)
    dataset = build_dataset(settings.data, config.image_size, settings.seed, skip_bad=settings.skip_bad_images)
    data = encode_dataset(dataset, autoencoder, text_encoder, device, settings.batch_size, process.is_main)
    pixels = dataset_pixels(dataset, process.is_main) if config.inpainting else None
    ema = copy.deepcopy(denoiser).requires_grad_(False)
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    if resume:
        tensors = load_tensors(out / "train_state.safetensors")
        for name, module in _trained_modules(denoiser).items():
            module.load_state_dict(select_prefixed(tensors, f"model.{name}."))
        for name, module in _trained_modules(ema).items():
            module.load_state_dict(select_prefixed(tensors, f"ema.{name}."))
        optimizer_from_tensors(optimizer, "optimizer", tensors, state.settings["_optimizer"])
    model = DistributedDataParallel(denoiser) if process.world_size > 1 else denoiser

    forward_process = ForwardProcess(config.schedule)
    scale = config.latent_scale_factor
    live = LiveFolder(out, resumed=resume, writer=process.is_main)
    log = MetricsLog(live.path / METRICS_JSONL, start_step if resume else None) if process.is_main else None
    progress = TrainingProgress(settings.steps, start_step, STAGE, enabled=process.is_main)

    try:  # the bar ends its line even when a step raises, so an error message starts on its own
        for step in range(start_step, settings.steps):
            generator = step_generator(settings.seed, step, process.rank)
            torch.manual_seed(settings.seed * 1_000_003 + step)  # dropout in a scratch text encoder, if any
            indices, latents, noise, timesteps, caption_ids = training_batch(
                data, step, settings.batch_size, process, settings.seed, generator, scale,
                config.schedule.num_train_timesteps, settings.cond_drop_prob)
            batch = len(indices)

            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(settings, step)
            latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
            noisy = forward_process.add_noise(latents, noise, timesteps)
            target = forward_process.target(latents, noise, timesteps)
            if pixels is not None:  # the mask and the masked image's latents follow the latents
                masks = random_masks(batch, config.image_size, config.image_size, generator)
                noisy = torch.cat([noisy, inpainting_conditioning(autoencoder, pixels[indices], masks, config,
                                                                  device)], dim=1)
            denoiser.train()
            with autocast_context(settings.precision, device):
                prediction = model(noisy, timesteps, **_conditioning(data, caption_ids, device))
            loss = forward_process.loss(prediction, target, timesteps, settings.min_snr_gamma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
            loss_value = float(all_reduce_mean(loss.detach(), process))
            check_finite(step, out, loss=loss_value, gradient_norm=grad_norm)
            optimizer.step()
            _update_ema(ema, denoiser, settings.ema_decay, step)

            done = step + 1
            progress.update(loss=loss_value)
            if log is not None and (done % settings.log_every == 0 or done == settings.steps):
                log.write(done, {"loss": loss_value, "grad_norm": float(grad_norm),
                                 "learning_rate": learning_rate_at(settings, step)})
            if process.is_main and (done % settings.sample_every == 0 or done == settings.steps):
                _save_preview(live.path / "samples" / f"step_{done:07d}.png", ema, autoencoder, data, forward_process,
                              scale, dataset, device, pixels, config)
            if process.is_main and (done % settings.checkpoint_every == 0 or done == settings.steps):
                _save(out, settings, config, autoencoder, denoiser, ema, optimizer, done,
                      first=live.first, logs=live.pending)
                live.saved(log)
    finally:
        progress.close()
        live.close()
    if process.is_main:  # the autoencoder is final: the previews' latent-to-RGB map, so servers start without fitting
        print(f"ldm-train: {write_fitted_preview(TorchEngine(out, device=str(device)), out)}", file=sys.stderr)
    return out


@torch.no_grad()
def encode_dataset(dataset, autoencoder: Autoencoder, text_encoder: TextEncoder, device: torch.device,
                   batch_size: int, show_progress: bool) -> EncodedData:
    """Posterior of every image and tokens (and, for a frozen encoder, the context) of every distinct caption.
    Fixed chunking in item order, so the result is the same in every run and on every rank."""
    means, stds, captions = [], [], []
    chunks = range(0, len(dataset), batch_size)
    for start in tqdm(chunks, desc="encode images", disable=not show_progress, leave=False):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        posterior = autoencoder.encode(torch.stack([image for image, _ in items]).to(device))
        means.append(posterior.mode().float().cpu())
        stds.append(posterior.std().float().cpu())
        captions.extend(caption for _, caption in items)
    distinct = [""] + sorted(set(captions) - {""})
    position = {caption: index for index, caption in enumerate(distinct)}
    input_ids, attention_mask = text_encoder.tokenize(distinct)
    warn_truncated_captions(distinct, input_ids, attention_mask, text_encoder)
    context = None
    if not text_encoder.trainable:
        parts = []
        for start in tqdm(range(0, len(distinct), 64), desc="encode captions", disable=not show_progress,
                          leave=False):
            parts.append(text_encoder(input_ids[start:start + 64].to(device),
                                      attention_mask[start:start + 64].to(device)).half().cpu())
        context = torch.cat(parts)
    return EncodedData(
        latent_mean=torch.cat(means), latent_std=torch.cat(stds),
        caption_ids=torch.tensor([position[caption] for caption in captions]),
        input_ids=input_ids, attention_mask=attention_mask, context=context,
    )


def warn_truncated_captions(captions: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            text_encoder: TextEncoder) -> None:
    """One warning if any of ``captions`` (distinct) has more tokens than its row of ``input_ids`` holds: how many
    were cut, to how many tokens, and how many of those now read the same as another caption."""
    tokenizer = getattr(text_encoder, "tokenizer", None)
    full = [index for index in range(len(captions)) if bool(attention_mask[index].all())]
    if tokenizer is None or not full:
        return
    max_length = input_ids.shape[1]
    lengths = tokenizer([captions[index] for index in full], truncation=False, verbose=False)["input_ids"]
    cut = [index for index, ids in zip(full, lengths) if len(ids) > max_length]
    if not cut:
        return
    _, inverse, counts = torch.unique(input_ids, dim=0, return_inverse=True, return_counts=True)
    merged = sum(int(counts[inverse[index]]) > 1 for index in cut)
    same = f", and {merged} of them now read the same as another caption" if merged else ""
    logger.warning("%d of %d distinct captions are longer than the text encoder's %d tokens and were cut to %d%s; "
                   "the words past the cut do not condition the model", len(cut), len(captions), max_length,
                   max_length, same)


def initialise_unet(unet: UNet, folder: Path) -> None:
    """Load the UNet weights of checkpoint dir ``folder`` into ``unet``; an inpainting ``unet`` over a text-to-image
    one gets ``conv_in``'s weights for the latents and zeros for the mask and the masked image's latents, so that it
    starts as that model. ``ConfigError`` naming a weight whose shape differs otherwise."""
    state = load_tensors(folder / "unet.safetensors")
    weight = state.get("conv_in.weight")
    wanted = unet.conv_in.weight.shape
    if weight is not None and weight.shape[1] < wanted[1] and weight.shape[0] == wanted[0]:
        state["conv_in.weight"] = torch.cat([weight, weight.new_zeros(wanted[0], wanted[1] - weight.shape[1],
                                                                      *weight.shape[2:])], dim=1)
    own = unet.state_dict()
    for name, value in state.items():
        if name in own and tuple(own[name].shape) != tuple(value.shape):
            raise ConfigError(f"--init-unet {folder}: its {name} is {tuple(value.shape)} and this UNet's is "
                              f"{tuple(own[name].shape)}; expected a UNet of the same widths (--preset, --channels)")
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise ConfigError(f"--init-unet {folder}: its UNet {'lacks' if missing else 'has an extra'} {name}; "
                          f"expected a UNet of the same structure (--preset)")


def dataset_pixels(dataset, show_progress: bool) -> torch.Tensor:
    """Every item's image, ``(N, 3, H, W) uint8``: an inpainting UNet's masked images are made from them anew at
    each step (a new mask each time)."""
    images = [dataset[index][0] for index in tqdm(range(len(dataset)), desc="keep images",
                                                  disable=not show_progress, leave=False)]
    return torch.stack([((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) for image in images])


@torch.no_grad()
def inpainting_conditioning(autoencoder: Autoencoder, pixels: torch.Tensor, masks: torch.Tensor, config: ModelConfig,
                            device: torch.device) -> torch.Tensor:
    """What an inpainting UNet takes after the latents, as the runtime makes it (``Pipeline``, after diffusers'
    StableDiffusionInpaintPipeline): the mask at the latents' size (every f-th pixel: nearest) and the posterior
    mode of the image with the mask's pixels at 0, times latent_scale_factor. ``pixels`` ``(B, 3, H, W) uint8``,
    ``masks`` ``(B, 1, H, W)`` with 1 = repaint."""
    factor = config.autoencoder.factor
    images = pixels.to(device).float() / 255 * 2 - 1
    masks = masks.to(device)
    masked = images * (masks < 0.5)
    latents = autoencoder.encode(masked).mode() * config.latent_scale_factor
    return torch.cat([masks[:, :, ::factor, ::factor], latents], dim=1)


def training_batch(data: EncodedData, step: int, batch_size: int, process, seed: int, generator: torch.Generator,
                   scale: float, num_train_timesteps: int, cond_drop_prob: float):
    """Step ``step``'s (indices, latents, noise, timesteps, caption ids; caption 0, the empty prompt, for the dropped
    ones), every draw from ``generator`` in a fixed order, so that a resumed run replays it."""
    indices = batch_indices(len(data.caption_ids), step, batch_size, process, seed)
    batch = len(indices)
    latents = training_latents(data, indices, generator, scale)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    dropped = torch.rand(batch, generator=generator) < cond_drop_prob
    caption_ids = torch.where(dropped, torch.zeros_like(indices), data.caption_ids[indices])
    return indices, latents, noise, timesteps, caption_ids


def training_latents(data: EncodedData, indices: torch.Tensor, generator: torch.Generator,
                     scale: float) -> torch.Tensor:
    """A fresh posterior sample of items ``indices``, times the latent scale factor: (B, C, h, w) float32 on the
    CPU. LDM trains the UNet on samples of q(z|x), not on its mean (the scale factor was fitted on samples too)."""
    mean, std = data.latent_mean[indices], data.latent_std[indices]
    return (mean + std * torch.randn(mean.shape, generator=generator)) * scale


def _conditioning(data: EncodedData, caption_ids: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    if data.context is not None:
        return {"context": data.context[caption_ids].float().to(device),
                "context_mask": data.attention_mask[caption_ids].bool().to(device)}
    return {"input_ids": data.input_ids[caption_ids].to(device),
            "attention_mask": data.attention_mask[caption_ids].to(device)}


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    # The warm-up keeps early EMA weights from being dominated by the random initialisation.
    decay = min(decay, (1 + step) / (10 + step))
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        if param.requires_grad:
            ema_param.lerp_(param, 1.0 - decay)


@torch.no_grad()
def _save_preview(path: Path, ema: Denoiser, autoencoder: Autoencoder, data: EncodedData,
                  forward_process: ForwardProcess, scale: float, dataset, device: torch.device,
                  pixels: torch.Tensor | None = None, config: ModelConfig | None = None) -> None:
    """One-step denoising preview: top row the real images, then the EMA model's x̂0 from x_t for each t (an
    inpainting model's with the middle quarter of each image masked)."""
    count = min(8, len(dataset))
    indices = torch.arange(count)
    latents = data.latent_mean[indices].to(device) * scale
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)).to(device)
    rows = [fetch_images(dataset, range(count))]
    extra = None
    if pixels is not None:
        side = pixels.shape[-1]
        masks = torch.zeros(count, 1, side, side)
        masks[:, :, side // 4:3 * side // 4, side // 4:3 * side // 4] = 1
        extra = inpainting_conditioning(autoencoder, pixels[indices], masks, config, device)
    ema.eval()
    for t in PREVIEW_TIMESTEPS:
        timesteps = torch.full((count,), t, device=device)
        noisy = forward_process.add_noise(latents, noise, timesteps)
        unet_input = noisy if extra is None else torch.cat([noisy, extra], dim=1)
        prediction = ema(unet_input, timesteps, **_conditioning(data, data.caption_ids[indices], device))
        alpha_bar = forward_process.alphas_cumprod[t].item()
        if forward_process.schedule.prediction_type == "epsilon":
            predicted = (noisy - (1 - alpha_bar) ** 0.5 * prediction) / alpha_bar**0.5
        else:
            predicted = alpha_bar**0.5 * noisy - (1 - alpha_bar) ** 0.5 * prediction
        rows.append(autoencoder.decode(predicted / scale).cpu())
    save_grid(path, rows, upscale=max(1, 128 // rows[0].shape[-1]))


def _save(out: Path, settings: UNetSettings, config: ModelConfig, autoencoder: Autoencoder, denoiser: Denoiser,
          ema: Denoiser, optimizer, step: int, first: bool, logs: Path | None) -> None:
    weights = {"autoencoder": autoencoder.state_dict(), "unet": ema.unet.state_dict()}
    if denoiser.text_encoder.trainable:
        weights["text_encoder"] = ema.text_encoder.state_dict()
    optimizer_tensors, optimizer_meta = optimizer_to_tensors(optimizer, "optimizer")
    train_tensors = dict(optimizer_tensors)
    for prefix, source in (("model", denoiser), ("ema", ema)):
        for name, module in _trained_modules(source).items():
            train_tensors.update({f"{prefix}.{name}.{k}": v for k, v in module.state_dict().items()})
    recorded = {**settings.to_dict(), "_optimizer": optimizer_meta}
    config, text_encoder_folder = _self_contained(config)
    save_checkpoint(out, config, weights, train_tensors, STAGE, step, recorded,
                    save_tokenizer=denoiser.text_encoder.save_tokenizer, text_encoder_folder=text_encoder_folder,
                    first=first, logs=logs)


def _self_contained(config: ModelConfig) -> tuple[ModelConfig, Path | None]:
    """What the checkpoint records: a pretrained text encoder read from a folder is copied into the checkpoint
    (``text_encoder/``, which model.json then names), since a model folder never names a path outside itself;
    one from an installed package stays named by the package."""
    text = config.text_encoder
    folder = Path(text.path).expanduser()
    if text.kind != "pretrained" or not folder.is_dir():
        return config, None
    return dataclasses.replace(config, text_encoder=dataclasses.replace(text, path=TEXT_ENCODER_DIR)), folder


def _trained_modules(denoiser: Denoiser) -> dict[str, torch.nn.Module]:
    modules = {"unet": denoiser.unet}
    if denoiser.text_encoder.trainable:
        modules["text_encoder"] = denoiser.text_encoder
    return modules
