"""What both training stages share: the settings, the process group, the data order, the log.

Exact resume rests on one rule: everything random in step ``s`` (which samples, which noise, which
timesteps, which prompts are dropped) is a pure function of (seed, s, rank). A resumed run recomputes
it instead of restoring generator states, so it replays the uninterrupted run step for step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ldm_runtime.checkpoint import TRAIN_STATE_JSON
from ldm_runtime.config import PREDICTION_TYPES, ConfigError
from ldm_runtime.noise import MAX_TRAIN_SEED
from ldm_runtime.staging import temporary_folder
from ldm_train.losses import AutoencoderLossConfig


class NonFiniteLossError(ConfigError):
    """Training diverged: a loss or gradient norm became NaN or infinite (too high a learning rate, say)."""


@dataclass(frozen=True)
class TrainSettings:
    """The flags both stages of ``ldm-train`` take. Each stage's settings (``AutoencoderSettings``,
    ``UNetSettings``) are one source of truth for its defaults: the CLI reads them from there, so the Python
    API trains as the command does."""

    out: str
    preset: str = "shapes"
    data: str = "shapes"
    steps: int = 2000
    batch_size: int = 32  # per process
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 on CUDA only)
    device: str = "auto"
    checkpoint_every: int = 500
    sample_every: int = 500
    log_every: int = 10
    skip_bad_images: bool = False
    channels: int | None = None  # overrides the base width (autoencoder base_channels / UNet model_channels)
    num_groups: int | None = None  # overrides the GroupNorm group count

    def validate(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "sample_every", "log_every"):
            check_whole(name, getattr(self, name), 1)
        for name in ("channels", "num_groups"):
            if getattr(self, name) is not None:
                check_whole(name, getattr(self, name), 1)
        check_seed(self.seed)
        check_finite_flags(self, above_zero=("learning_rate", "grad_clip"), at_least_zero=("weight_decay",))
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"--precision {self.precision!r} is not one of fp32, bf16, fp16")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AutoencoderSettings(TrainSettings):
    """``ldm-train autoencoder``: the shared flags, the autoencoder's overrides of the preset, and the loss
    weights (their defaults are ``AutoencoderLossConfig``'s)."""

    kind: str | None = None  # overrides the preset's autoencoder kind ("kl" / "vq")
    factor: int | None = None  # overrides the preset's downsampling factor
    latent_channels: int | None = None
    kl_weight: float = AutoencoderLossConfig.kl_weight
    perceptual_weight: float = AutoencoderLossConfig.perceptual_weight
    disc_weight: float = AutoencoderLossConfig.disc_weight
    disc_start: int = AutoencoderLossConfig.disc_start

    def validate(self) -> None:
        super().validate()
        for name in ("factor", "latent_channels"):
            if getattr(self, name) is not None:
                check_whole(name, getattr(self, name), 1)
        check_whole("disc_start", self.disc_start, 0)
        check_finite_flags(self, above_zero=(), at_least_zero=("kl_weight", "perceptual_weight", "disc_weight"))

    def loss_config(self) -> AutoencoderLossConfig:
        return AutoencoderLossConfig(kl_weight=self.kl_weight, perceptual_weight=self.perceptual_weight,
                                     disc_weight=self.disc_weight, disc_start=self.disc_start)


@dataclass(frozen=True)
class UNetSettings(TrainSettings):
    """``ldm-train unet``: the shared flags with the UNet's own batch and learning rate, the autoencoder it
    trains on, the text encoder, caption dropout and the EMA."""

    batch_size: int = 64  # per process
    learning_rate: float = 1e-4
    autoencoder: str | None = None
    text_encoder: str | None = None  # overrides the preset's text encoder path (folder or package)
    text_encoder_kind: str | None = None  # "pretrained" (frozen) or "scratch" (trained jointly)
    cond_drop_prob: float = 0.1
    ema_decay: float = 0.999
    min_snr_gamma: float = 0.0  # 0: every sample's loss weighs the same (plain MSE)
    prediction_type: str | None = None  # overrides the preset schedule's ("epsilon" / "v_prediction")
    lr_schedule: str = "constant"  # or "cosine": from the learning rate down to 0 at --steps
    warmup_steps: int = 0  # linear warm-up from 0 over this many steps, before the schedule
    task: str = "text"  # or "inpaint": the UNet also takes a mask and the masked image's latents
    init_unet: str | None = None  # a checkpoint dir whose UNet weights this one starts from

    def validate(self) -> None:
        super().validate()
        check_finite_flags(self, above_zero=(), at_least_zero=("min_snr_gamma",))
        check_whole("warmup_steps", self.warmup_steps, 0)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr-schedule {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"--prediction-type {self.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ConfigError(f"--cond-drop-prob is {self.cond_drop_prob}; expected a value in [0, 1)")
        if self.task not in UNET_TASKS:
            raise ConfigError(f"--task is {self.task!r}; expected one of {', '.join(UNET_TASKS)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema-decay is {self.ema_decay}; expected a value in [0, 1)")


LR_SCHEDULES = ("constant", "cosine")
UNET_TASKS = ("text", "inpaint")  # text to image; inpainting (the paper's and Stable Diffusion's 9-channel UNets)


def learning_rate_at(settings: UNetSettings, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based): a pure function of the settings and the step, so a
    resumed run follows the same curve. Linear warm-up over ``warmup_steps``, then constant or a cosine from
    the full rate down to 0 at ``steps``."""
    rate = settings.learning_rate
    if step < settings.warmup_steps:
        return rate * (step + 1) / settings.warmup_steps
    if settings.lr_schedule == "cosine":
        span = max(1, settings.steps - settings.warmup_steps)
        progress = min(1.0, (step - settings.warmup_steps) / span)
        rate *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return rate


def check_whole(name: str, value: Any, low: int) -> None:
    """``ConfigError`` naming flag ``--name`` unless ``value`` is an integer >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        expected = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ConfigError(f"--{name.replace('_', '-')} is {value!r}; expected {expected}")


def check_seed(value: Any) -> None:
    """``ConfigError`` naming ``--seed`` unless ``value`` is an integer a training run can seed from."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TRAIN_SEED:
        raise ConfigError(f"--seed is {value}; expected an integer from 0 to 2**32 - 1")


def check_finite_flags(settings: Any, above_zero: tuple[str, ...], at_least_zero: tuple[str, ...]) -> None:
    """``ConfigError`` naming the first of these number flags that is NaN, infinite or below its bound (None, a
    flag left to its default of "unset", passes)."""
    for names, bound in ((above_zero, "above 0"), (at_least_zero, ">= 0")):
        for name in names:
            value = getattr(settings, name)
            if value is None:
                continue
            if not math.isfinite(value) or value < 0 or (bound == "above 0" and value == 0):
                raise ConfigError(f"--{name.replace('_', '-')} is {value}; expected a finite number {bound}")


# Settings that may differ between a run and its resumption without changing what is computed.
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "sample_every", "log_every", "out", "device"}


@dataclass
class Process:
    """This process's place in a (possibly single-process) data-parallel run."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_process(device_flag: str) -> Process:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_flag == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device_flag)
        except RuntimeError:
            raise ConfigError(f"--device {device_flag!r} is not a device; expected auto, cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device_flag} asks for CUDA but this machine has no CUDA device")
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Process(rank=rank, world_size=world_size, device=device)


def end_process(process: Process) -> None:
    if process.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of all randomness in ``step`` on ``rank``: a pure function of the three."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) * 4099 + rank)
    return generator


def batch_indices(num_items: int, step: int, batch_size: int, process: Process, seed: int) -> torch.Tensor:
    """Indices of this rank's samples in ``step``: epoch-wise shuffles, each item once per epoch, no drop of ranks."""
    global_batch = batch_size * process.world_size
    if num_items < global_batch:
        fix = (f"lower --batch-size to {num_items // process.world_size} or less" if num_items >= process.world_size
               else f"run at most {num_items} process(es)")
        raise ConfigError(
            f"the data set has {num_items} items, fewer than one global batch of {global_batch} "
            f"(--batch-size {batch_size} x {process.world_size} processes); {fix}"
        )
    batches_per_epoch = num_items // global_batch
    epoch, position = divmod(step, batches_per_epoch)
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    chosen = order[position * global_batch:(position + 1) * global_batch]
    return chosen[process.rank::process.world_size]


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    return torch.autocast(device_type=device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


METRICS_JSONL = "metrics.jsonl"


class LiveFolder:
    """Where a run writes what it records as it goes (``metrics.jsonl``, ``samples/``): ``path``. That is ``out``,
    except in a run that replaces another run's checkpoint there (``--overwrite``): until its first save, which
    takes them into the new checkpoint (``save_checkpoint``'s ``logs``), they go to a locked folder beside ``out``
    (``ldm_runtime.staging``), so that ``out`` stays the old run's, whole, if this one fails or is stopped first.
    ``first``: no save of this run has happened and it did not resume (``save_checkpoint``'s ``first``). ``writer``:
    this process writes the checkpoints (a data-parallel job's rank 0). ``close()`` removes the folder beside
    ``out``."""

    def __init__(self, out: Path, resumed: bool, writer: bool = True):
        self.out = out
        self.path = out
        self.first = not resumed
        self._stack = contextlib.ExitStack()
        if writer and not resumed and (out / TRAIN_STATE_JSON).is_file():
            self.path = self._stack.enter_context(temporary_folder(out))

    def close(self) -> None:
        self._stack.close()

    @property
    def pending(self) -> Path | None:
        """The folder beside ``out`` whose files the next save takes in, or None."""
        return self.path if self.path != self.out else None

    def saved(self, log: MetricsLog | None) -> None:
        """A save took the files in: from now on ``log`` (if any) and everything else is written into ``out``."""
        self.first = False
        if self.pending is not None:
            self.path = self.out
            if log is not None:
                log.path = self.out / METRICS_JSONL
            self._stack.close()


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl``; on resume, drops records past the step."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.write_text("")
        self.started = time.perf_counter()

    def write(self, step: int, values: dict[str, float]) -> None:
        """One line of strict JSON: a value that is not a finite number is written as null (JSON has no NaN)."""
        record = {"step": step, "time_s": round(time.perf_counter() - self.started, 3),
                  **{name: _json_number(value) for name, value in values.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")


def _json_number(value: Any) -> Any:
    if isinstance(value, (float, torch.Tensor)) and not math.isfinite(float(value)):
        return None
    return float(value) if isinstance(value, torch.Tensor) else value


def check_finite(step: int, out: Path, **values: float | torch.Tensor) -> None:
    """``NonFiniteLossError`` naming the first of ``values`` (a loss, a gradient norm) that is NaN or infinite.
    Called before the optimiser step, so the weights and every checkpoint stay finite. In a data-parallel run
    pass values that every rank shares (all-reduced), so that all ranks stop together."""
    for name, value in values.items():
        number = float(value)
        if not math.isfinite(number):
            raise NonFiniteLossError(
                f"the {name.replace('_', ' ')} became {number} at step {step + 1}, so training stopped before the "
                f"optimiser step (the last checkpoint in {out} is intact); expected finite values: lower "
                f"--learning-rate or --grad-clip")


def check_resume_settings(saved: dict[str, Any], current: TrainSettings, folder: Path, step: int) -> None:
    """A resumed run must compute the same thing as the original: refuse changed settings, naming them, and
    ``--steps`` below the ``step`` the checkpoint has reached."""
    if current.steps < step:
        raise ConfigError(f"--steps {current.steps} is below step {step}, which the checkpoint in {folder} has "
                          f"reached; expected at least {step} to resume it")
    # a setting an older checkpoint does not record (added since) ran at its default
    defaults = {field.name: field.default for field in dataclasses.fields(current)}
    recorded = {key: saved.get(key, defaults.get(key)) for key in current.to_dict()}
    changed = sorted(
        key for key, value in current.to_dict().items()
        if key not in RESUMABLE_CHANGES and recorded[key] != value
    )
    if current.steps != recorded["steps"] and recorded.get("lr_schedule", "constant") != "constant":
        changed.append("steps")  # the schedule's length: the learning rate of every step would change
    if changed:
        details = ", ".join(f"{key}: {recorded[key]!r} -> {getattr(current, key)!r}" for key in changed)
        raise ConfigError(f"cannot resume from {folder} with changed settings ({details}); pass the original values")


def all_reduce_mean(value: torch.Tensor, process: Process) -> torch.Tensor:
    """Mean of a scalar over ranks, for logging only."""
    if process.world_size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / process.world_size
