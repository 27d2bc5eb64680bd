"""``ldm-train lora``: a LoRA adapter (Hu et al. 2022) for a trained model's UNet, written as one .safetensors file
in the diffusers / PEFT layout that ``ldm-import --lora`` fuses and ``ldm_runtime.adapters`` serves per request.

The base model stays frozen. Each adapted linear layer (by default the attention projections, as diffusers' LoRA
training scripts adapt: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``) gains ``alpha / rank * up(down(x))`` with
``down`` (rank, in) initialised as PEFT does (Kaiming-uniform) and ``up`` (out, rank) at zero, so that training
starts from the base model exactly. Only ``down`` and ``up`` train, on the UNet's own objective (ε or v, with
caption dropout and min-SNR weighting as ``ldm-train unet`` has them), on the frozen autoencoder's latents and the
frozen text encoder's context, each computed once.

``--caption-replace OLD=NEW`` rewrites every caption before it is encoded (whole words, in order): that is how an
adapter learns a word the base model never saw, e.g. ``--caption-replace "green background=zorp background"``
teaches "zorp" for a green background while the other captions keep the rest of what the model knows.

The file's keys are ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``; its metadata holds PEFT's LoraConfig
(``lora_adapter_metadata``: rank and alpha), the sha256 of the base model's UNet weights and the settings it was
trained with. It is written whole or not at all, every ``--checkpoint-every`` steps and at the end: an interrupted
run leaves the last one intact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm_runtime.checkpoint import UNET_WEIGHTS, load_checkpoint
from ldm_runtime.config import ConfigError
from ldm_runtime.files import sha256_file
from ldm_train.checkpoint import save_tensors_atomic
from ldm_train.data import build_dataset
from ldm_train.diffusion import ForwardProcess
from ldm_train.progress import TrainingProgress
from ldm_train.run import check_finite, check_finite_flags, check_seed, check_whole, end_process, start_process
from ldm_train.train_unet import Denoiser, EncodedData, _conditioning, encode_dataset, training_batch

STAGE = "lora"
DEFAULT_TARGETS = "to_q,to_k,to_v,to_out.0"
MAX_RANK = 256  # ldm_runtime.adapters serves ranks up to its own limit; past a few dozen a LoRA is no longer small
METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True)
class LoraSettings:
    """``ldm-train lora``'s flags; the CLI reads its defaults from here."""

    base: str
    out: str
    data: str = "shapes"
    rank: int = 4
    alpha: float | None = None  # None: the rank (a scale of 1)
    targets: str = DEFAULT_TARGETS
    caption_replace: tuple[str, ...] = ()
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    cond_drop_prob: float = 0.1
    min_snr_gamma: float = 5.0
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 500
    skip_bad_images: bool = False

    def validate(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            check_whole(name, getattr(self, name), 1)
        check_whole("rank", self.rank, 1)
        if self.rank > MAX_RANK:
            raise ConfigError(f"--rank is {self.rank}; expected an integer from 1 to {MAX_RANK}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"--alpha is {self.alpha}; expected a finite number above 0")
        check_seed(self.seed)
        check_finite_flags(self, above_zero=("learning_rate", "grad_clip"),
                           at_least_zero=("weight_decay", "min_snr_gamma"))
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ConfigError(f"--cond-drop-prob is {self.cond_drop_prob}; expected a value in [0, 1)")
        if not Path(self.out).name.endswith(".safetensors"):
            raise ConfigError(f"--out is {self.out}; expected a path ending in .safetensors (the adapter file)")
        target_names(self.targets)
        caption_replacements(self.caption_replace)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["caption_replace"] = list(self.caption_replace)
        return values


def target_names(text: str) -> tuple[str, ...]:
    """``--targets``: comma-separated module name endings (``to_q``, ``ff.net.0.proj``...)."""
    names = tuple(part.strip() for part in text.split(","))
    if not all(re.fullmatch(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*", name) for name in names):
        raise ConfigError(f"--targets is {text!r}; expected module name endings separated by commas, such as "
                          f"{DEFAULT_TARGETS}")
    return names


def caption_replacements(pairs: tuple[str, ...]) -> list[tuple[re.Pattern[str], str]]:
    """``--caption-replace OLD=NEW`` pairs as (whole-word pattern of OLD, NEW), in the order given."""
    replacements = []
    for pair in pairs:
        old, equals, new = pair.partition("=")
        if not equals or not old.strip():
            raise ConfigError(f"--caption-replace is {pair!r}; expected OLD=NEW, such as 'green background=zorp "
                              f"background'")
        replacements.append((re.compile(rf"\b{re.escape(old.strip())}\b"), new.strip()))
    return replacements


class RecaptionedDataset:
    """``dataset`` with every caption rewritten by ``replacements``."""

    def __init__(self, dataset, replacements: list[tuple[re.Pattern[str], str]]):
        self.dataset = dataset
        self.replacements = replacements

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, caption = self.dataset[index]
        return image, rewrite_caption(caption, self.replacements)


def rewrite_caption(caption: str, replacements: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, new in replacements:
        caption = pattern.sub(new, caption)
    return caption


class LoraLinear(torch.nn.Module):
    """A frozen linear layer plus ``alpha / rank * up(down(x))``."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # PEFT's initialisation of lora_A
        torch.nn.init.zeros_(self.up.weight)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x)) * self.scaling


def add_lora(unet: torch.nn.Module, targets: tuple[str, ...], rank: int, alpha: float) -> dict[str, LoraLinear]:
    """Wrap every linear layer of ``unet`` whose name ends in one of ``targets`` (a whole dotted part); returns
    {module name: its wrapper}. ``ConfigError`` when none matches."""
    chosen = [name for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear)
              and any(name == target or name.endswith("." + target) for target in targets)]
    if not chosen:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in unet.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise ConfigError(f"--targets {','.join(targets)} names no linear layer of the UNet; expected endings of "
                          f"its linear layers' names, such as {', '.join(linear[:8])}")
    wrapped = {}
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        wrapped[name] = LoraLinear(getattr(parent, child), rank, alpha)
        setattr(parent, child, wrapped[name])
    return wrapped


def adapter_tensors(wrapped: dict[str, LoraLinear]) -> dict[str, torch.Tensor]:
    """The diffusers / PEFT keys of ``wrapped``'s factors."""
    tensors = {}
    for name, layer in wrapped.items():
        tensors[f"unet.{name}.lora_A.weight"] = layer.down.weight
        tensors[f"unet.{name}.lora_B.weight"] = layer.up.weight
    return tensors


def adapter_metadata(settings: LoraSettings, alpha: float, base_sha256: str, step: int) -> dict[str, str]:
    """The file's metadata: PEFT's LoraConfig as diffusers writes it, the base UNet's sha256, the settings."""
    return {METADATA_KEY: json.dumps({"unet.r": settings.rank, "unet.lora_alpha": alpha}),
            "ldm_base_unet_sha256": base_sha256, "ldm_train_lora": json.dumps({**settings.to_dict(), "step": step})}


def train_lora(settings: LoraSettings) -> Path:
    """Train the adapter ``settings`` describe; returns the file written."""
    settings.validate()
    replacements = caption_replacements(settings.caption_replace)
    process = start_process(settings.device)
    if process.world_size > 1:
        end_process(process)
        raise ConfigError("ldm-train lora runs in one process; expected it without torchrun")
    try:
        return _train(settings, replacements, process.device)
    finally:
        end_process(process)


def _train(settings: LoraSettings, replacements, device: torch.device) -> Path:
    networks = load_checkpoint(settings.base)
    config = networks.config
    base_sha256 = sha256_file(networks.folder / UNET_WEIGHTS)
    alpha = float(settings.alpha if settings.alpha is not None else settings.rank)
    unet, text_encoder, autoencoder = networks.unet, networks.text_encoder, networks.autoencoder
    for module in (unet, text_encoder, autoencoder):
        module.requires_grad_(False).eval().to(device)
    torch.manual_seed(settings.seed)
    wrapped = add_lora(unet, target_names(settings.targets), settings.rank, alpha)
    trainable = [parameter for layer in wrapped.values() for parameter in (layer.down.weight, layer.up.weight)]
    for parameter in trainable:
        parameter.requires_grad_(True)
    unet.to(device)

    dataset = build_dataset(settings.data, config.image_size, settings.seed, skip_bad=settings.skip_bad_images)
    data = _with_context(encode_dataset(RecaptionedDataset(dataset, replacements), autoencoder, text_encoder,
                                        device, settings.batch_size, True), text_encoder, device)
    denoiser = Denoiser(unet, text_encoder)
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    forward_process = ForwardProcess(config.schedule)
    scale = config.latent_scale_factor
    out = Path(settings.out)
    progress = TrainingProgress(settings.steps, 0, STAGE, enabled=True)
    process = _SingleProcess()
    try:
        for step in range(settings.steps):
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
            _, latents, noise, timesteps, caption_ids = training_batch(
                data, step, settings.batch_size, process, settings.seed, generator, scale,
                config.schedule.num_train_timesteps, settings.cond_drop_prob)
            latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
            noisy = forward_process.add_noise(latents, noise, timesteps)
            target = forward_process.target(latents, noise, timesteps)
            prediction = denoiser(noisy, timesteps, **_conditioning(data, caption_ids, device))
            loss = forward_process.loss(prediction, target, timesteps, settings.min_snr_gamma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
            check_finite(step, out, loss=loss.detach(), gradient_norm=grad_norm)
            optimizer.step()
            done = step + 1
            progress.update(loss=float(loss.detach()))
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                save_tensors_atomic(out, adapter_tensors(wrapped), adapter_metadata(settings, alpha, base_sha256, done))
    finally:
        progress.close()
    return out


@dataclass(frozen=True)
class _SingleProcess:
    """``batch_indices``' view of a run in one process."""

    rank: int = 0
    world_size: int = 1


@torch.no_grad()
def _with_context(data: EncodedData, text_encoder, device: torch.device) -> EncodedData:
    """``data`` with every caption's context computed once (the text encoder is frozen here, even one the base
    model trained from scratch)."""
    if data.context is not None:
        return data
    parts = [text_encoder(data.input_ids[start:start + 64].to(device),
                          data.attention_mask[start:start + 64].to(device)).half().cpu()
             for start in range(0, len(data.input_ids), 64)]
    return dataclasses.replace(data, context=torch.cat(parts))
