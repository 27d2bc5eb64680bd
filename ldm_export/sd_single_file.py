"""The original Stable Diffusion layout (one ``.safetensors`` file, CompVis / Stability key names) <-> our networks.

SD 1.x files hold ``model.diffusion_model.*`` (the UNet), ``first_stage_model.*`` (the VAE) and
``cond_stage_model.transformer.*`` (Hugging Face's CLIPTextModel); SD 2.x files hold the OpenCLIP text encoder
under ``cond_stage_model.model.*``, of which Stable Diffusion 2 reads the penultimate layer (the last one is
dropped here, as diffusers does). A file that also holds EMA weights (``model_ema.*``, the UNet's parameter names
without dots) is imported with the EMA weights: they are what the model was sampled with.

The model's sizes are read from the tensors' shapes. What a file does not record is asked for: SD 2.x
files say nothing of epsilon or v prediction, and no file holds a tokenizer.

``original_key`` maps each of our (diffusers-named) parameters to its original name, structurally, so the same
table reads a file (``ldm-import``) and writes one (the tests, with diffusers' own single-file loader as the
oracle).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from ldm_export.errors import ImportRefusedError
from ldm_export.imported_checkpoint import (canonical_clip, clip_shapes, clip_state_dict, fit_state_dict,
                                            load_safetensors, write_checkpoint)
from ldm_runtime.config import (AutoencoderConfig, ConfigError, DDIMConfig, ModelConfig, ScheduleConfig,
                                TextEncoderConfig, UNetConfig)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
OPENCLIP_HEAD_DIM = 64  # SD 2.x's OpenCLIP ViT-H/14 text tower and UNet both use 64-wide heads
SD1_UNET_HEADS = 8

RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_resnet(rest: str) -> str:
    layer, _, leaf = rest.partition(".")
    return f"{RESNET_NAMES[layer]}.{leaf}"


def unet_original_key(name: str, num_res_blocks: int, attention_levels: tuple[bool, ...]) -> str:
    """Our UNet parameter ``name`` -> its key in an original SD file (without the model.diffusion_model. prefix)."""
    per_level = num_res_blocks + 1  # LDM's up path has one more block per level
    simple = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for ours, original in simple.items():
        if name.startswith(ours + "."):
            return original + name[len(ours):]
    match = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", name)
    if match:
        level, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * (num_res_blocks + 1)}.0.op.{rest.removeprefix('conv.')}"
        block = 1 + level * (num_res_blocks + 1) + index
        return f"input_blocks.{block}.0.{_unet_resnet(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    match = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if match:
        kind, index, rest = match[1], int(match[2]), match[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * index}.{_unet_resnet(rest)}"
    match = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", name)
    if match:
        level, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "upsamplers":
            with_attention = attention_levels[len(attention_levels) - 1 - level]
            return f"output_blocks.{level * per_level + num_res_blocks}.{2 if with_attention else 1}.{rest}"
        block = level * per_level + index
        return f"output_blocks.{block}.0.{_unet_resnet(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
    raise AssertionError(f"no original name for UNet parameter {name}")


def vae_original_key(name: str, levels: int) -> str:
    """Our autoencoder parameter ``name`` -> its key in an original SD file (without first_stage_model.)."""
    if name.startswith(("quant_conv.", "post_quant_conv.")):
        return name
    coder, _, rest = name.partition(".")
    rest = rest.replace("conv_norm_out.", "norm_out.")
    match = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
    if match:
        direction, level, kind, index, leaf = match[1], int(match[2]), match[3], match[4], match[5]
        original_level = level if direction == "down" else levels - 1 - level
        if kind == "resnets":
            return f"{coder}.{direction}.{original_level}.block.{index}.{leaf.replace('conv_shortcut', 'nin_shortcut')}"
        sampler = "downsample" if kind == "downsamplers" else "upsample"
        return f"{coder}.{direction}.{original_level}.{sampler}.{leaf}"
    match = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", rest)
    if match:
        kind, index, leaf = match[1], int(match[2]), match[3]
        if kind == "resnets":
            return f"{coder}.mid.block_{index + 1}.{leaf.replace('conv_shortcut', 'nin_shortcut')}"
        module, _, tensor = leaf.rpartition(".")
        return f"{coder}.mid.attn_1.{VAE_ATTENTION_NAMES[module]}.{tensor}"
    return f"{coder}.{rest}"  # conv_in, norm_out, conv_out


def _ema_key(original_unet_key: str) -> str:
    """LDM's LitEma stores ``diffusion_model.<name>`` as ``model_ema.<that name without dots>``."""
    return EMA_PREFIX + ("diffusion_model." + original_unet_key).replace(".", "")


# --- OpenCLIP (SD 2.x) <-> transformers' CLIPTextModel ------------------------------------------------------------

# OpenCLIP's text-tower names -> CLIPTextModel's: the tensors outside the blocks, then the parts of block i
# (transformer.resblocks.i. -> encoder.layers.i.); attn.in_proj_* is q, k and v in one, split and joined apart
OPENCLIP_TOP_NAMES = {"token_embedding.weight": "embeddings.token_embedding.weight",
                      "positional_embedding": "embeddings.position_embedding.weight",
                      "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
OPENCLIP_BLOCK_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                        "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
QKV = ("q_proj", "k_proj", "v_proj")


def openclip_to_clip(tensors: dict[str, Any], layers: int) -> dict[str, Any]:
    """The first ``layers`` OpenCLIP text blocks (keys without cond_stage_model.model.) as CLIPTextModel weights."""
    import torch

    clip = {ours: tensors[original] for original, ours in OPENCLIP_TOP_NAMES.items()}
    for layer in range(layers):
        source, target = f"transformer.resblocks.{layer}.", f"encoder.layers.{layer}."
        for original, ours in OPENCLIP_BLOCK_NAMES.items():
            for leaf in ("weight", "bias"):
                clip[f"{target}{ours}.{leaf}"] = tensors[f"{source}{original}.{leaf}"]
        for leaf in ("weight", "bias"):
            parts = torch.chunk(tensors[f"{source}attn.in_proj_{leaf}"], 3, dim=0)
            for projection, tensor in zip(QKV, parts):
                clip[f"{target}self_attn.{projection}.{leaf}"] = tensor
    return clip


def clip_to_openclip(tensors: dict[str, Any]) -> dict[str, Any]:
    """CLIPTextModel weights -> OpenCLIP text-tower keys (the inverse of ``openclip_to_clip``)."""
    import torch

    tensors = canonical_clip(tensors)
    original = {name: tensors[ours] for name, ours in OPENCLIP_TOP_NAMES.items()}
    layer = 0
    while f"encoder.layers.{layer}.layer_norm1.weight" in tensors:
        source, target = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for name, ours in OPENCLIP_BLOCK_NAMES.items():
            for leaf in ("weight", "bias"):
                original[f"{target}{name}.{leaf}"] = tensors[f"{source}{ours}.{leaf}"]
        for leaf in ("weight", "bias"):
            original[f"{target}attn.in_proj_{leaf}"] = torch.cat([tensors[f"{source}self_attn.{p}.{leaf}"]
                                                                  for p in QKV])
        layer += 1
    return original


def _count(tensors: dict[str, Any], pattern: str) -> int:
    """How many distinct values the first group of ``pattern`` takes over the keys."""
    return len({match[1] for name in tensors for match in [re.match(pattern, name)] if match})


# --- reading a single file ---------------------------------------------------------------------------------------

def _strip(tensors: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}


def _use_ema(tensors: dict[str, Any], unet: dict[str, Any]) -> bool:
    """True when the file holds an EMA copy of every UNet parameter (then the EMA copy is imported)."""
    return any(name.startswith(EMA_PREFIX) for name in tensors) and all(
        _ema_key(name) in tensors for name in unet)


def infer_configs(unet: dict[str, Any], vae: dict[str, Any], text: dict[str, Any], openclip: bool,
                  where: Path) -> tuple[UNetConfig, AutoencoderConfig, TextEncoderConfig]:
    """(UNetConfig, AutoencoderConfig, TextEncoderConfig) read from the tensors' shapes and names, with Stable
    Diffusion's fixed choices for what shapes do not tell (32 norm groups, SD 1.x's 8 heads or SD 2.x's 64-wide
    ones, 64-wide CLIP heads, SD 2.x's fp32 attention)."""
    try:
        model_channels = int(unet["input_blocks.0.0.weight"].shape[0])
        downsamplers = sorted(int(m[1]) for name in unet for m in [re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", name)]
                              if m)
        num_res_blocks = downsamplers[0] - 1 if downsamplers else _count(unet, r"input_blocks\.(\d+)\.") - 1
        levels = len(downsamplers) + 1
        first_blocks = [1 + level * (num_res_blocks + 1) for level in range(levels)]
        widths = [int(unet[f"input_blocks.{block}.0.out_layers.3.weight"].shape[0]) for block in first_blocks]
        attention_levels = tuple(f"input_blocks.{block}.1.proj_in.weight" in unet for block in first_blocks)
        some_attention = next(name for name in unet if name.endswith("attn2.to_k.weight"))
        prefix = some_attention.split("transformer_blocks.")[0]
        depth = _count(unet, re.escape(prefix) + r"transformer_blocks\.(\d+)\.")
        unet_cfg = UNetConfig(
            in_channels=int(unet["input_blocks.0.0.weight"].shape[1]), out_channels=int(unet["out.2.weight"].shape[0]),
            model_channels=model_channels, channel_mult=tuple(w // model_channels for w in widths),
            num_res_blocks=num_res_blocks, attention_levels=attention_levels,
            num_heads=widths[-1] // OPENCLIP_HEAD_DIM if openclip else SD1_UNET_HEADS,
            level_heads=tuple(w // OPENCLIP_HEAD_DIM for w in widths) if openclip else (),
            transformer_depth=depth, context_dim=int(unet[some_attention].shape[1]),
            use_linear_projection=unet[prefix + "proj_in.weight"].dim() == 2, upcast_attention=openclip,
        )
        base = int(vae["encoder.conv_in.weight"].shape[0])
        vae_levels = _count(vae, r"encoder\.down\.(\d+)\.")
        autoencoder_cfg = AutoencoderConfig(
            kind="kl", base_channels=base,
            channel_mult=tuple(int(vae[f"encoder.down.{level}.block.0.conv2.weight"].shape[0]) // base
                               for level in range(vae_levels)),
            num_res_blocks=_count(vae, r"encoder\.down\.0\.block\.(\d+)\."),
            latent_channels=int(vae["post_quant_conv.weight"].shape[0]),
            mid_attention="encoder.mid.attn_1.q.weight" in vae,
        )
        hidden = int(text["embeddings.token_embedding.weight"].shape[1])
        text_cfg = TextEncoderConfig(
            kind="clip", path="", max_length=int(text["embeddings.position_embedding.weight"].shape[0]),
            hidden_size=hidden, num_layers=_count(text, r"encoder\.layers\.(\d+)\."),
            num_heads=max(1, hidden // OPENCLIP_HEAD_DIM),
            intermediate_size=int(text["encoder.layers.0.mlp.fc1.weight"].shape[0]),
            vocab_size=int(text["embeddings.token_embedding.weight"].shape[0]),
            hidden_act="gelu" if openclip else "quick_gelu", mask_padding=False,
        )
    except (KeyError, StopIteration, IndexError) as error:
        raise ImportRefusedError(f"{where} lacks a tensor an SD 1.x/2.x file has ({error}); expected "
                                 f"model.diffusion_model.*, first_stage_model.* and cond_stage_model.* keys") from None
    return unet_cfg, autoencoder_cfg, text_cfg


def import_single_file(path: Path, out: Path, tokenizer: Path | None, prediction_type: str | None,
                       image_size: int | None, clip_skip: int, log) -> Path:
    """Checkpoint dir ``out`` from the original-layout SD 1.x/2.x file ``path`` (see the module docstring)."""
    tensors = load_safetensors(path)
    unet = _strip(tensors, UNET_PREFIX)
    vae = _strip(tensors, VAE_PREFIX)
    openclip = any(name.startswith(OPENCLIP_PREFIX) for name in tensors)
    if not unet or not vae or not (openclip or any(name.startswith(CLIP_PREFIX) for name in tensors)):
        raise ImportRefusedError(f"{path} is not an original-layout Stable Diffusion 1.x/2.x file; expected "
                                 f"model.diffusion_model.*, first_stage_model.* and cond_stage_model.* keys")
    if tokenizer is None:
        raise ImportRefusedError(f"{path} holds no tokenizer; pass --tokenizer DIR (the model's CLIP tokenizer "
                                 f"folder, e.g. the tokenizer/ of its diffusers release)")
    if openclip and prediction_type is None:
        raise ImportRefusedError(f"{path} is Stable Diffusion 2.x, whose files do not say what the UNet predicts; "
                                 f"pass --prediction-type v_prediction (768-v models) or epsilon (512-base models)")
    prediction_type = prediction_type or "epsilon"
    if openclip:
        openclip_tensors = _strip(tensors, OPENCLIP_PREFIX)
        layers = _count(openclip_tensors, r"transformer\.resblocks\.(\d+)\.") - 1  # SD 2 reads the penultimate layer
        text = openclip_to_clip(openclip_tensors, layers)
    else:
        text = canonical_clip(_strip(tensors, CLIP_PREFIX))
    unet_cfg, autoencoder_cfg, text_cfg = infer_configs(unet, vae, text, openclip, path)
    text_cfg = dataclasses.replace(text_cfg, clip_skip=clip_skip)
    size = image_size or (768 if prediction_type == "v_prediction" else 512)
    config = ModelConfig(image_size=size, autoencoder=autoencoder_cfg, unet=unet_cfg, text_encoder=text_cfg,
                         schedule=ScheduleConfig(prediction_type=prediction_type), latent_scale_factor=0.18215,
                         sampler=DDIMConfig(steps_offset=1, set_alpha_to_one=False, clip_sample=False))
    try:
        config.validate()
    except ConfigError as error:
        raise ImportRefusedError(f"{path} does not describe a model these networks run: {error}") from None

    import torch

    from ldm_runtime.models import Autoencoder, UNet

    with torch.device("meta"):
        unet_model, autoencoder_model = UNet(unet_cfg), Autoencoder(autoencoder_cfg)
    ema = _use_ema(tensors, {unet_original_key(name, unet_cfg.num_res_blocks, unet_cfg.attention_levels): None
                             for name in unet_model.state_dict()})
    unet_weights = {}
    for name in unet_model.state_dict():
        original = unet_original_key(name, unet_cfg.num_res_blocks, unet_cfg.attention_levels)
        key = _ema_key(original) if ema else UNET_PREFIX + original
        if key in tensors:
            unet_weights[name] = tensors[key]
    vae_weights = {}
    for name in autoencoder_model.state_dict():
        key = VAE_PREFIX + vae_original_key(name, len(autoencoder_cfg.channel_mult))
        if key in tensors:
            vae_weights[name] = tensors[key]
    text_shapes = clip_shapes(text_cfg)
    weights = {
        "unet": fit_state_dict(unet_model, unet_weights, "UNet", path),
        "autoencoder": fit_state_dict(autoencoder_model, vae_weights, "VAE", path),
        "text_encoder": fit_state_dict(text_shapes, clip_state_dict(text, text_shapes), "text encoder", path),
    }
    log(f"read the {'EMA ' if ema else ''}UNet, the VAE and the {'OpenCLIP' if openclip else 'CLIP'} text encoder "
        f"from {path}")
    return write_checkpoint(out, config, weights, tokenizer, log,
                            settings={"source": path.name, "clip_skip": clip_skip, "ema": ema,
                                      "prediction_type": config.schedule.prediction_type,
                                      "image_size": config.image_size})


def original_state_dict(unet: dict[str, Any], unet_cfg, vae: dict[str, Any], autoencoder_cfg,
                        text: dict[str, Any], openclip: bool) -> dict[str, Any]:
    """Our (diffusers-named) weights in the original single-file layout; ``text`` has CLIPTextModel keys."""
    tensors = {UNET_PREFIX + unet_original_key(name, unet_cfg.num_res_blocks, unet_cfg.attention_levels): tensor
               for name, tensor in unet.items()}
    levels = len(autoencoder_cfg.channel_mult)
    for name, tensor in vae.items():
        original = vae_original_key(name, levels)
        if ".mid.attn_1." in original and tensor.dim() == 2:  # the original attention projections are 1x1 convs
            tensor = tensor[:, :, None, None]
        tensors[VAE_PREFIX + original] = tensor
    if openclip:
        tensors.update({OPENCLIP_PREFIX + name: tensor for name, tensor in clip_to_openclip(text).items()})
    else:
        tensors.update({f"{CLIP_PREFIX}text_model.{name}": tensor for name, tensor in canonical_clip(text).items()})
    return tensors
