"""Our model configuration <-> the config.json of a diffusers Stable Diffusion folder's components, both ways.

``*_to_diffusers``: our configuration -> the keyword arguments of diffusers' class that builds the same network
(``UNet2DConditionModel``, ``AutoencoderKL`` or ``VQModel``, ``DDIMScheduler``). ``*_from_diffusers``: a
component's config.json -> our configuration, ``ImportRefusedError`` in one sentence for a setting these networks
do not implement (the scheduler's: ``diffusers_scheduler.py``). Plain dicts: neither torch nor diffusers is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm_export.diffusers_limits import (TEXT_ENCODER_LIMITS, TEXT_ENCODER_REQUIRED, UNET_LIMITS, VAE_LIMITS,
                                         check_values)
from ldm_export.errors import ImportRefusedError
from ldm_runtime.config import AutoencoderConfig, DDIMConfig, ScheduleConfig, TextEncoderConfig, UNetConfig
from ldm_runtime.files import describe

UNET_DEFAULTS = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "norm_eps": 1e-5, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "class_embed_type": None,
    "addition_embed_type": None, "num_class_embeds": None, "dual_cross_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_time_embed_dim": None,
    "reverse_transformer_layers_per_block": None, "dropout": 0.0,
}
VAE_DEFAULTS = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "shift_factor": None,
                "latents_mean": None, "latents_std": None}


def _check_defaults(config: dict[str, Any], expected: dict[str, Any], what: str, where: Path) -> None:
    """Refuse a setting that these networks do not implement, naming it and the value they do."""
    for key, allowed in expected.items():
        value = config.get(key, allowed)
        if value != allowed:
            raise ImportRefusedError(f"{where}: {what} {key} is {describe(value)}; ldm-import takes Stable Diffusion "
                                     f"1.x/2.x models, which have {describe(allowed)}")


def _channels(block_out_channels: list[int], what: str, where: Path) -> tuple[int, tuple[int, ...]]:
    """diffusers' block_out_channels -> (base channels, per-level multipliers)."""
    base = int(block_out_channels[0])
    if any(int(channels) % base for channels in block_out_channels):
        raise ImportRefusedError(f"{where}: {what} block_out_channels {block_out_channels} are not multiples of "
                                 f"the first; expected e.g. [320, 640, 1280, 1280]")
    return base, tuple(int(channels) // base for channels in block_out_channels)


# --- the UNet --------------------------------------------------------------------------------------------------

def unet_to_diffusers(unet: UNetConfig, sample_size: int) -> dict[str, Any]:
    """Our UNetConfig -> ``UNet2DConditionModel``'s keyword arguments (``sample_size``: the latents' side)."""
    return {
        "sample_size": sample_size, "in_channels": unet.in_channels, "out_channels": unet.out_channels,
        "block_out_channels": tuple(unet.model_channels * mult for mult in unet.channel_mult),
        "layers_per_block": unet.num_res_blocks,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in unet.attention_levels),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(unet.attention_levels)),
        "cross_attention_dim": unet.context_dim,
        "attention_head_dim": unet.level_heads or unet.num_heads,  # diffusers' name for the number of heads
        "norm_num_groups": unet.num_groups, "transformer_layers_per_block": unet.transformer_depth,
        "use_linear_projection": unet.use_linear_projection, "upcast_attention": unet.upcast_attention,
    }


def unet_from_diffusers(config: dict[str, Any], where: Path) -> UNetConfig:
    """diffusers' UNet2DConditionModel config.json -> our UNetConfig."""
    check_values(config, UNET_LIMITS, "the UNet's", where)
    if config.get("addition_embed_type") == "text_time":
        raise ImportRefusedError(f"{where} is an SDXL UNet (addition_embed_type 'text_time'); ldm-import takes "
                                 f"Stable Diffusion 1.x/2.x")
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ImportRefusedError(f"{where} describes a {config.get('_class_name')}; expected a UNet2DConditionModel")
    _check_defaults(config, UNET_DEFAULTS, "the UNet's", where)
    base, mult = _channels(config.get("block_out_channels", [320, 640, 1280, 1280]), "the UNet's", where)
    levels = len(mult)
    down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    known_down = ("CrossAttnDownBlock2D", "DownBlock2D")
    if len(down) != levels or any(block not in known_down for block in down):
        raise ImportRefusedError(f"{where}: the UNet's down_block_types {down} are not {levels} of {known_down}")
    attention_levels = tuple(block == "CrossAttnDownBlock2D" for block in down)
    mirrored = ["CrossAttnUpBlock2D" if attention else "UpBlock2D" for attention in attention_levels[::-1]]
    if up != mirrored:
        raise ImportRefusedError(f"{where}: the UNet's up_block_types {up} do not mirror its down blocks; "
                                 f"expected {mirrored}")
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)  # diffusers' naming quirk
    depth = config.get("transformer_layers_per_block", 1)
    if isinstance(depth, list):
        if len(set(depth)) != 1:
            raise ImportRefusedError(f"{where}: the UNet's transformer_layers_per_block {depth} differ per level; "
                                     f"ldm-import takes one depth for every level")
        depth = depth[0]
    context_dim = config.get("cross_attention_dim", 1280)
    if isinstance(context_dim, list):
        raise ImportRefusedError(f"{where}: the UNet's cross_attention_dim {context_dim} differs per level; "
                                 f"expected one width")
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise ImportRefusedError(f"{where}: the UNet's layers_per_block is {layers!r}; expected one integer")
    per_level = isinstance(heads, (list, tuple))
    return UNetConfig(
        in_channels=int(config.get("in_channels", 4)),
        out_channels=int(config.get("out_channels", 4)),
        model_channels=base,
        channel_mult=mult,
        num_res_blocks=layers,
        attention_levels=attention_levels,
        num_heads=int(heads[-1] if per_level else heads),
        level_heads=tuple(int(h) for h in heads) if per_level else (),
        transformer_depth=int(depth),
        context_dim=int(context_dim),
        num_groups=int(config.get("norm_num_groups", 32)),
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        upcast_attention=bool(config.get("upcast_attention", False)),
    )


# --- the autoencoder -------------------------------------------------------------------------------------------

def autoencoder_to_diffusers(autoencoder: AutoencoderConfig) -> dict[str, Any]:
    """Our AutoencoderConfig -> the keyword arguments of ``AutoencoderKL`` (kind "kl") or ``VQModel`` (kind "vq");
    the caller adds what only diffusers records (``sample_size``, ``scaling_factor``)."""
    levels = len(autoencoder.channel_mult)
    arguments = {
        "in_channels": autoencoder.in_channels, "out_channels": autoencoder.in_channels,
        "down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(autoencoder.base_channels * mult for mult in autoencoder.channel_mult),
        "layers_per_block": autoencoder.num_res_blocks, "latent_channels": autoencoder.latent_channels,
        "norm_num_groups": autoencoder.num_groups, "mid_block_add_attention": autoencoder.mid_attention,
    }
    if autoencoder.kind == "vq":
        arguments.update(num_vq_embeddings=autoencoder.codebook_size, vq_embed_dim=autoencoder.latent_channels)
    return arguments


def autoencoder_from_diffusers(config: dict[str, Any], where: Path) -> tuple[AutoencoderConfig, float]:
    """diffusers' AutoencoderKL config.json -> (our AutoencoderConfig, the latent scaling factor)."""
    check_values(config, VAE_LIMITS, "the VAE's", where)
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ImportRefusedError(f"{where} describes a {config.get('_class_name')}; expected an AutoencoderKL")
    _check_defaults(config, VAE_DEFAULTS, "the VAE's", where)
    base, mult = _channels(config.get("block_out_channels", [64]), "the VAE's", where)
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        blocks = config.get(key, [block] * len(mult))
        if list(blocks) != [block] * len(mult):
            raise ImportRefusedError(f"{where}: the VAE's {key} {blocks} are not {len(mult)} {block}")
    if config.get("in_channels", 3) != 3 or config.get("out_channels", 3) != 3:
        raise ImportRefusedError(f"{where}: the VAE has {config.get('in_channels')} input and "
                                 f"{config.get('out_channels')} output channels; expected 3 and 3 (RGB)")
    autoencoder = AutoencoderConfig(
        kind="kl", in_channels=3, base_channels=base, channel_mult=mult,
        num_res_blocks=int(config.get("layers_per_block", 1)), latent_channels=int(config.get("latent_channels", 4)),
        num_groups=int(config.get("norm_num_groups", 32)),
        mid_attention=bool(config.get("mid_block_add_attention", True)),
    )
    return autoencoder, float(config.get("scaling_factor", 0.18215))


# --- the scheduler ---------------------------------------------------------------------------------------------

def schedule_to_diffusers(schedule: ScheduleConfig, sampler: DDIMConfig) -> dict[str, Any]:
    """Our noise schedule and DDIM settings -> ``DDIMScheduler``'s keyword arguments. ``previous_timestep`` has none:
    DDIMScheduler always steps to t - T // N (our "diffusers"), and a StableDiffusionPipeline built with it reads
    steps_offset as 1 and clip_sample as false (assign ``pipe.scheduler`` after building it to keep them)."""
    return {"num_train_timesteps": schedule.num_train_timesteps, "beta_start": schedule.beta_start,
            "beta_end": schedule.beta_end, "beta_schedule": schedule.beta_schedule,
            "prediction_type": schedule.prediction_type, "timestep_spacing": sampler.timestep_spacing,
            "steps_offset": sampler.steps_offset, "set_alpha_to_one": sampler.set_alpha_to_one,
            "clip_sample": sampler.clip_sample, "clip_sample_range": sampler.clip_sample_range}


# --- the text encoder ------------------------------------------------------------------------------------------

def text_encoder_from_transformers(config: dict[str, Any], where: Path, clip_skip: int) -> TextEncoderConfig:
    """transformers' CLIPTextModel config.json -> our TextEncoderConfig (kind "clip", no padding mask); the other
    way is ``ldm_runtime.models.text_encoder.clip_text_config``, which builds the network."""
    check_values(config, TEXT_ENCODER_LIMITS, "the text encoder's", where, required=TEXT_ENCODER_REQUIRED)
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if config.get("model_type", "clip_text_model") != "clip_text_model" or architectures != ["CLIPTextModel"]:
        raise ImportRefusedError(f"{where} describes a {architectures[0]} ({config.get('model_type')}); "
                                 f"expected Stable Diffusion's CLIPTextModel")
    return TextEncoderConfig(
        kind="clip", path="", max_length=int(config.get("max_position_embeddings", 77)),
        hidden_size=int(config["hidden_size"]), num_layers=int(config["num_hidden_layers"]),
        num_heads=int(config["num_attention_heads"]), intermediate_size=int(config["intermediate_size"]),
        vocab_size=int(config["vocab_size"]), hidden_act=str(config.get("hidden_act", "quick_gelu")),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)), clip_skip=clip_skip, mask_padding=False,
    )
