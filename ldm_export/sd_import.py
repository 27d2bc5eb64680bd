"""``ldm-import``: a Stable Diffusion 1.x / 2.x checkpoint -> an ordinary checkpoint dir (model.json, safetensors,
tokenizer/) that ldm-sample, ldm-export and ldm-serve take.

    ldm-import path/to/stable-diffusion-v1-5 --out runs/sd15      # a diffusers folder (safetensors weights)
    ldm-import v2-1_768-ema-pruned.safetensors --tokenizer sd21/tokenizer --prediction-type v_prediction --out runs/sd21

A diffusers folder holds ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
``scheduler/``. Our networks use diffusers' parameter names, so the UNet and VAE weights keep their keys; the
CLIP text encoder's go under ``model.``. Every setting that makes the model Stable Diffusion (CLIP text encoder,
cross-attention over all 77 tokens, epsilon or v prediction, linear projections, per-level heads, fp32
attention, the VAE scaling factor, the scheduler's settings) is written into model.json.

Pickled weights (``.ckpt``, ``.bin``, ``.pt``) are refused, never loaded: unpickling runs code. So are the kinds
this runtime does not run (SDXL, SD3, Flux, inpainting UNets, LoRA files), each named in one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from ldm_export.errors import ExportError
from ldm_runtime.command_line import OneLineArgumentParser, report_user_error
from ldm_runtime.errors import UserError

PROG = "ldm-import"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
CONVERT_HINT = ("convert it to .safetensors first, in a throwaway environment you trust with the file (e.g. "
                "diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py --to_safetensors), "
                "or download the .safetensors release")
# model_index.json pipeline classes that are Stable Diffusion 1.x/2.x text-to-image (same five components)
SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
UNSUPPORTED_PIPELINES = {
    "StableDiffusionXL": "SDXL",
    "StableDiffusion3": "Stable Diffusion 3",
    "Flux": "Flux",
    "StableDiffusionInpaint": "an inpainting model",
    "StableDiffusionUpscale": "an upscaler",
    "StableDiffusionDepth2Img": "a depth-to-image model",
    "StableCascade": "Stable Cascade",
    "Kandinsky": "Kandinsky",
    "PixArt": "PixArt",
}


class ImportRefusedError(ExportError):
    """A source ``ldm-import`` does not take (pickled, another kind of model, a tensor that does not fit)."""


# --- reading the source ---------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ImportRefusedError(f"{path} does not exist; expected a diffusers Stable Diffusion folder")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ImportRefusedError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ImportRefusedError(f"{path} holds a {type(data).__name__}; expected a JSON object")
    return data


def refuse_pickle(path: Path) -> None:
    """``ImportRefusedError`` for a pickled weight file (never opened)."""
    raise ImportRefusedError(f"{path} is a pickled checkpoint ({path.suffix}); ldm-import never unpickles "
                             f"(loading a pickle can run any code): {CONVERT_HINT}")


def _weights_file(component: Path) -> Path:
    """The safetensors weights of a diffusers component folder (the fp32 file, else a variant such as fp16)."""
    if not component.is_dir():
        raise ImportRefusedError(f"{component} does not exist; expected a diffusers component folder")
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (component / name).is_file():
            return component / name
    variants = sorted(component.glob("*.safetensors"))
    if len(variants) == 1:
        return variants[0]
    if len(variants) > 1:
        raise ImportRefusedError(f"{component} holds several weight files {[p.name for p in variants]} and none "
                                 f"named diffusion_pytorch_model.safetensors or model.safetensors; keep one")
    if list(component.glob("*.safetensors.index.json")):
        raise ImportRefusedError(f"{component} holds sharded weights; ldm-import takes one .safetensors file "
                                 f"per component")
    pickled = sorted(p for p in component.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        refuse_pickle(pickled[0])
    raise ImportRefusedError(f"{component} has no .safetensors weights")


def _load_safetensors(path: Path) -> dict[str, Any]:
    """Every tensor of ``path`` as float32 (a half-precision release is widened: models run at full precision)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ImportRefusedError(f"cannot read {path} ({error}); expected a complete safetensors file") from None
    return {name: t.to(torch.float32) if t.is_floating_point() else t for name, t in tensors.items()}


def _refuse_lora(tensors: dict[str, Any], where: Path) -> None:
    if any("lora" in name.lower() for name in tensors):
        raise ImportRefusedError(f"{where} holds LoRA weights (an adapter for a base model, not a model); "
                                 f"merge it into its base model and import that")


# --- configurations ----------------------------------------------------------------------------------------

def _check_defaults(config: dict[str, Any], expected: dict[str, Any], what: str, where: Path) -> None:
    """Refuse a setting that these networks do not implement, naming it and the value they do."""
    for key, allowed in expected.items():
        value = config.get(key, allowed)
        if value != allowed:
            raise ImportRefusedError(f"{where}: {what} {key} is {value!r}; ldm-import takes Stable Diffusion 1.x/2.x "
                                     f"models, which have {allowed!r}")


def _channels(block_out_channels: list[int], what: str, where: Path) -> tuple[int, tuple[int, ...]]:
    """diffusers' block_out_channels -> (base channels, per-level multipliers)."""
    base = int(block_out_channels[0])
    if any(int(channels) % base for channels in block_out_channels):
        raise ImportRefusedError(f"{where}: {what} block_out_channels {block_out_channels} are not multiples of "
                                 f"the first; expected e.g. [320, 640, 1280, 1280]")
    return base, tuple(int(channels) // base for channels in block_out_channels)


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


def unet_config(config: dict[str, Any], where: Path):
    """diffusers' UNet2DConditionModel config.json -> our UNetConfig."""
    from ldm_runtime.config import UNetConfig

    if config.get("addition_embed_type") == "text_time":
        raise ImportRefusedError(f"{where} is an SDXL UNet (addition_embed_type 'text_time'); ldm-import takes "
                                 f"Stable Diffusion 1.x/2.x")
    if config.get("in_channels") == 9:
        raise ImportRefusedError(f"{where} is a 9-channel inpainting UNet; ldm-import takes text-to-image Stable "
                                 f"Diffusion 1.x/2.x UNets (4 input channels)")
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
    return UNetConfig(
        in_channels=int(config.get("in_channels", 4)),
        out_channels=int(config.get("out_channels", 4)),
        model_channels=base,
        channel_mult=mult,
        num_res_blocks=layers,
        attention_levels=attention_levels,
        num_heads=int(heads[-1] if isinstance(heads, list) else heads),
        level_heads=tuple(int(h) for h in heads) if isinstance(heads, list) else (),
        transformer_depth=int(depth),
        context_dim=int(context_dim),
        num_groups=int(config.get("norm_num_groups", 32)),
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        upcast_attention=bool(config.get("upcast_attention", False)),
    )


VAE_DEFAULTS = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "shift_factor": None,
                "latents_mean": None, "latents_std": None}


def autoencoder_config(config: dict[str, Any], where: Path):
    """diffusers' AutoencoderKL config.json -> (our AutoencoderConfig, the latent scaling factor, sample_size)."""
    from ldm_runtime.config import AutoencoderConfig

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


def text_encoder_config(config: dict[str, Any], where: Path, clip_skip: int):
    """transformers' CLIPTextModel config.json -> our TextEncoderConfig (kind "clip", no padding mask)."""
    from ldm_runtime.config import TextEncoderConfig

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


# diffusers' DDIMScheduler defaults: a key a scheduler_config.json leaves out means what DDIMScheduler makes of it
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                      "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0,
                      "set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 1.0}
SCHEDULER_REFUSED = {"trained_betas": None, "thresholding": False, "rescale_betas_zero_snr": False}


def schedule_configs(config: dict[str, Any], where: Path):
    """scheduler_config.json -> (our ScheduleConfig, our DDIMConfig): the settings diffusers' DDIMScheduler
    takes from it (``DDIMScheduler.from_config``)."""
    from ldm_runtime.config import ConfigError, DDIMConfig, ScheduleConfig

    _check_defaults(config, SCHEDULER_REFUSED, "the scheduler's", where)
    settings = {key: config.get(key, default) for key, default in SCHEDULER_DEFAULTS.items()}
    if settings["beta_schedule"] not in ("scaled_linear", "linear"):
        raise ImportRefusedError(f"{where}: beta_schedule {settings['beta_schedule']!r} is not one of "
                                 f"'scaled_linear', 'linear'")
    try:
        schedule = ScheduleConfig(num_train_timesteps=int(settings["num_train_timesteps"]),
                                  beta_start=float(settings["beta_start"]), beta_end=float(settings["beta_end"]),
                                  beta_schedule=settings["beta_schedule"], prediction_type=settings["prediction_type"])
        schedule.validate()
        sampler = DDIMConfig(timestep_spacing=settings["timestep_spacing"], steps_offset=int(settings["steps_offset"]),
                             set_alpha_to_one=bool(settings["set_alpha_to_one"]),
                             clip_sample=bool(settings["clip_sample"]),
                             clip_sample_range=float(settings["clip_sample_range"]))
    except (ConfigError, ValueError) as error:
        raise ImportRefusedError(f"{where}: {error}") from None
    return schedule, sampler


# --- weights ---------------------------------------------------------------------------------------------------

# Older diffusers folders name the VAE's attention projections as the original code did.
LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy_vae(tensors: dict[str, Any]) -> dict[str, Any]:
    renamed = {}
    for name, tensor in tensors.items():
        stem, _, leaf = name.rpartition(".")
        module_path, _, projection = stem.rpartition(".")
        if ".attentions." in name and projection in LEGACY_VAE_ATTENTION:
            name = f"{module_path}.{LEGACY_VAE_ATTENTION[projection]}.{leaf}"
        renamed[name] = tensor
    return renamed


def fit_state_dict(module, tensors: dict[str, Any], what: str, where: Path) -> dict[str, Any]:
    """``tensors`` checked against ``module``'s state dict: every key present with its shape (a 1x1 conv kernel
    fits a linear weight); ``ImportRefusedError`` naming the first key that is missing, extra or misshapen."""
    expected = module.state_dict()
    fitted = {}
    for name, tensor in tensors.items():
        if name not in expected:
            if name.endswith("position_ids"):  # a buffer older transformers saved; ours is rebuilt
                continue
            raise ImportRefusedError(f"{where}: the {what} weight {name!r} has no place in the model described by "
                                     f"its config.json")
        target = expected[name].shape
        if tensor.shape != target and tensor.dim() == 4 and tensor.shape[2:] == (1, 1) and len(target) == 2:
            tensor = tensor[:, :, 0, 0]
        if tensor.shape != target:
            raise ImportRefusedError(f"{where}: the {what} weight {name!r} has shape {tuple(tensor.shape)} but the "
                                     f"model described by its config.json needs {tuple(target)}")
        fitted[name] = tensor.contiguous()
    missing = sorted(set(expected) - set(fitted))
    if missing:
        raise ImportRefusedError(f"{where}: the {what} weights lack {missing[0]!r} ({len(missing)} missing in all)")
    return fitted


# --- the import ------------------------------------------------------------------------------------------------

def import_diffusers_folder(source: Path, out: Path, clip_skip: int = 0,
                            log: Callable[[str], None] = lambda line: None) -> Path:
    """Write checkpoint dir ``out`` from the diffusers Stable Diffusion folder ``source``; returns ``out``.

    ``out`` appears complete or not at all (written in a sibling temporary folder, then renamed).
    """
    index = _read_json(source / "model_index.json")
    pipeline = str(index.get("_class_name", ""))
    for prefix, kind in UNSUPPORTED_PIPELINES.items():
        if pipeline.startswith(prefix):
            raise ImportRefusedError(f"{source} is {kind} ({pipeline}); ldm-import takes Stable Diffusion 1.x/2.x "
                                     f"text-to-image models")
    if pipeline not in SD_PIPELINES:
        raise ImportRefusedError(f"{source} holds a {pipeline or 'pipeline of no named class'}; ldm-import takes "
                                 f"{' or '.join(SD_PIPELINES)} folders")

    from ldm_runtime.config import ConfigError, ModelConfig

    unet_cfg = unet_config(_read_json(source / "unet" / "config.json"), source / "unet")
    autoencoder_cfg, scale = autoencoder_config(_read_json(source / "vae" / "config.json"), source / "vae")
    text_cfg = text_encoder_config(_read_json(source / "text_encoder" / "config.json"), source / "text_encoder",
                                   clip_skip)
    scheduler_json = source / "scheduler" / "scheduler_config.json"
    schedule, sampler = schedule_configs(_read_json(scheduler_json), scheduler_json)
    sample_size = _read_json(source / "unet" / "config.json").get("sample_size", 64)
    if isinstance(sample_size, list):
        sample_size = sample_size[0]
    config = ModelConfig(image_size=int(sample_size) * autoencoder_cfg.factor, autoencoder=autoencoder_cfg,
                         unet=unet_cfg, text_encoder=text_cfg, schedule=schedule, latent_scale_factor=scale,
                         sampler=sampler)
    try:
        config.validate()
    except ConfigError as error:
        raise ImportRefusedError(f"{source} does not describe a model these networks run: {error}") from None
    if text_cfg.hidden_size != unet_cfg.context_dim:
        raise ImportRefusedError(f"{source}: the text encoder is {text_cfg.hidden_size} wide but the UNet's "
                                 f"cross_attention_dim is {unet_cfg.context_dim}; expected them equal")

    import torch

    from ldm_runtime.models import Autoencoder, UNet

    with torch.device("meta"):  # shapes only: the weights come from the source
        unet, autoencoder = UNet(unet_cfg), Autoencoder(autoencoder_cfg)
    weights = {}
    unet_file = _weights_file(source / "unet")
    unet_tensors = _load_safetensors(unet_file)
    _refuse_lora(unet_tensors, unet_file)
    weights["unet"] = fit_state_dict(unet, unet_tensors, "UNet", unet_file)
    vae_file = _weights_file(source / "vae")
    weights["autoencoder"] = fit_state_dict(autoencoder, _rename_legacy_vae(_load_safetensors(vae_file)), "VAE",
                                            vae_file)
    text_file = _weights_file(source / "text_encoder")
    text_shapes = _clip_shapes(text_cfg)
    weights["text_encoder"] = fit_state_dict(text_shapes, clip_state_dict(_load_safetensors(text_file), text_shapes),
                                             "text encoder", text_file)
    log(f"read {unet_file.parent.name}, {vae_file.parent.name} and {text_file.parent.name} weights from {source}")
    return write_checkpoint(out, config, weights, source / "tokenizer", log,
                            settings={"source": source.name, "clip_skip": clip_skip})


def clip_state_dict(tensors: dict[str, Any], module) -> dict[str, Any]:
    """CLIPTextModel weights saved by any transformers version -> the keys of ``module`` (a ``_clip_shapes``):
    ``model.`` + the names this transformers gives them (transformers 5 dropped the ``text_model.`` level)."""
    from ldm_export.sd_single_file import canonical_clip

    nested = any(name.startswith("model.text_model.") for name in module.state_dict())
    prefix = "model.text_model." if nested else "model."
    return {prefix + name: tensor for name, tensor in canonical_clip(tensors).items()}


def _clip_shapes(text_cfg):
    """An empty CLIPTextModel of ``text_cfg``'s sizes, under the key prefix our TextEncoder gives it."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=text_cfg.vocab_size, hidden_size=text_cfg.hidden_size,
                            intermediate_size=text_cfg.intermediate_size, num_hidden_layers=text_cfg.num_layers,
                            num_attention_heads=text_cfg.num_heads, max_position_embeddings=text_cfg.max_length,
                            hidden_act=text_cfg.hidden_act, layer_norm_eps=text_cfg.layer_norm_eps)
    with torch.device("meta"):
        holder = torch.nn.Module()
        holder.model = CLIPTextModel(config)
    return holder


def write_checkpoint(out: Path, config, weights: dict[str, dict[str, Any]], tokenizer_source: Path,
                     log: Callable[[str], None], settings: dict[str, Any]) -> Path:
    """model.json, ``<stem>.safetensors`` for each of ``weights``, tokenizer/ (in the fast tokenizer's
    tokenizer.json form that the engines read) and, last, train_state.json with the sha256 of every one of them
    (stage "import", ``settings``: how the import ran), as ldm-train writes it: every loader checks each file
    against it. Staged beside ``out`` and renamed into place, so ``out`` appears complete or not at all."""
    from ldm_runtime.checkpoint import MODEL_JSON, TOKENIZER_DIR, folder_files, load_model_config, write_train_state
    from ldm_runtime.staging import temporary_folder

    if out.exists():
        raise ImportRefusedError(f"--out {out} already exists; expected a new folder")
    if not tokenizer_source.is_dir():
        raise ImportRefusedError(f"{tokenizer_source} does not exist; expected the model's CLIP tokenizer folder")
    with temporary_folder(out) as staging:
        from safetensors.torch import save_file
        from transformers import AutoTokenizer

        (staging / MODEL_JSON).write_text(config.to_json())
        for stem, state in weights.items():
            save_file(state, str(staging / f"{stem}.safetensors"))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source), local_files_only=True, use_fast=True)
        except (OSError, ValueError) as error:
            raise ImportRefusedError(f"cannot read the tokenizer in {tokenizer_source} ({error})") from None
        if not type(tokenizer).__name__.startswith("CLIPTokenizer") or not tokenizer.is_fast:
            raise ImportRefusedError(f"{tokenizer_source} holds a {type(tokenizer).__name__}; expected a CLIP "
                                     f"tokenizer")
        tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        names = [MODEL_JSON, *(f"{stem}.safetensors" for stem in weights), *folder_files(staging, TOKENIZER_DIR)]
        write_train_state(staging, names, stage="import", step=0, settings=settings)
        load_model_config(staging)  # what every command reads back first
        os.replace(staging, out)
    log(f"wrote {out}")
    return out


# Keys that only one kind of single-file checkpoint has, in the order they are looked for.
SINGLE_FILE_KINDS = (
    ("lora", "LoRA weights (an adapter for a base model, not a model); merge it into its base model and import that"),
    ("conditioner.embedders.1", "SDXL"),
    ("joint_blocks.", "Stable Diffusion 3"),
    ("double_blocks.", "Flux"),
)


def refuse_unsupported_single_file(path: Path) -> None:
    """``ImportRefusedError`` naming the kind of a single .safetensors file that is not SD 1.x/2.x (read: key
    names and one shape, never the tensors); returns for anything else."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            names = list(handle.keys())
            conv_in = "model.diffusion_model.input_blocks.0.0.weight"
            in_channels = handle.get_slice(conv_in).get_shape()[1] if conv_in in names else None
    except (SafetensorError, OSError, ValueError) as error:
        raise ImportRefusedError(f"cannot read {path} ({error}); expected a complete safetensors file") from None
    for marker, kind in SINGLE_FILE_KINDS:
        if any(marker in name.lower() for name in names):
            raise ImportRefusedError(f"{path} holds {kind}" if kind.startswith("LoRA") else
                                     f"{path} is {kind}; ldm-import takes Stable Diffusion 1.x/2.x models")
    if in_channels == 9:
        raise ImportRefusedError(f"{path} holds a 9-channel inpainting UNet; ldm-import takes text-to-image "
                                 f"Stable Diffusion 1.x/2.x UNets (4 input channels)")


def import_source(source: str | Path, out: str | Path, clip_skip: int = 0,
                  log: Callable[[str], None] = lambda line: None, tokenizer: str | Path | None = None,
                  prediction_type: str | None = None, image_size: int | None = None) -> Path:
    """Import ``source`` (a diffusers folder, or an original-layout .safetensors file with ``tokenizer``, a CLIP
    tokenizer folder, and for SD 2.x ``prediction_type``) into checkpoint dir ``out``; ``ImportRefusedError`` in
    one sentence for anything it does not take."""
    source, out = Path(source), Path(out)
    if out.exists():
        raise ImportRefusedError(f"--out {out} already exists; expected a new folder")
    if source.is_file():
        if source.suffix.lower() in PICKLE_SUFFIXES:
            refuse_pickle(source)
        if source.suffix.lower() == ".safetensors":
            refuse_unsupported_single_file(source)
            from ldm_export.sd_single_file import import_single_file

            return import_single_file(source, out, None if tokenizer is None else Path(tokenizer), prediction_type,
                                      image_size, clip_skip, log)
        raise ImportRefusedError(f"{source} is neither a .safetensors file nor a folder; ldm-import takes a diffusers "
                                 f"folder or an original-layout Stable Diffusion .safetensors file")
    if not source.is_dir():
        raise ImportRefusedError(f"{source} does not exist; expected a diffusers Stable Diffusion folder")
    if not (source / "model_index.json").is_file():
        if any(path.name.startswith("pytorch_lora_weights") for path in source.iterdir()):
            raise ImportRefusedError(f"{source} holds LoRA weights (an adapter for a base model, not a model); "
                                     f"merge it into its base model and import that")
        raise ImportRefusedError(f"{source} has no model_index.json; expected a diffusers Stable Diffusion folder")
    return import_diffusers_folder(source, out, clip_skip, log)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help="a diffusers Stable Diffusion 1.x/2.x folder, or one "
                                                         "original-layout .safetensors file")
    parser.add_argument("--out", required=True, metavar="CHECKPOINT_DIR", help="checkpoint dir to write (must not "
                                                                                 "exist)")
    parser.add_argument("--clip-skip", type=int, default=0, metavar="N",
                        help="condition on the CLIP layer N before the last (through the final layer norm), as "
                             "diffusers' clip_skip; A1111's 'clip skip 2' is 1 (default: 0, the last layer)")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="single files only: the model's CLIP tokenizer folder (vocab.json and merges.txt, e.g. the "
                             "tokenizer/ of its diffusers release); the file holds none")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                        help="single files only: what the UNet predicts; SD 2.x files do not say (768-v models: "
                             "v_prediction, 512-base: epsilon); SD 1.x: epsilon")
    parser.add_argument("--image-size", type=int, default=None, metavar="PIXELS",
                        help="single files only: the model's native size (default: 768 for v_prediction, else 512)")
    return parser


def _log(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        import_source(args.source, args.out, args.clip_skip, _log, tokenizer=args.tokenizer,
                      prediction_type=args.prediction_type, image_size=args.image_size)
    except UserError as error:
        return report_user_error(PROG, error)
    except KeyboardInterrupt:
        _log(f"interrupted; nothing was written to {args.out}")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
