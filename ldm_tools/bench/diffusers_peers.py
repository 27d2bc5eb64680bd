"""The diffusers peers of ``ldm-bench``, built on a checkpoint's own weight tensors (no second copy, no download).

``diffusers_unet_model``: diffusers' ``UNet2DConditionModel`` with our UNet's configuration (per-level heads and
fp32 attention included) and its very tensors: the parameter names are the same. ``stable_diffusion_pipeline``:
diffusers' whole ``StableDiffusionPipeline`` (tokenizer, CLIP text encoder, UNet, scheduler, VAE) over a Stable
Diffusion checkpoint dir that ldm-import wrote, so "images per second against diffusers" is timed on the same work as
ours: the same weights, sampler, steps, guidance and image size. The scheduler is the diffusers class our sampler of
that name matches (``PIPELINE_SCHEDULERS``); for ddim a DDIMScheduler with the model's settings, which keeps
model.json's steps_offset and clip_sample (StableDiffusionPipeline rewrites them when built with one) and steps to
t - T // N whatever ``previous_timestep`` says, the same UNet work either way.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ldm_export.diffusers_config import autoencoder_to_diffusers, schedule_to_diffusers, unet_to_diffusers
from ldm_runtime.checkpoint import TOKENIZER_DIR
from ldm_runtime.config import ModelConfig

PIPELINE_PEER = "diffusers-pipeline"
# Our samplers other than ddim, as the diffusers scheduler (class name, keyword arguments beside the noise schedule's)
# whose numbers they match: ldm_runtime.schedulers' docstrings and the parity tests say which.
PIPELINE_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "dpmpp-2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp-2m-sde-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                            "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
    "unipc-3": ("UniPCMultistepScheduler", {"solver_order": 3}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}


def pipeline_refusal(config: ModelConfig) -> str | None:
    """Why diffusers' StableDiffusionPipeline cannot run this model (one sentence), or None when it can."""
    if config.text_encoder.kind != "clip":
        return (f"{PIPELINE_PEER} runs Stable Diffusion checkpoints (ldm-import), whose text encoder is CLIP; this "
                f"model's is {config.text_encoder.kind!r}")
    if config.autoencoder.kind != "kl":
        return f"{PIPELINE_PEER} needs a KL autoencoder; this model's is {config.autoencoder.kind!r}"
    if config.inpainting:
        return (f"{PIPELINE_PEER} runs text to image (StableDiffusionPipeline); this model is an inpainting one "
                f"(unet.in_channels {config.unet.in_channels})")
    return None


def pipeline_sampler_refusal(sampler: str) -> str | None:
    """Why diffusers' StableDiffusionPipeline cannot sample with our ``sampler`` (one sentence), or None when it can."""
    if sampler == "ddim" or sampler in PIPELINE_SCHEDULERS:
        return None
    return (f"{PIPELINE_PEER} has no diffusers scheduler known to match --sampler {sampler}; expected one of ddim, "
            f"{', '.join(PIPELINE_SCHEDULERS)}")


def pipeline_scheduler(config: ModelConfig, sampler: str):
    """The diffusers scheduler that samples as our ``sampler`` does on ``config``'s noise schedule: for ddim a
    DDIMScheduler with the model's DDIM settings, for the others ``PIPELINE_SCHEDULERS``' class and settings."""
    import diffusers

    refusal = pipeline_sampler_refusal(sampler)
    assert refusal is None, refusal
    ddim_settings = schedule_to_diffusers(config.schedule, config.sampler)
    if sampler == "ddim":
        return diffusers.DDIMScheduler(**ddim_settings)
    class_name, settings = PIPELINE_SCHEDULERS[sampler]
    schedule = {key: ddim_settings[key] for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                                    "prediction_type")}
    return getattr(diffusers, class_name)(**schedule, **settings)


def diffusers_unet_model(unet, sample_size: int = 8):
    """diffusers' UNet2DConditionModel sharing ``unet``'s (our UNet's) weight tensors, in eval mode."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        theirs = UNet2DConditionModel(**unet_to_diffusers(unet.cfg, sample_size))
    theirs.load_state_dict(unet.state_dict(), strict=True, assign=True)  # shares the tensors: no second copy
    return theirs.eval().requires_grad_(False)


def stable_diffusion_pipeline(folder: Path, config: ModelConfig, unet, autoencoder, text_encoder,
                              sampler: str = "ddim"):
    """diffusers' StableDiffusionPipeline over checkpoint dir ``folder``'s networks (ours, already loaded: their
    tensors are shared) with the scheduler of our ``sampler`` (``pipeline_scheduler``)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import AutoTokenizer

    refusal = pipeline_refusal(config)
    assert refusal is None, refusal
    with torch.device("meta"):
        vae = AutoencoderKL(**autoencoder_to_diffusers(config.autoencoder), sample_size=config.image_size,
                            scaling_factor=config.latent_scale_factor)
    vae.load_state_dict(autoencoder.state_dict(), strict=True, assign=True)
    scheduler_settings = schedule_to_diffusers(config.schedule, config.sampler)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR), local_files_only=True)
    pipe = StableDiffusionPipeline(
        vae=vae.eval().requires_grad_(False), text_encoder=_with_nested_text_model(text_encoder.model),
        tokenizer=tokenizer, unet=diffusers_unet_model(unet, config.latent_size),
        scheduler=DDIMScheduler(**scheduler_settings), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    # a fresh one: the constructor rewrote its scheduler's steps_offset and clip_sample in place
    pipe.scheduler = pipeline_scheduler(config, sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _with_nested_text_model(model):
    """``model`` (a CLIPTextModel) as diffusers' clip_skip reads it, at ``text_encoder.text_model.final_layer_norm``:
    transformers >= 5 keeps that layer on the model itself, so ``model`` gets a ``text_model`` that holds that very
    layer (our TextEncoder reads the same layer through it). Not a copy of the model: transformers 5 records hidden
    states with hooks on the shared layers, and two models over them would record each call twice."""
    if not hasattr(model, "text_model"):
        model.text_model = SimpleNamespace(final_layer_norm=model.final_layer_norm)
    return model


def pipeline_call_options(config: ModelConfig, steps: int, guidance_scale: float, image_size: int) -> dict[str, Any]:
    """The keyword arguments of ``StableDiffusionPipeline.__call__`` that make it do what our pipeline does."""
    clip_skip = config.text_encoder.clip_skip
    return {"num_inference_steps": steps, "guidance_scale": guidance_scale, "height": image_size,
            "width": image_size, "eta": config.sampler.eta, "clip_skip": clip_skip or None, "output_type": "np"}
