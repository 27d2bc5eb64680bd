"""Text to image, image to image and inpainting over any engine: requests in, ``(H, W, 3) uint8`` images out.

Each image is a function of its own request only (prompt, negative prompt, seed, sampler, steps, guidance,
eta, size, init image, strength, mask), never of the requests it shares a batch with: its noise comes from its own seed
(``ldm_runtime.noise``), and every operation on a batch works row by row (exactly so on an engine whose
calls are row-wise exact, as the torch engine's fixed-size chunks make them).

The sampling loop is three calls a server can drive itself, batching at step boundaries::

    states = pipeline.start(requests)   # prompts encoded, x_T drawn, each request's sampler trajectory planned
    states = pipeline.advance(states)   # one step for any set of unfinished states: one guided UNet call
    images = pipeline.decode(states)    # finished states -> images

States in one ``advance`` call may sit at different steps of different trajectories (the UNet takes one
timestep per row) and have different samplers, guidance scales, etas and prompts; ``generate`` is that loop.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from ldm_runtime.adapters import check_request_adapters
from ldm_runtime.arrays import array_module, concatenate, take_rows
from ldm_runtime.config import (
    CACHE_SCHEDULES,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    ETA_SAMPLERS,
    MAX_CACHE_INTERVAL,
    MAX_GUIDANCE_SCALE,
    SamplerDefaults,
    is_cache_interval,
    is_guidance_interval,
    is_guidance_scale,
)
from ldm_runtime.deep_cache import whole_steps
from ldm_runtime.engines.base import Array, Engine, EngineInfo, deep_cache_missing
from ldm_runtime.errors import RequestError
from ldm_runtime.guidance import GuidedBatch, guidance_below_one_note
from ldm_runtime.noise import MAX_SEED, initial_noise, step_noise
from ldm_runtime.schedulers import (
    SAMPLER_NAMES,
    DDIMConfig,
    DDIMSampler,
    DDIMTrajectory,
    NoiseSchedule,
    PLMSTrajectory,
    SigmaTrajectory,
    sigma_samplers,
)
from ldm_runtime.schedulers.sigmas import schedule_sigmas

__all__ = ["DEFAULT_GUIDANCE_SCALE", "DEFAULT_INPAINT_STRENGTH", "DEFAULT_SAMPLER", "DEFAULT_STEPS", "DEFAULT_STRENGTH",
           "GenerationRequest", "Pipeline", "SamplingState", "check_text"]
# diffusers' defaults: its img2img pipeline's strength, and its inpainting pipeline's (the masked region from noise)
DEFAULT_STRENGTH = 0.8
DEFAULT_INPAINT_STRENGTH = 1.0
REPAINT_THRESHOLD = 128  # a uint8 mask repaints from here up: diffusers binarizes masks at 0.5
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, eq=False)
class GenerationRequest:
    """One image to make. ``seed`` alone decides its noise; ``height``/``width`` None mean the model's image_size.
    ``sampler`` is one of ``SAMPLER_NAMES``; ``sampler`` and ``steps`` None mean the model's default
    (``Pipeline.resolve``: its ``default_sampler``, else ``DEFAULT_SAMPLER`` and ``DEFAULT_STEPS``; a sampler other
    than the default without steps takes ``OTHER_SAMPLER_STEPS``); ``eta`` applies to the samplers of
    ``ETA_SAMPLERS`` only: DDIM's eta, TCD's gamma. The stochastic samplers (euler-a, dpmpp-2m-sde,
    dpmpp-2m-sde-karras, lcm, tcd) draw each step's noise from ``seed`` as well.

    ``guidance_scale`` None: the model's ``default_sampler.guidance_scale``, else ``DEFAULT_GUIDANCE_SCALE`` (1: the
    conditional branch alone, no unconditional row).

    ``guidance_interval`` ``(low, high)`` applies guidance only at the UNet calls whose noise level sigma (of the
    timestep the UNet sees, sqrt((1 - a_t) / a_t)) lies in ``(low, high]``, as Kynkäänniemi et al. 2024 ("Applying
    guidance in a limited interval improves sample and distribution quality"); the other calls run the
    conditional branch alone, one UNet row instead of two. None: the model's default (``SamplerDefaults``),
    else guidance at every call.

    ``cache_interval`` N > 1 caches the UNet's deep features across steps (DeepCache, Ma et al. 2024): the UNet
    runs whole at one step in N (``cache_schedule`` "uniform"; "quadratic" packs those steps around a step
    part-way in, the paper's non-uniform schedule) and only its shallow part, on the features kept from the last
    whole step, at the steps between. None: the model's defaults, else 1 (every step whole) and "uniform".

    Prompts longer than the engine's ``text_max_length`` tokens are truncated, as in training.

    ``init_image`` ``(H, W, 3) uint8`` RGB makes it image to image (SDEdit, Meng et al. 2022), as diffusers'
    StableDiffusionImg2ImgPipeline: of the sampler's ``steps``, the last ``int(steps * strength)`` run, from the
    image's latents noised to the first of them with the seed's x_T noise. The image sets the size (``height`` and
    ``width`` none or equal). ``strength`` 1 starts from pure noise (text to image: the image is not used unless
    masked), 0 returns the image's autoencoder reconstruction. ``mask`` ``(H, W)`` uint8 (``REPAINT_THRESHOLD`` and
    up) or bool (True) marks what to repaint: after every step the latents outside it are the image's, noised to the
    next step's level (latent blending, as diffusers' StableDiffusionInpaintPipeline does for a 4-channel UNet), and
    the image returned has the init image's own pixels outside it. ``strength`` None: ``DEFAULT_STRENGTH``, or
    ``DEFAULT_INPAINT_STRENGTH`` with a mask. Requests hold read-only copies of the arrays and compare them by value.

    An inpainting model (``EngineInfo.inpainting``: Stable Diffusion's 9-channel UNets) needs both ``init_image`` and
    ``mask``: every UNet call takes the latents, the mask and the latents of the init image with the mask's pixels
    blanked, concatenated, as diffusers' StableDiffusionInpaintPipeline does for a 9-channel UNet (no latent
    blending); ``strength`` works as for any model.
    """

    prompt: str
    negative_prompt: str = ""  # "" is the unconditional prompt the model was trained with (caption dropout)
    seed: int
    sampler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    guidance_interval: tuple[float, float] | None = None
    cache_interval: int | None = None
    cache_schedule: str | None = None
    eta: float = 0.0
    height: int | None = None
    width: int | None = None
    init_image: np.ndarray | None = None
    strength: float | None = None
    mask: np.ndarray | None = None
    lora: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for name in _ARRAY_FIELDS:  # a copy the caller cannot change; replace() hands it on uncopied
            value = getattr(self, name)
            if isinstance(value, np.ndarray) and (value.flags.writeable or value.base is not None):
                value = value.copy()
                value.flags.writeable = False
                object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(_same_value(getattr(self, field.name), getattr(other, field.name))
                   for field in dataclasses.fields(self))

    def __hash__(self) -> int:
        return hash(tuple((value.shape, value.dtype.str) if isinstance(value, np.ndarray) else value
                          for value in (getattr(self, field.name) for field in dataclasses.fields(self))))


_ARRAY_FIELDS = ("init_image", "mask")


def _same_value(first: Any, second: Any) -> bool:
    if isinstance(first, np.ndarray) or isinstance(second, np.ndarray):
        return (isinstance(first, np.ndarray) and isinstance(second, np.ndarray) and first.dtype == second.dtype
                and first.shape == second.shape and bool(np.array_equal(first, second)))
    return bool(first == second)


@dataclass(frozen=True, eq=False)
class SamplingState:
    """One request part-way through sampling. ``step_index`` is the next step to take (``len(trajectory)`` when
    done); ``latents`` is x_t at that step, ``(1, C, h, w)`` float32 on the engine. The context rows are
    ``(1, L, D)`` float and the masks ``(1, L)`` bool, for the prompt and for the negative prompt.
    ``history`` is what the request's sampler keeps between steps (() at step 0, and always for DDIM): its
    ``history_size`` arrays shaped like ``latents``, e.g. a multistep solver's earlier model outputs.
    ``trajectory`` of an image-to-image request is its sampler's begun part-way (``trajectory_from``), so step 0 is
    the first step it takes; at strength 0 it is empty and the state done from the start."""

    request: GenerationRequest
    trajectory: DDIMTrajectory | SigmaTrajectory | PLMSTrajectory
    step_index: int
    latents: Array
    context: Array
    context_mask: Array
    negative_context: Array
    negative_context_mask: Array
    history: tuple[Array, ...] = ()
    # the UNet's deep features from the request's last whole step (``cache_interval`` > 1), for its conditional and
    # its unconditional row ((1, F, h, w), or None where that step did not run the row)
    deep_features: Array | None = None
    unconditional_deep_features: Array | None = None
    # a masked request's blending: the init image's latents x_0 (times latent_scale_factor) and the unit noise its
    # x_T was drawn from, both (1, C, h, w), and the mask at the latents' size (1, 1, h, w), 1 = repaint
    original_latents: Array | None = None
    original_noise: Array | None = None
    latent_mask: Array | None = None
    # an inpainting model's (``EngineInfo.inpainting``) conditioning, (1, C + 1, h, w): the mask at the latents' size
    # and the masked image's latents, which every UNet call takes after the latents
    unet_conditioning: Array | None = None

    @property
    def done(self) -> bool:
        return self.step_index == len(self.trajectory)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(C, h, w)``: states share a UNet call only when these agree."""
        return tuple(self.latents.shape[1:])


class Pipeline:
    """Text-to-image sampling with classifier-free guidance over ``engine``, each request with the sampler it
    names (``GenerationRequest.sampler``), from its init image and under its mask where it gives them. ``ddim`` None
    takes the model's own DDIM settings (``engine.info.sampler``: a Stable Diffusion import's scheduler_config.json).
    The first request with guidance below 1 logs ``guidance_below_one_note``'s line (a warning of this module's
    logger)."""

    def __init__(self, engine: Engine, ddim: DDIMConfig | None = None):
        self.engine = engine
        if ddim is None:
            ddim = DDIMConfig.from_dict(dict(getattr(engine.info, "sampler", {})))
        self.sampler = DDIMSampler(NoiseSchedule.from_dict(engine.info.schedule), ddim)
        self.defaults = SamplerDefaults.from_dict(dict(getattr(engine.info, "default_sampler", {})))
        # the other samplers, with diffusers' defaults but the model's timestep spacing and offset, if it names them
        self.sigma_samplers = sigma_samplers(self.sampler.schedule, self.defaults, ddim.set_alpha_to_one)
        self._timestep_sigmas = schedule_sigmas(self.sampler.schedule)  # what guidance_interval reads
        # the most steps DDIM can plan: T, or fewer when the "leading" spacing's offset would pass timestep T - 1
        count = self.sampler.schedule.num_train_timesteps
        self.max_steps = next((steps for steps in range(count, 0, -1) if self._can_plan(steps)), 0)
        self._said_guidance_below_one = False  # the line is said once, not once per request

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    @property
    def default_sampler(self) -> str:
        """The sampler of a request that names none: the model's ``default_sampler.name``, else ``DEFAULT_SAMPLER``."""
        return self.defaults.sampler

    @property
    def default_steps(self) -> int:
        """The steps of a request that names neither sampler nor steps (``SamplerDefaults.steps_for``)."""
        return self.defaults.sampler_steps

    @property
    def default_guidance_scale(self) -> float:
        """The guidance scale of a request that names none: the model's ``default_sampler.guidance_scale``, else
        ``DEFAULT_GUIDANCE_SCALE``."""
        scale = self.defaults.guidance_scale
        return DEFAULT_GUIDANCE_SCALE if scale is None else scale

    def default_steps_for(self, sampler: str) -> int:
        """The steps of a request that names ``sampler`` and no steps (``SamplerDefaults.steps_for``)."""
        return self.defaults.steps_for(sampler)

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` with its sampler, steps and guidance filled in where it names none (``default_sampler``,
        ``default_steps``): what it is sampled with, and what a record of it should say."""
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"request is a {type(request).__name__}; expected a GenerationRequest")
        defaults = self.defaults
        filled = {
            "sampler": self.default_sampler if request.sampler is None else request.sampler,
            "guidance_scale": self.default_guidance_scale if request.guidance_scale is None else request.guidance_scale,
            "guidance_interval": (defaults.guidance_interval if request.guidance_interval is None
                                  else request.guidance_interval),
            "cache_interval": (defaults.cache_interval or 1) if request.cache_interval is None
            else request.cache_interval,
            "cache_schedule": (defaults.cache_schedule or "uniform") if request.cache_schedule is None
            else request.cache_schedule,
        }
        filled["steps"] = defaults.steps_for(filled["sampler"]) if request.steps is None else request.steps
        if request.init_image is not None and request.strength is None:
            filled["strength"] = DEFAULT_STRENGTH if request.mask is None else DEFAULT_INPAINT_STRENGTH
        if all(getattr(request, name) == value for name, value in filled.items()):
            return request
        return dataclasses.replace(request, **filled)

    def validate(self, request: GenerationRequest) -> None:
        """``RequestError`` naming the first field of ``request`` that this engine and sampler cannot serve (its
        sampler and steps as ``resolve`` fills them in)."""
        named_sampler = isinstance(request, GenerationRequest) and request.sampler is not None
        request = self.resolve(request)
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise RequestError(f"prompt is {request.prompt!r}; expected a non-empty string", "prompt")
        if not isinstance(request.negative_prompt, str):
            raise RequestError(f"negative_prompt is {request.negative_prompt!r}; expected a string ('' for none)",
                               "negative_prompt")
        check_text("prompt", request.prompt)
        check_text("negative_prompt", request.negative_prompt)
        if not _is_integer(request.seed) or not 0 <= request.seed < MAX_SEED:
            raise RequestError(f"seed is {request.seed!r}; expected an integer from 0 to 2**63 - 1", "seed")
        if not isinstance(request.sampler, str) or request.sampler not in SAMPLER_NAMES:
            raise RequestError(f"sampler is {request.sampler!r}; expected one of {', '.join(SAMPLER_NAMES)}",
                               "sampler")
        if not _is_integer(request.steps) or not 1 <= request.steps <= self.max_steps:
            raise RequestError(f"steps is {request.steps!r}; expected an integer from 1 to {self.max_steps}", "steps")
        if request.sampler != "ddim":
            try:
                self._trajectory(request)
            except ValueError as error:
                raise RequestError(f"steps is {request.steps}; the {request.sampler} sampler cannot take them: "
                                   f"{error}", "steps") from None
        elif not self._can_plan(int(request.steps)):  # a large steps_offset leaves gaps below max_steps
            config, last = self.sampler.config, self.sampler.schedule.num_train_timesteps - 1
            raise RequestError(f"steps is {request.steps}; the {config.timestep_spacing!r} spacing with steps_offset "
                               f"{config.steps_offset} would start past timestep {last}", "steps")
        if not is_guidance_scale(request.guidance_scale):
            raise RequestError(f"guidance_scale is {request.guidance_scale!r}; expected a number from 0 to "
                               f"{MAX_GUIDANCE_SCALE:g}", "guidance_scale")
        interval = request.guidance_interval
        if interval is not None and not is_guidance_interval(interval):
            raise RequestError(f"guidance_interval is {interval!r}; expected two noise levels (low, high) with "
                               f"0 <= low < high, or none", "guidance_interval")
        if not is_cache_interval(request.cache_interval):
            raise RequestError(f"cache_interval is {request.cache_interval!r}; expected an integer from 1 to "
                               f"{MAX_CACHE_INTERVAL} (1: the whole UNet at every step)", "cache_interval")
        if request.cache_schedule not in CACHE_SCHEDULES:
            raise RequestError(f"cache_schedule is {request.cache_schedule!r}; expected one of "
                               f"{', '.join(CACHE_SCHEDULES)}", "cache_schedule")
        if request.cache_interval > 1 and not getattr(self.engine, "deep_cache", False):
            raise RequestError(f"cache_interval is {request.cache_interval}; the {self.info.name} engine cannot cache "
                               f"the UNet's features across steps ({deep_cache_missing(self.engine)}); expected 1",
                               "cache_interval")
        if not _is_number(request.eta) or not 0 <= request.eta <= 1:
            raise RequestError(f"eta is {request.eta!r}; expected a number from 0 to 1", "eta")
        if request.eta != 0 and request.sampler not in ETA_SAMPLERS:
            whose = "" if named_sampler else (f", this model's default (name the {' or '.join(ETA_SAMPLERS)} sampler "
                                              f"to use eta)")
            raise RequestError(f"eta is {request.eta!r}; expected 0 for the {request.sampler} sampler{whose} "
                               f"(eta applies to {' and '.join(ETA_SAMPLERS)} only)", "eta")
        info = self.info
        for name in ("height", "width"):
            size = getattr(request, name)
            if size is None:
                continue
            if (not _is_integer(size) or size % info.image_size_multiple
                    or not info.min_image_size <= size <= info.max_image_size):
                raise RequestError(
                    f"{name} is {size!r}; expected a multiple of {info.image_size_multiple} from "
                    f"{info.min_image_size} to {info.max_image_size} (or none for the model's {info.image_size})",
                    name)
        self._validate_edit(request)
        check_request_adapters(request.lora, getattr(self.engine, "adapters", None), info.name,
                               getattr(self.engine, "adapters_missing", None),
                               getattr(self.engine, "adapter_slot_rank", None))

    def _validate_edit(self, request: GenerationRequest) -> None:
        """``RequestError`` naming the first of ``init_image``, ``height``/``width``, ``strength`` and ``mask`` that
        does not fit (``request`` as ``resolve`` fills it in)."""
        image, mask, strength = request.init_image, request.mask, request.strength
        missing = [name for name in ("init_image", "mask") if getattr(request, name) is None]
        if getattr(self.info, "inpainting", False) and missing:
            raise RequestError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing; this is an "
                               f"inpainting model, which repaints the masked part of an image: expected an init_image "
                               f"and a mask", missing[0])
        if image is None:
            if mask is not None:
                raise RequestError("mask is given without an init_image; expected an init_image for it to mask",
                                   "mask")
            if strength is not None:
                raise RequestError(f"strength is {strength!r} without an init_image; expected none (strength applies "
                                   f"to image-to-image only)", "strength")
            return
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise RequestError(f"init_image is {_describe(image)}; expected an (H, W, 3) uint8 RGB array",
                               "init_image")
        info = self.info
        height, width = image.shape[:2]
        if any(side % info.image_size_multiple or not info.min_image_size <= side <= info.max_image_size
               for side in (height, width)):
            raise RequestError(f"init_image is {width}x{height} pixels; expected sides that are multiples of "
                               f"{info.image_size_multiple} from {info.min_image_size} to {info.max_image_size}",
                               "init_image")
        for name, side in (("height", height), ("width", width)):
            given = getattr(request, name)
            if given is not None and given != side:
                raise RequestError(f"{name} is {given!r} but the init_image is {width}x{height} pixels; expected "
                                   f"none or {side}", name)
        if not _is_number(strength) or not 0 <= strength <= 1:
            raise RequestError(f"strength is {strength!r}; expected a number from 0 to 1", "strength")
        steps = int(request.steps)
        if strength > 0 and int(steps * float(strength)) == 0:  # no step would run: the reconstruction, silently
            least = math.ceil(1000 / steps) / 1000
            raise RequestError(f"strength is {strength!r} with {steps} steps, which runs none of them (the last "
                               f"int(steps x strength) run); expected a strength of at least {least:g} for "
                               f"{steps} steps, more steps, or strength 0 for the init image's reconstruction",
                               "strength")
        if mask is None:
            return
        if not isinstance(mask, np.ndarray) or mask.dtype not in (np.uint8, np.bool_) or mask.ndim != 2:
            raise RequestError(f"mask is {_describe(mask)}; expected an (H, W) uint8 or bool array (white or True: "
                               f"repaint)", "mask")
        if mask.shape != (height, width):
            raise RequestError(f"mask is {mask.shape[1]}x{mask.shape[0]} pixels; expected the init_image's size, "
                               f"{width}x{height}", "mask")

    def _trajectory(self, request: GenerationRequest,
                    start: int = 0) -> DDIMTrajectory | SigmaTrajectory | PLMSTrajectory:
        """The walk ``request``'s sampler plans for its steps, begun at step ``start``: one entry per UNet call."""
        if request.sampler == "ddim":
            return self.sampler.trajectory_from(int(request.steps), start)
        return self.sigma_samplers[request.sampler].trajectory_from(int(request.steps), start)

    @staticmethod
    def _first_step(request: GenerationRequest) -> int:
        """The step an image-to-image request begins at, as diffusers' img2img ``get_timesteps``: of N steps, the
        last ``min(int(N * strength), N)`` run (0 for text to image)."""
        if request.init_image is None:
            return 0
        steps = int(request.steps)
        return steps - min(int(steps * float(request.strength)), steps)

    def _noised(self, request: GenerationRequest, trajectory: Any, index: int, original: Array,
                noise: Array) -> Array:
        """Latents ``original`` noised with unit ``noise`` to step ``index`` of ``trajectory`` (its end: x_0 itself),
        in the latents of ``request``'s sampler, as its ``noise_scales`` (diffusers' ``add_noise``) says."""
        sampler = self.sampler if request.sampler == "ddim" else self.sigma_samplers[request.sampler]
        signal, scale = sampler.noise_scales(trajectory, index)
        return original * signal + noise * scale

    def _blended(self, state: SamplingState, latents: Array) -> Array:
        """``latents``, ``state``'s after its step; for a masked request, outside the mask the init image's latents
        noised to the next step (x_0 after the last), as diffusers' inpainting pipeline blends for a 4-channel UNet."""
        if state.latent_mask is None:
            return latents
        mask = state.latent_mask
        original = self._noised(state.request, state.trajectory, state.step_index + 1, state.original_latents,
                                state.original_noise)
        return (1 - mask) * original + mask * latents

    def _encode_image(self, image: np.ndarray, keep: np.ndarray | None = None) -> Array:
        """An ``(H, W, 3) uint8`` image -> its latents times ``latent_scale_factor``, ``(1, C, h, w)`` on the engine
        (pixels to [-1, 1] as diffusers' image processor: x / 255 * 2 - 1 in float32); with ``keep``, ``(H, W)``
        bool, the pixels it does not keep are 0 (mid-grey) before encoding."""
        pixels = image.astype(np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)
        if keep is not None:
            pixels = pixels * keep[:, :, None].astype(np.float32)
        pixels = np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])
        return self.engine.encode_images(self.engine.to_array(pixels)) * self.info.latent_scale_factor

    def _inpainting_conditioning(self, request: GenerationRequest, like: Array) -> Array:
        """What an inpainting UNet takes after the latents, ``(1, C + 1, h, w)`` on the engine: the mask at the
        latents' size (1 = repaint; torch's nearest, as diffusers) and the latents of the init image with the mask's
        pixels blanked (diffusers' ``masked_image = image * (mask < 0.5)``, in [-1, 1]), times latent_scale_factor."""
        factor = self.info.latent_factor
        repaint = _repaint_pixels(request.mask)
        latent_mask = self.engine.to_array(repaint[::factor, ::factor][None, None].astype(np.float32), like)
        masked_image = self._encode_image(request.init_image, keep=~repaint)
        return _join_channels([latent_mask, masked_image])

    def _can_plan(self, steps: int) -> bool:
        try:
            self.sampler.trajectory(steps)
        except ValueError:
            return False
        return True

    def _say_guidance_below_one(self, requests: Sequence[GenerationRequest]) -> None:
        if self._said_guidance_below_one:
            return
        for request in requests:
            note = guidance_below_one_note(float(request.guidance_scale))
            if note:
                self._said_guidance_below_one = True
                log.warning(note)
                return

    def image_shape(self, request: GenerationRequest) -> tuple[int, int]:
        """``(height, width)`` in pixels of the image ``request`` makes: its init image's, if it has one."""
        if request.init_image is not None:
            return (int(request.init_image.shape[0]), int(request.init_image.shape[1]))
        size = self.info.image_size
        return (int(request.height or size), int(request.width or size))

    def start(self, requests: Sequence[GenerationRequest]) -> list[SamplingState]:
        """Validated requests -> states at step 0: prompts encoded (each distinct text once), x_T drawn from
        each request's seed and scaled as its sampler starts, its trajectory planned. An image-to-image request's
        trajectory begins part-way, at the step its strength names, and its x_T is its init image's latents
        (encoded alone) noised to that step with the seed's noise, as its sampler's ``noise_scales`` says. Each state
        holds its request as ``resolve`` fills it in."""
        for request in requests:
            self.validate(request)
        requests = [self.resolve(request) for request in requests]
        if not requests:
            return []
        self._say_guidance_below_one(requests)
        texts = list(dict.fromkeys([(r.prompt, r.lora) for r in requests] + [(r.negative_prompt, r.lora)
                                                                              for r in requests]))
        context, context_mask = self.engine.encode_text(
            [text for text, _ in texts], *([[lora for _, lora in texts]] if any(r.lora for r in requests) else []))
        row = {text: index for index, text in enumerate(texts)}
        factor = self.info.latent_factor
        inpainting = getattr(self.info, "inpainting", False)
        states = []
        for request in requests:
            height, width = self.image_shape(request)
            shape = (self.info.latent_channels, height // factor, width // factor)
            noise = initial_noise([request.seed], shape)
            first = self._first_step(request)
            trajectory = self._trajectory(request, first)
            unit_noise = self.engine.to_array(noise)
            latents = unit_noise
            if request.sampler != "ddim" and first == 0:
                latents = self.engine.to_array(
                    noise * np.float32(self.sigma_samplers[request.sampler].initial_noise_scale(trajectory)))
            edit: dict[str, Array] = {}
            blends = request.mask is not None and not inpainting  # an inpainting UNet sees the mask instead
            if request.init_image is not None and (first > 0 or blends):
                original = self._encode_image(request.init_image)
                if first > 0:  # else strength 1: pure noise, as text to image (and diffusers' inpainting pipeline)
                    latents = self._noised(request, trajectory, 0, original, unit_noise)
                if blends:
                    latent_mask = _repaint_pixels(request.mask)[::factor, ::factor]  # torch's nearest, as diffusers
                    edit = dict(original_latents=original, original_noise=unit_noise, latent_mask=self.engine.to_array(
                        latent_mask[None, None].astype(np.float32), latents))
            if inpainting:  # validate saw to the init image and the mask
                edit["unet_conditioning"] = self._inpainting_conditioning(request, latents)
            positive, negative = row[(request.prompt, request.lora)], row[(request.negative_prompt, request.lora)]
            states.append(SamplingState(
                request=request, trajectory=trajectory, step_index=0, latents=latents,
                context=context[positive:positive + 1], context_mask=context_mask[positive:positive + 1],
                negative_context=context[negative:negative + 1],
                negative_context_mask=context_mask[negative:negative + 1], **edit,
            ))
        return states

    def advance(self, states: Sequence[SamplingState]) -> list[SamplingState]:
        """Each state one step of its sampler on, all of them in ONE UNet call of
        ``[unconditional rows; conditional rows]`` (a row with guidance_scale 1 needs no unconditional row).
        States must be unfinished and share a latent shape; they may be at any step of any trajectory of any
        sampler. Returns the new states, in order."""
        assert states and not any(state.done for state in states), "advance needs unfinished states"
        shape = states[0].latent_shape
        assert all(state.latent_shape == shape for state in states), [state.latent_shape for state in states]
        # engines take integer timesteps: Euler's fractional "linspace" ones go to the nearest
        timesteps = np.array([np.rint(s.trajectory.timesteps[s.step_index]) for s in states], dtype=np.int64)
        latents = concatenate([state.latents for state in states])
        input_scales = np.ones(len(states), dtype=np.float64)
        for row, state in enumerate(states):
            if state.request.sampler != "ddim":
                sampler = self.sigma_samplers[state.request.sampler]
                input_scales[row] = sampler.input_scales([state.trajectory], [state.step_index])[0]
        unet_latents = latents
        if (input_scales != 1).any():
            unet_latents = latents / self.engine.to_array(input_scales.reshape(-1, 1, 1, 1), latents)
        if states[0].unet_conditioning is not None:  # an inpainting model: [latents, mask, masked image latents]
            unet_latents = _join_channels([unet_latents, concatenate([s.unet_conditioning for s in states])])

        scales = np.array(self._guidance_scales(states, timesteps), dtype=np.float64)
        shallow = np.array([self._takes_shallow_step(state, scale) for state, scale in zip(states, scales)])
        features = [(s.deep_features, s.unconditional_deep_features) for s in states]
        parts = [rows for rows in (np.flatnonzero(~shallow), np.flatnonzero(shallow)) if len(rows)]
        predictions = [self._unet_part(states, rows, bool(shallow[rows[0]]), unet_latents, timesteps, scales, features)
                       for rows in parts]
        prediction = predictions[0]
        if len(parts) == 2:  # whole and shallow rows: back in the states' order
            prediction = take_rows(concatenate(predictions), np.argsort(np.concatenate(parts)))

        new_states: list[Any] = [None] * len(states)
        for name in dict.fromkeys(state.request.sampler for state in states):
            rows = [row for row, state in enumerate(states) if state.request.sampler == name]
            group = [states[row] for row in rows]
            if len(rows) == len(states):  # one sampler for the whole batch: no copies
                group_prediction, group_latents = prediction, latents
            else:
                group_prediction = concatenate([prediction[row:row + 1] for row in rows])
                group_latents = concatenate([latents[row:row + 1] for row in rows])
            step = self._ddim_step if name == "ddim" else self._sigma_step
            stepped, history = step(group, group_prediction, group_latents, shape)
            for index, (row, state) in enumerate(zip(rows, group)):
                new_states[row] = dataclasses.replace(
                    state, step_index=state.step_index + 1, latents=self._blended(state, stepped[index:index + 1]),
                    history=tuple(array[index:index + 1] for array in history),
                    deep_features=features[row][0], unconditional_deep_features=features[row][1])
        return new_states

    def _takes_shallow_step(self, state: SamplingState, guidance_scale: float) -> bool:
        """Whether ``state``'s next UNet call runs the shallow part only: its request caches features, this call is
        not one of its whole steps, and features are kept for every row it runs (a row guided now but not at the
        last whole step has no unconditional features: the call then runs whole)."""
        interval = int(state.request.cache_interval)
        if interval == 1 or state.deep_features is None:
            return False
        if state.step_index in whole_steps(len(state.trajectory), interval, state.request.cache_schedule):
            return False
        return guidance_scale == 1.0 or state.unconditional_deep_features is not None

    def _unet_part(self, states: Sequence[SamplingState], rows: np.ndarray, shallow: bool, unet_latents: Array,
                   timesteps: np.ndarray, scales: np.ndarray, features: list) -> Array:
        """The guided prediction of ``states[rows]`` from one UNet call: whole (keeping each caching row's deep
        features in ``features[row]``) or, with ``shallow``, the shallow part on the features they keep."""
        part = [states[row] for row in rows]
        everything = len(rows) == len(states)
        guided = GuidedBatch.plan(scales[rows], len(rows))
        context = guided.stack(concatenate([s.context for s in part]), concatenate([s.negative_context for s in part]))
        context_mask = guided.stack(concatenate([s.context_mask for s in part]),
                                    concatenate([s.negative_context_mask for s in part]))
        latents = unet_latents if everything else concatenate([unet_latents[row:row + 1] for row in rows])
        inputs = (guided.stack(latents), guided.stack(timesteps[rows]), context, context_mask)
        # each UNet row's adapters (both halves of a guided request: fused weights would serve both)
        lora = {"adapters": [part[row].request.lora for row in guided.stack(np.arange(len(part)))]
                } if any(s.request.lora for s in part) else {}
        if shallow:
            cached = concatenate([s.deep_features for s in part])
            unconditional = concatenate([s.unconditional_deep_features if s.unconditional_deep_features is not None
                                         else s.deep_features for s in part])
            return guided.combine(self.engine.unet_shallow(*inputs, guided.stack(cached, unconditional), **lora),
                                  self.engine.to_array)
        if all(int(s.request.cache_interval) == 1 for s in part):
            return guided.combine(self.engine.unet(*inputs, **lora), self.engine.to_array)
        model_output, deep = self.engine.unet_with_deep_features(*inputs, **lora)
        first_conditional = len(guided.unconditional_rows)
        unconditional_at = {int(row): index for index, row in enumerate(guided.unconditional_rows)}
        for index, (row, state) in enumerate(zip(rows, part)):
            if int(state.request.cache_interval) == 1:
                continue
            conditional = deep[first_conditional + index:first_conditional + index + 1]
            at = unconditional_at.get(index)
            features[row] = (conditional, None if at is None else deep[at:at + 1])
        return guided.combine(model_output, self.engine.to_array)

    def _guidance_scales(self, states: Sequence[SamplingState], timesteps: np.ndarray) -> list[float]:
        """Each row's guidance scale at this call: its request's, or 1 (the conditional branch alone) where the
        noise level of the timestep the UNet sees lies outside the request's ``guidance_interval``."""
        sigmas = self._timestep_sigmas[np.clip(timesteps, 0, len(self._timestep_sigmas) - 1)]
        scales = []
        for state, sigma in zip(states, sigmas):
            interval = state.request.guidance_interval
            inside = interval is None or interval[0] < sigma <= interval[1]
            scales.append(float(state.request.guidance_scale) if inside else 1.0)
        return scales

    def _ddim_step(self, states: Sequence[SamplingState], prediction: Array, latents: Array,
                   shape: tuple[int, ...]) -> tuple[Array, tuple[Array, ...]]:
        """One DDIM step of ``states`` (their rows of the guided prediction and latents): ``(x_prev, ())``."""
        timesteps = np.array([s.trajectory.timesteps[s.step_index] for s in states], dtype=np.int64)
        prev_timesteps = np.array([s.trajectory.prev_timesteps[s.step_index] for s in states], dtype=np.int64)
        eta = np.array([float(state.request.eta) for state in states], dtype=np.float64)
        noise = None
        if eta.max() > 0:
            seeds = [int(state.request.seed) for state in states]
            step_indices = [state.step_index for state in states]
            noise = self.engine.to_array(step_noise(seeds, step_indices, shape), latents)
        prev_sample, _ = self.sampler.step(prediction, timesteps, prev_timesteps, latents, eta, noise,
                                           to_array=self.engine.to_array)
        return prev_sample, ()

    def _sigma_step(self, states: Sequence[SamplingState], prediction: Array, latents: Array,
                    shape: tuple[int, ...]) -> tuple[Array, tuple[Array, ...]]:
        """One step of ``states``, all of one sampler other than DDIM: ``(x_prev, history)``."""
        sampler = self.sigma_samplers[states[0].request.sampler]
        step_indices = [state.step_index for state in states]
        history: tuple[Array, ...] = ()
        if any(state.history for state in states):
            # rows at step 0 have no history yet; the sampler gives the latents it is handed for them weight 0
            history = tuple(concatenate([state.history[slot] if state.history else state.latents for state in states])
                            for slot in range(sampler.history_size))
        noise = None
        if sampler.stochastic:
            seeds = [int(state.request.seed) for state in states]
            noise = self.engine.to_array(step_noise(seeds, step_indices, shape), latents)
        eta = {"eta": [float(state.request.eta) for state in states]} if sampler.takes_eta else {}
        return sampler.step(prediction, [s.trajectory for s in states], step_indices, latents, history, noise,
                            to_array=self.engine.to_array, **eta)

    def decode(self, states: Sequence[SamplingState]) -> list[np.ndarray]:
        """Finished states of one latent shape -> images, each ``(H, W, 3) uint8``:
        latents / latent_scale_factor, decoded, then round(clip((x + 1) * 127.5, 0, 255)); a masked request's
        image then takes its init image's pixels, exactly, wherever the mask does not repaint. ``RequestError``
        naming the first request whose decoded image is not all finite (its latents overflowed), rather than a
        black image."""
        assert states and all(state.done for state in states), "decode needs finished states"
        latents = concatenate([state.latents for state in states]) / self.info.latent_scale_factor
        images = self.engine.to_host(self.engine.decode(latents)).astype(np.float32)
        for state, finite in zip(states, np.isfinite(images).reshape(len(states), -1).all(axis=1)):
            if not finite:
                raise _not_finite_error(state.request)
        pixels = np.round(np.clip((images + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8)
        decoded = [np.ascontiguousarray(image.transpose(1, 2, 0)) for image in pixels]
        for state, image in zip(states, decoded):
            if state.request.mask is not None:
                kept = ~_repaint_pixels(state.request.mask)
                image[kept] = state.request.init_image[kept]
        return decoded

    def generate(self, requests: Sequence[GenerationRequest], progress: bool = False,
                 batch_size: int | None = None) -> list[np.ndarray]:
        """One ``(H, W, 3) uint8`` image per request, in order. Requests of one size are sampled together, at
        most ``batch_size`` at a time (default: what the engine's UNet batch holds with guidance); each request
        leaves its batch when its own steps are done. ``progress`` shows a bar over UNet calls on stderr (a
        request's steps make as many calls as diffusers makes: N + 1 for PLMS's N > 1).
        Raises ``RequestError`` before any work if a request (or ``batch_size``) is invalid, and after sampling if
        an image is not finite (``decode``)."""
        requests = list(requests)
        for request in requests:
            self.validate(request)
        requests = [self.resolve(request) for request in requests]
        most = self.info.max_images
        batch_size = most if batch_size is None else batch_size
        if not _is_integer(batch_size) or not 1 <= batch_size <= most:
            raise RequestError(f"batch_size is {batch_size!r}; expected an integer from 1 to {most}", "batch_size")

        by_shape: dict[tuple[int, int], list[int]] = {}
        for index, request in enumerate(requests):
            by_shape.setdefault(self.image_shape(request), []).append(index)
        batches = [indices[start:start + batch_size]
                   for indices in by_shape.values() for start in range(0, len(indices), batch_size)]
        total = sum(max(len(self._trajectory(requests[i], self._first_step(requests[i]))) for i in batch)
                    for batch in batches)
        images: list[Any] = [None] * len(requests)
        with tqdm(total=total, desc="sampling", unit="step", disable=not progress, dynamic_ncols=True) as bar:
            for batch in batches:
                states = self.start([requests[i] for i in batch])
                while not all(state.done for state in states):
                    active = [k for k, state in enumerate(states) if not state.done]
                    for k, state in zip(active, self.advance([states[k] for k in active])):
                        states[k] = state
                    bar.update(1)
                for index, image in zip(batch, self.decode(states)):
                    images[index] = image
        return images


def check_text(name: str, text: str) -> None:
    """``RequestError`` naming ``name`` unless string ``text`` is valid Unicode: no lone surrogate, as Python
    decodes bytes that are not UTF-8 in argv (``\\udcff`` for the byte 0xff) or a JSON escape can spell."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{name} is {_shown_text(text)}, which is not valid UTF-8 text; expected UTF-8 text",
                           name) from None


def _shown_text(text: str) -> str:
    """``text`` quoted as ``repr`` does, a lone surrogate from an undecodable byte (U+DC80 to U+DCFF) shown as
    that byte (``\\xff``), another as its code point (``\\ud800``)."""
    shown = "".join(f"\\x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF
                    else "\\'" if char == "'" else repr(char)[1:-1] for char in text)
    return f"'{shown}'"


def _not_finite_error(request: GenerationRequest) -> RequestError:
    """The error for ``request``'s image decoding to NaN or infinity, naming what likely made its latents
    overflow: its guidance scale, or an adapter's scale."""
    cause, field = f"guidance_scale {float(request.guidance_scale):g} is", "guidance_scale"
    if request.lora:
        scales = ", ".join(f"{name}:{float(scale):g}" for name, scale in request.lora)
        cause, field = f"guidance_scale {float(request.guidance_scale):g} or an adapter's scale ({scales}) is", "lora"
    return RequestError(f"prompt {_shown_text(request.prompt)} with seed {request.seed} decoded to pixels that are "
                        f"not finite (NaN or infinity), likely because {cause} too large; expected lower scales",
                        field)


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value))


def _join_channels(arrays: list[Any]) -> Any:
    """Arrays of one kind (numpy or torch, one device), ``(B, C_i, h, w)``, joined along their channels."""
    module = array_module(arrays[0])
    return np.concatenate(arrays, axis=1) if module is np else module.cat(arrays, dim=1)


def _repaint_pixels(mask: np.ndarray) -> np.ndarray:
    """``(H, W) bool``: where a request's mask repaints (True, or ``REPAINT_THRESHOLD`` and up)."""
    return mask if mask.dtype == np.bool_ else mask >= REPAINT_THRESHOLD


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return f"a {type(value).__name__}"
