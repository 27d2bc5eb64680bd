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
from typing import Any, Sequence

from ldm_export.diffusers_config import autoencoder_to_diffusers, unet_to_diffusers
from ldm_export.diffusers_limits import TEXT_ENCODER_LIMITS, UNET_LIMITS, VAE_LIMITS, check_values
from ldm_export.diffusers_scheduler import IMPORTED_STEPS
from ldm_export.errors import ImportRefusedError
from ldm_export.imported_checkpoint import (canonical_clip, checked_weights, clip_shapes, clip_state_dict,
                                            fit_state_dict, write_checkpoint)
from ldm_export.lora import AdapterFile, fuse_into_import
from ldm_export.untrusted_files import shape_only
from ldm_runtime.config import (AutoencoderConfig, ConfigError, DDIMConfig, ModelConfig, SamplerDefaults,
                                ScheduleConfig, TextEncoderConfig, UNetConfig)

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


def openclip_sources(layers: int) -> dict[str, tuple[str, int | None]]:
    """CLIPTextModel name -> (the OpenCLIP name it is read from, which third of that tensor: 0, 1, 2 for q, k, v;
    None: all of it), for the first ``layers`` OpenCLIP text blocks."""
    sources = {ours: (original, None) for original, ours in OPENCLIP_TOP_NAMES.items()}
    for layer in range(layers):
        source, target = f"transformer.resblocks.{layer}.", f"encoder.layers.{layer}."
        for leaf in ("weight", "bias"):
            for original, ours in OPENCLIP_BLOCK_NAMES.items():
                sources[f"{target}{ours}.{leaf}"] = (f"{source}{original}.{leaf}", None)
            for third, projection in enumerate(QKV):
                sources[f"{target}self_attn.{projection}.{leaf}"] = (f"{source}attn.in_proj_{leaf}", third)
    return sources


def openclip_to_clip(tensors: dict[str, Any], layers: int) -> dict[str, Any]:
    """The first ``layers`` OpenCLIP text blocks (keys without cond_stage_model.model.) as CLIPTextModel weights; one
    the file lacks is left out (``fit_state_dict`` names it)."""
    import torch

    clip = {}
    for ours, (original, third) in openclip_sources(layers).items():
        if original in tensors:
            tensor = tensors[original]
            clip[ours] = tensor if third is None or tensor.dim() == 0 else torch.tensor_split(tensor, 3)[third]
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


def _use_ema(names, unet_originals) -> bool:
    """True when the file's tensor ``names`` hold an EMA copy of every UNet parameter (original names, without
    model.diffusion_model.): then the EMA copy is imported."""
    return any(name.startswith(EMA_PREFIX) for name in names) and all(
        _ema_key(name) in names for name in unet_originals)


def _side(tensors: dict[str, Any], name: str, axis: int, where: Path) -> int:
    """Size ``axis`` of tensor ``name``; ``ImportRefusedError`` naming its shape where it has no such axis."""
    shape = list(tensors[name].shape)
    if axis >= len(shape):
        raise ImportRefusedError(f"{where}: the tensor ending {name!r} has shape {shape}; expected at least "
                                 f"{axis + 1} dimensions")
    return shape[axis]


def infer_configs(unet: dict[str, Any], vae: dict[str, Any], text: dict[str, Any], openclip: bool,
                  where: Path) -> tuple[UNetConfig, AutoencoderConfig, TextEncoderConfig]:
    """(UNetConfig, AutoencoderConfig, TextEncoderConfig) read from the tensors' shapes and names, with Stable
    Diffusion's fixed choices for what shapes do not tell (32 norm groups, SD 1.x's 8 heads or SD 2.x's 64-wide
    ones, 64-wide CLIP heads, SD 2.x's fp32 attention)."""
    try:
        model_channels = _side(unet, "input_blocks.0.0.weight", 0, where)
        if not model_channels:
            raise ImportRefusedError(f"{where}: {UNET_PREFIX}input_blocks.0.0.weight has no output channels; "
                                     f"expected the UNet's first convolution")
        downsamplers = sorted(int(m[1]) for name in unet for m in [re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", name)]
                              if m)
        num_res_blocks = downsamplers[0] - 1 if downsamplers else _count(unet, r"input_blocks\.(\d+)\.") - 1
        levels = len(downsamplers) + 1
        first_blocks = [1 + level * (num_res_blocks + 1) for level in range(levels)]
        widths = [_side(unet, f"input_blocks.{block}.0.out_layers.3.weight", 0, where) for block in first_blocks]
        attention_levels = tuple(f"input_blocks.{block}.1.proj_in.weight" in unet for block in first_blocks)
        some_attention = next(name for name in unet if name.endswith("attn2.to_k.weight"))
        prefix = some_attention.split("transformer_blocks.")[0]
        depth = _count(unet, re.escape(prefix) + r"transformer_blocks\.(\d+)\.")
        unet_cfg = UNetConfig(
            in_channels=_side(unet, "input_blocks.0.0.weight", 1, where),
            out_channels=_side(unet, "out.2.weight", 0, where),
            model_channels=model_channels, channel_mult=tuple(w // model_channels for w in widths),
            num_res_blocks=num_res_blocks, attention_levels=attention_levels,
            num_heads=widths[-1] // OPENCLIP_HEAD_DIM if openclip else SD1_UNET_HEADS,
            level_heads=tuple(w // OPENCLIP_HEAD_DIM for w in widths) if openclip else (),
            transformer_depth=depth, context_dim=_side(unet, some_attention, 1, where),
            use_linear_projection=unet[prefix + "proj_in.weight"].dim() == 2, upcast_attention=openclip,
        )
        base = _side(vae, "encoder.conv_in.weight", 0, where)
        if not base:
            raise ImportRefusedError(f"{where}: {VAE_PREFIX}encoder.conv_in.weight has no output channels; "
                                     f"expected the VAE's first convolution")
        vae_levels = _count(vae, r"encoder\.down\.(\d+)\.")
        autoencoder_cfg = AutoencoderConfig(
            kind="kl", base_channels=base,
            channel_mult=tuple(_side(vae, f"encoder.down.{level}.block.0.conv2.weight", 0, where) // base
                               for level in range(vae_levels)),
            num_res_blocks=_count(vae, r"encoder\.down\.0\.block\.(\d+)\."),
            latent_channels=_side(vae, "post_quant_conv.weight", 0, where),
            mid_attention="encoder.mid.attn_1.q.weight" in vae,
        )
        hidden = _side(text, "embeddings.token_embedding.weight", 1, where)
        text_cfg = TextEncoderConfig(
            kind="clip", path="", max_length=_side(text, "embeddings.position_embedding.weight", 0, where),
            hidden_size=hidden, num_layers=_count(text, r"encoder\.layers\.(\d+)\."),
            num_heads=max(1, hidden // OPENCLIP_HEAD_DIM),
            intermediate_size=_side(text, "encoder.layers.0.mlp.fc1.weight", 0, where),
            vocab_size=_side(text, "embeddings.token_embedding.weight", 0, where),
            hidden_act="gelu" if openclip else "quick_gelu", mask_padding=False,
        )
    except (KeyError, StopIteration) as error:
        raise ImportRefusedError(f"{where} lacks a tensor an SD 1.x/2.x file has ({error}); expected "
                                 f"model.diffusion_model.*, first_stage_model.* and cond_stage_model.* keys") from None
    return unet_cfg, autoencoder_cfg, text_cfg


def _check_sizes(config: ModelConfig, image_size: int | None, where: Path) -> None:
    """The networks read from a file's shapes, within the sizes a diffusers folder's config.json may give."""
    from ldm_runtime.models.text_encoder import clip_text_config

    largest = int(UNET_LIMITS["sample_size"].high) * config.autoencoder.factor
    if image_size is not None and not 0 < image_size <= largest:
        raise ImportRefusedError(f"--image-size {image_size} is out of range; expected 1 to {largest} pixels for "
                                 f"{where}")
    check_values(unet_to_diffusers(config.unet, config.latent_size), UNET_LIMITS, "the UNet's", where)
    check_values(autoencoder_to_diffusers(config.autoencoder), VAE_LIMITS, "the VAE's", where)
    check_values(clip_text_config(config.text_encoder).to_dict(), TEXT_ENCODER_LIMITS, "the text encoder's", where)


def _renamed(tensors: dict[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    """{our name: the tensor of its name in the file} for each of ``sources`` that ``tensors`` holds."""
    return {name: tensors[key] for name, key in sources.items() if key in tensors}


def import_single_file(path: Path, header: dict[str, tuple[str, tuple[int, ...]]], out: Path, tokenizer: Path | None,
                       prediction_type: str | None, image_size: int | None, clip_skip: int, log,
                       adapters: Sequence[AdapterFile] = ()) -> Path:
    """Checkpoint dir ``out`` from the original-layout SD 1.x/2.x file ``path`` (see the module docstring), with
    ``adapters`` fused, whose safetensors ``header`` is checked first: every refusal comes before a tensor is read."""
    openclip = any(name.startswith(OPENCLIP_PREFIX) for name in header)
    if not all(any(name.startswith(prefix) for name in header)
               for prefix in (UNET_PREFIX, VAE_PREFIX, OPENCLIP_PREFIX if openclip else CLIP_PREFIX)):
        raise ImportRefusedError(f"{path} is not an original-layout Stable Diffusion 1.x/2.x file; expected "
                                 f"model.diffusion_model.*, first_stage_model.* and cond_stage_model.* keys")
    if tokenizer is None:
        raise ImportRefusedError(f"{path} holds no tokenizer; pass --tokenizer DIR (the model's CLIP tokenizer "
                                 f"folder, e.g. the tokenizer/ of its diffusers release)")
    if openclip and prediction_type is None:
        raise ImportRefusedError(f"{path} is Stable Diffusion 2.x, whose files do not say what the UNet predicts; "
                                 f"pass --prediction-type v_prediction (768-v models) or epsilon (512-base models)")
    prediction_type = prediction_type or "epsilon"
    shapes = shape_only(header)
    # SD 2 reads the penultimate OpenCLIP layer
    text_layers = _count(_strip(shapes, OPENCLIP_PREFIX), r"transformer\.resblocks\.(\d+)\.") - 1

    def text_of(tensors: dict[str, Any]) -> dict[str, Any]:
        if openclip:
            return openclip_to_clip(_strip(tensors, OPENCLIP_PREFIX), text_layers)
        return canonical_clip(_strip(tensors, CLIP_PREFIX))

    unet_cfg, autoencoder_cfg, text_cfg = infer_configs(_strip(shapes, UNET_PREFIX), _strip(shapes, VAE_PREFIX),
                                                        text_of(shapes), openclip, path)
    text_cfg = dataclasses.replace(text_cfg, clip_skip=clip_skip)
    size = image_size or (768 if prediction_type == "v_prediction" else 512)
    config = ModelConfig(image_size=size, autoencoder=autoencoder_cfg, unet=unet_cfg, text_encoder=text_cfg,
                         schedule=ScheduleConfig(prediction_type=prediction_type), latent_scale_factor=0.18215,
                         sampler=DDIMConfig(steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                                            previous_timestep="diffusers"),
                         # a single file names no scheduler: DDIM, as SD's own scripts sample it
                         default_sampler=SamplerDefaults(name="ddim", steps=IMPORTED_STEPS))
    _check_sizes(config, image_size, path)
    try:
        config.validate()
    except ConfigError as error:
        raise ImportRefusedError(f"{path} does not describe a model these networks run: {error}") from None

    import torch

    from ldm_runtime.models import Autoencoder, UNet

    with torch.device("meta"):
        unet_model, autoencoder_model = UNet(unet_cfg), Autoencoder(autoencoder_cfg)
    unet_originals = {name: unet_original_key(name, unet_cfg.num_res_blocks, unet_cfg.attention_levels)
                      for name in unet_model.state_dict()}
    ema = _use_ema(header, unet_originals.values())
    unet_keys = {name: _ema_key(original) if ema else UNET_PREFIX + original
                 for name, original in unet_originals.items()}
    vae_keys = {name: VAE_PREFIX + vae_original_key(name, len(autoencoder_cfg.channel_mult))
                for name in autoencoder_model.state_dict()}
    text_names = (dict.fromkeys(OPENCLIP_PREFIX + original for original, _ in openclip_sources(text_layers).values())
                  if openclip else [name for name in header if name.startswith(CLIP_PREFIX)])
    text_shapes = clip_shapes(text_cfg)
    weights = {
        "unet": checked_weights(path, header, lambda tensors: fit_state_dict(
            unet_model, _renamed(tensors, unet_keys), "UNet", path), unet_keys.values()),
        "autoencoder": checked_weights(path, header, lambda tensors: fit_state_dict(
            autoencoder_model, _renamed(tensors, vae_keys), "VAE", path), vae_keys.values()),
        "text_encoder": checked_weights(path, header, lambda tensors: fit_state_dict(
            text_shapes, clip_state_dict(text_of(tensors), text_shapes), "text encoder", path), text_names),
    }
    config, weights = fuse_into_import(config, weights, adapters, log)
    write_checkpoint(out, config, weights, tokenizer,
                     settings={"source": path.name, "clip_skip": clip_skip, "ema": ema,
                               "prediction_type": config.schedule.prediction_type, "image_size": config.image_size})
    log(f"wrote {out} from the {'EMA ' if ema else ''}UNet, the VAE and the {'OpenCLIP' if openclip else 'CLIP'} "
        f"text encoder of {path}")
    return out


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
