"""The diffusers peers of ``ldm-bench``, built on a checkpoint's own weight tensors (no second copy, no download).

``diffusers_unet_model``: diffusers' ``UNet2DConditionModel`` with our UNet's configuration (per-level heads and
fp32 attention included) and its very tensors: the parameter names are the same. ``stable_diffusion_pipeline``:
diffusers' whole ``StableDiffusionPipeline`` (tokenizer, CLIP text encoder, UNet, DDIM scheduler with the model's
settings, VAE) over a Stable Diffusion checkpoint dir that ldm-import wrote, so "images per second against
diffusers" is timed on the same work as ours: the same weights, scheduler, steps, guidance and image size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm_runtime.checkpoint import TOKENIZER_DIR
from ldm_runtime.config import ModelConfig

PIPELINE_PEER = "diffusers-pipeline"


def pipeline_refusal(config: ModelConfig) -> str | None:
    """Why diffusers' StableDiffusionPipeline cannot run this model (one sentence), or None when it can."""
    if config.text_encoder.kind != "clip":
        return (f"{PIPELINE_PEER} runs Stable Diffusion checkpoints (ldm-import), whose text encoder is CLIP; this "
                f"model's is {config.text_encoder.kind!r}")
    if config.autoencoder.kind != "kl":
        return f"{PIPELINE_PEER} needs a KL autoencoder; this model's is {config.autoencoder.kind!r}"
    return None


def diffusers_unet_model(unet, sample_size: int = 8):
    """diffusers' UNet2DConditionModel sharing ``unet``'s (our UNet's) weight tensors, in eval mode."""
    import torch
    from diffusers import UNet2DConditionModel

    config = unet.cfg
    levels = len(config.channel_mult)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(
            sample_size=sample_size, in_channels=config.in_channels, out_channels=config.out_channels,
            block_out_channels=tuple(config.model_channels * mult for mult in config.channel_mult),
            layers_per_block=config.num_res_blocks,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D"
                                 for a in reversed(config.attention_levels)),
            cross_attention_dim=config.context_dim,
            attention_head_dim=tuple(config.heads(level) for level in range(levels)),
            norm_num_groups=config.num_groups, transformer_layers_per_block=config.transformer_depth,
            use_linear_projection=config.use_linear_projection, upcast_attention=config.upcast_attention,
        )
    theirs.load_state_dict(unet.state_dict(), strict=True, assign=True)  # shares the tensors: no second copy
    return theirs.eval().requires_grad_(False)


def stable_diffusion_pipeline(folder: Path, config: ModelConfig, unet, autoencoder, text_encoder):
    """diffusers' StableDiffusionPipeline over checkpoint dir ``folder``'s networks (ours, already loaded: their
    tensors are shared) with a DDIMScheduler of the model's schedule and sampler settings."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import AutoTokenizer

    refusal = pipeline_refusal(config)
    assert refusal is None, refusal
    vae_config = config.autoencoder
    levels = len(vae_config.channel_mult)
    with torch.device("meta"):
        vae = AutoencoderKL(
            in_channels=vae_config.in_channels, out_channels=vae_config.in_channels,
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(vae_config.base_channels * mult for mult in vae_config.channel_mult),
            layers_per_block=vae_config.num_res_blocks, latent_channels=vae_config.latent_channels,
            norm_num_groups=vae_config.num_groups, sample_size=config.image_size,
            scaling_factor=config.latent_scale_factor, mid_block_add_attention=vae_config.mid_attention,
        )
    vae.load_state_dict(autoencoder.state_dict(), strict=True, assign=True)
    schedule, sampler = config.schedule, config.sampler
    scheduler = DDIMScheduler(
        num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start, beta_end=schedule.beta_end,
        beta_schedule=schedule.beta_schedule, prediction_type=schedule.prediction_type,
        timestep_spacing=sampler.timestep_spacing, steps_offset=sampler.steps_offset,
        set_alpha_to_one=sampler.set_alpha_to_one, clip_sample=sampler.clip_sample,
        clip_sample_range=sampler.clip_sample_range)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR), local_files_only=True)
    pipe = StableDiffusionPipeline(
        vae=vae.eval().requires_grad_(False), text_encoder=text_encoder.model, tokenizer=tokenizer,
        unet=diffusers_unet_model(unet, config.latent_size), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call_options(config: ModelConfig, steps: int, guidance_scale: float, image_size: int) -> dict[str, Any]:
    """The keyword arguments of ``StableDiffusionPipeline.__call__`` that make it do what our pipeline does."""
    clip_skip = config.text_encoder.clip_skip
    return {"num_inference_steps": steps, "guidance_scale": guidance_scale, "height": image_size,
            "width": image_size, "eta": config.sampler.eta, "clip_skip": clip_skip or None, "output_type": "np"}
