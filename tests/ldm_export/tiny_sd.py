"""Random-weight Stable Diffusion pipelines small enough for CI, built with diffusers and transformers and
saved with ``save_pretrained`` (or as one original-layout file): one SD 1.x-like (1x1-conv projections, 4 heads
everywhere, quick-GELU CLIP, epsilon prediction) and one SD 2.x-like (linear projections, 64-wide heads, fp32
attention, GELU CLIP, v-prediction, "!" padding). Both tokenize with a small CLIP BPE vocabulary written here (no
downloads)."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm_export.sd_single_file import EMA_PREFIX, UNET_PREFIX, _ema_key, original_state_dict
from ldm_runtime.config import ModelConfig
from ldm_runtime.noise import initial_noise, step_noise

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = ("red", "blue", "circle", "square", "on", "the", "a")
PROMPTS = ("a red circle on the blue square", "blue square", "the red red circle")


def write_clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of a tiny CLIP BPE: the letters, the letters ending a word, the words of
    ``WORDS`` merged letter by letter, "!" and the two special tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: list[str] = ["!", "!</w>", *LETTERS, *(f"{letter}</w>" for letter in LETTERS)]
    merges = []
    for word in WORDS:
        merged = word[0]
        for position, letter in enumerate(word[1:], start=1):
            last = position == len(word) - 1
            piece = letter + ("</w>" if last else "")
            merges.append(f"{merged} {piece}")
            merged = merged + piece
            if merged not in vocab:
                vocab.append(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    merges_file.write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return vocab_file, merges_file


@dataclass(frozen=True)
class TinySD:
    """The sizes of one tiny Stable Diffusion."""

    name: str
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    attention_head_dim: int | tuple[int, ...]
    use_linear_projection: bool
    upcast_attention: bool
    text_width: int
    hidden_act: str
    pad_token: str
    prediction_type: str
    scaling_factor: float


# Stable Diffusion's fixed choices, which an original-layout file does not record, are kept: 32 norm groups, 8 UNet
# heads (SD 1.x) or 64-wide ones (SD 2.x), 64-wide CLIP heads, the 0.18215 VAE scale.
SD1_LIKE = TinySD("sd1", (32, 64), ("CrossAttnDownBlock2D", "DownBlock2D"), 8, False, False, 64, "quick_gelu",
                  "<|endoftext|>", "epsilon", 0.18215)
SD2_LIKE = TinySD("sd2", (64, 128), ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), (1, 2), True, True, 128, "gelu",
                  "!", "v_prediction", 0.18215)
LATENT_SIZE = 8
IMAGE_SIZE = 16  # the VAE below halves once


def build_pipeline(sizes: TinySD, seed: int):
    """A diffusers StableDiffusionPipeline of ``sizes`` with random weights drawn from ``seed``."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    up_block_types = tuple("CrossAttnUpBlock2D" if block.startswith("CrossAttn") else "UpBlock2D"
                           for block in reversed(sizes.down_block_types))
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=sizes.block_out_channels,
        layers_per_block=1, down_block_types=sizes.down_block_types, up_block_types=up_block_types,
        cross_attention_dim=sizes.text_width, attention_head_dim=sizes.attention_head_dim, norm_num_groups=32,
        use_linear_projection=sizes.use_linear_projection, upcast_attention=sizes.upcast_attention,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        sample_size=IMAGE_SIZE, scaling_factor=sizes.scaling_factor,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=2 + 2 * len(LETTERS) + 40, hidden_size=sizes.text_width, intermediate_size=2 * sizes.text_width,
        num_hidden_layers=2, num_attention_heads=sizes.text_width // 64, max_position_embeddings=77,
        hidden_act=sizes.hidden_act,
        bos_token_id=0, eos_token_id=2,
    ))
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file = write_clip_tokenizer_files(Path(scratch))
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=sizes.pad_token,
                                  unk_token="<|endoftext|>", model_max_length=77)
    assert len(tokenizer) <= text_encoder.config.vocab_size, len(tokenizer)
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                    set_alpha_to_one=False)
    if sizes.prediction_type == "epsilon":  # SD 1.x ships a PNDM config; DDIM reads the keys it shares
        scheduler = PNDMScheduler(skip_prk_steps=True, **schedule)
    else:
        scheduler = DDIMScheduler(prediction_type=sizes.prediction_type, clip_sample=False, **schedule)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_diffusers_folder(sizes: TinySD, folder: Path, seed: int) -> Path:
    """``save_pretrained`` of a random ``sizes`` pipeline into ``folder`` (safetensors weights)."""
    build_pipeline(sizes, seed).save_pretrained(str(folder), safe_serialization=True)
    # SD 1.x's PNDM scheduler_config.json also says clip_sample false (PNDM ignores it; DDIM would clip without it)
    scheduler_json = folder / "scheduler" / "scheduler_config.json"
    scheduler_json.write_text(json.dumps({**json.loads(scheduler_json.read_text()), "clip_sample": False}))
    return folder


def component_weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    """The weights of diffusers folder ``folder``'s ``component`` ("unet", "vae", "text_encoder")."""
    return load_file(str(next((folder / component).glob("*.safetensors"))))


def write_original_file(source: Path, checkpoint: Path, path: Path, openclip: bool, extra_text_layer: bool,
                        ema: bool = False) -> Path:
    """The diffusers folder ``source`` (imported as ``checkpoint``) as one original-layout file. SD 2.x files
    also hold OpenCLIP's last text block, which SD 2 does not read (``extra_text_layer``), and its projection."""
    config = ModelConfig.from_json((checkpoint / "model.json").read_text())
    text = component_weights(source, "text_encoder")
    tensors = original_state_dict(component_weights(source, "unet"), config.unet, component_weights(source, "vae"),
                                  config.autoencoder, text, openclip)
    if openclip:
        width = config.text_encoder.hidden_size
        tensors["cond_stage_model.model.text_projection"] = torch.randn(width, width)
        tensors["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
        if extra_text_layer:
            last = config.text_encoder.num_layers - 1
            for name in [n for n in tensors if f".resblocks.{last}." in n]:
                tensors[name.replace(f".resblocks.{last}.", f".resblocks.{last + 1}.")] = torch.randn_like(tensors[name])
    if ema:  # the EMA copy holds the real weights; the raw training weights are something else
        for name in [n for n in tensors if n.startswith(UNET_PREFIX)]:
            tensors[_ema_key(name[len(UNET_PREFIX):])] = tensors[name]
            tensors[name] = torch.randn_like(tensors[name])
        tensors[EMA_PREFIX + "decay"] = torch.tensor(0.9999)
        tensors[EMA_PREFIX + "num_updates"] = torch.tensor(1000, dtype=torch.int32)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path))
    return path


# diffusers' modules that draw noise: the stochastic schedulers' steps and the edit pipelines' x_T
STOCHASTIC_MODULES = ("scheduling_euler_ancestral_discrete", "scheduling_dpmsolver_multistep", "scheduling_lcm",
                      "scheduling_tcd")
PIPELINE_MODULES = {"img2img": "pipeline_stable_diffusion_img2img", "inpaint": "pipeline_stable_diffusion_inpaint"}


def feed_our_noise(monkeypatch, seed: int, shape: tuple[int, ...]) -> None:
    """Make diffusers' edit pipelines draw our noise for ``seed`` (x_T, and each stochastic step's in turn) for
    latents of ``shape`` (C, h, w), and take the image's latents as the posterior mode (our encoder's) where
    diffusers draws a sample."""
    drawn: list[tuple] = []

    def step_randn(noise_shape, dtype=None, **kwargs):
        drawn.append(noise_shape)
        return torch.from_numpy(step_noise([seed], [len(drawn) - 1], shape)).to(dtype)

    def initial_randn(noise_shape, dtype=None, **kwargs):
        assert tuple(noise_shape) == (1, *shape), noise_shape
        return torch.from_numpy(initial_noise([seed], shape)).to(dtype)

    for name in STOCHASTIC_MODULES:
        monkeypatch.setattr(importlib.import_module(f"diffusers.schedulers.{name}"), "randn_tensor", step_randn)
    for name in PIPELINE_MODULES.values():
        module = importlib.import_module(f"diffusers.pipelines.stable_diffusion.{name}")
        monkeypatch.setattr(module, "randn_tensor", initial_randn)
        monkeypatch.setattr(module, "retrieve_latents", lambda output, generator=None: output.latent_dist.mode())


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    scale = float(expected.double().norm())
    assert scale > 0, "comparing against zeros proves nothing"
    return float((actual.double() - expected.double()).norm()) / scale
