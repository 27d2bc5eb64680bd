"""``ldm-train lcm``: latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Algorithm 1) of
a trained model into one that samples in 2-8 steps with the ``lcm`` sampler, guidance included.

The teacher is the base model's UNet, frozen; the student starts as a copy of it; the target network is an EMA of
the student (decay ``ema_decay``, 0.95 as in the paper). Each step draws a training latent x_0, a caption and one
of the 50 timesteps of the distillation grid, t_{n+k} (19, 39, ..., 999 for T = 1000), noises x_0 to it, and takes
one guided DDIM step of the teacher from t_{n+k} to t_n = t_{n+k} - T / 50 with the model's classifier-free
guidance at ``guidance_scale`` (the runtime's convention: uncond + w (cond - uncond)). The student's consistency
function at t_{n+k} and the target network's at t_n (on the teacher's x_{t_n}) are both

    f(x, t) = c_skip(t) x + c_out(t) x̂_0(x, t),
    c_skip = σ_d² / ((s t)² + σ_d²),  c_out = s t / sqrt((s t)² + σ_d²)

with σ_d = 0.5 and s = 10 (the boundary condition of ``ldm_runtime.schedulers.LCMSampler`` and diffusers'
``LCMScheduler``, so that sampler takes the distilled model as it is), and the student learns to match the target
under the pseudo-Huber loss sqrt(d² + c²) - c (``huber_c``; a large c is the squared error, halved and scaled).
The model folder holds a slower EMA of the student (``average_decay``), as consistency models are sampled with.
The guidance is distilled into the student: the model it writes is sampled with guidance 1, one UNet row per image
and step, which its model.json records as the default (``default_sampler``: lcm, ``sample_steps`` steps,
guidance 1).

The latents are the base autoencoder's posterior samples of the ``--data`` images and the captions their own,
encoded once as ``ldm-train unet`` does; the autoencoder and the text encoder are carried over unchanged. The
output is a complete model folder (every runtime tool, ``ldm-export`` included, takes it), written whole every
``checkpoint_every`` steps and at the end: an interrupted run leaves the last one intact, and ``--resume``
continues it exactly (the student, the averaged weights, the optimiser and the distillation's own networks are
in the checkpoint; every step's batch and noise are a function of the seed and the step).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm_runtime.checkpoint import (TEXT_ENCODER_DIR, TEXT_ENCODER_WEIGHTS, TRAIN_STATE_TENSORS, load_checkpoint,
                                    load_tensors, weight_files)
from ldm_runtime.config import ConfigError, ModelConfig, SamplerDefaults
from ldm_runtime.guidance import apply_guidance
from ldm_runtime.schedulers.lcm import LCMSampler
from ldm_runtime.schedulers.lcm import boundary_scalings as sampler_boundary_scalings
from ldm_train.checkpoint import (load_train_state, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint,
                                  select_prefixed)
from ldm_train.data import build_dataset
from ldm_train.diffusion import ForwardProcess
from ldm_train.progress import TrainingProgress
from ldm_train.run import (
    LR_SCHEDULES, METRICS_JSONL, LiveFolder, MetricsLog, check_finite, check_finite_flags, check_resume_settings,
    check_seed, check_whole, end_process, learning_rate_at, start_process,
)
from ldm_train.train_lora import _SingleProcess, _with_context
from ldm_train.train_unet import EncodedData, _conditioning, _update_ema, encode_dataset, training_batch

STAGE = "lcm"
TIMESTEP_SCALING = LCMSampler.timestep_scaling  # the boundary condition's, as the sampler has it
# the distillation grid's timesteps: the lcm sampler's original_inference_steps, which it takes its steps from
SOLVER_STEPS = LCMSampler.original_inference_steps


@dataclass(frozen=True)
class DistillationSettings:
    """The flags of a distillation from a base model (``ldm-train lcm``, ``guidance``, ``progressive``); the CLI reads
    their defaults from here."""

    base: str
    out: str
    data: str = "shapes:4000"
    guidance_scale: float = 5.0
    steps: int = 800
    batch_size: int = 32
    learning_rate: float = 5e-5
    lr_schedule: str = "cosine"
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    average_decay: float = 0.99
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 250
    skip_bad_images: bool = False

    def validate(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            check_whole(name, getattr(self, name), 1)
        check_whole("warmup_steps", self.warmup_steps, 0)
        check_seed(self.seed)
        check_finite_flags(self, above_zero=("learning_rate", "grad_clip"),
                           at_least_zero=("weight_decay", "guidance_scale"))
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr-schedule is {self.lr_schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
        self.check_decay("average_decay")

    def check_decay(self, name: str) -> None:
        if not 0.0 <= getattr(self, name) < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} is {getattr(self, name)}; expected a value in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ConsistencySettings(DistillationSettings):
    """``ldm-train lcm``'s flags: a distillation's and the consistency model's own."""

    sample_steps: int = 4
    ema_decay: float = 0.95
    huber_c: float = 1.0  # a c this large makes it the squared error (halved)

    def validate(self) -> None:
        super().validate()
        check_whole("sample_steps", self.sample_steps, 1)
        if self.sample_steps > SOLVER_STEPS:
            raise ConfigError(f"--sample-steps is {self.sample_steps}; expected an integer from 1 to {SOLVER_STEPS} "
                              f"(the lcm sampler takes its steps from the {SOLVER_STEPS} of distillation)")
        check_finite_flags(self, above_zero=("huber_c",), at_least_zero=())
        self.check_decay("ema_decay")


def boundary_scalings(timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency boundary condition at integer ``timesteps``, float64: the lcm sampler's
    (``ldm_runtime.schedulers.lcm.boundary_scalings``)."""
    skip, out = sampler_boundary_scalings(timesteps.cpu().numpy(), TIMESTEP_SCALING)
    return torch.from_numpy(skip).to(timesteps.device), torch.from_numpy(out).to(timesteps.device)


def denoised_and_noise(output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor,
                       prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet ``output``'s x̂_0 and ε̂ for ``sample`` at ᾱ ``alpha`` (per row, broadcast)."""
    signal, noise = alpha.sqrt(), (1.0 - alpha).sqrt()
    if prediction_type == "epsilon":
        return (sample - noise * output) / signal, output
    return signal * sample - noise * output, noise * sample + signal * output


def ddim_step(output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, alpha_previous: torch.Tensor,
              prediction_type: str) -> torch.Tensor:
    """The deterministic DDIM step (η = 0) of ``sample`` at ᾱ ``alpha`` with the UNet ``output`` to ᾱ
    ``alpha_previous``: the distillation's ODE solver."""
    denoised, predicted_noise = denoised_and_noise(output, sample, alpha, prediction_type)
    return alpha_previous.sqrt() * denoised + (1.0 - alpha_previous).sqrt() * predicted_noise


def consistency_function(output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor,
                         alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """f(x, t) = c_skip x + c_out x̂_0: what ``LCMSampler`` takes a model's output at ``timesteps`` to."""
    skip, out = (value.view(-1, 1, 1, 1).to(sample.dtype) for value in boundary_scalings(timesteps))
    alpha = alphas_cumprod[timesteps].view(-1, 1, 1, 1).to(sample.dtype)
    return skip * sample + out * denoised_and_noise(output, sample, alpha, prediction_type)[0]


def solver_grid(num_train_timesteps: int, solver_steps: int) -> torch.Tensor:
    """The distillation grid: T / N - 1, 2 T / N - 1, ..., T - 1 (LCMSampler's ``original_inference_steps``)."""
    return torch.arange(1, solver_steps + 1) * (num_train_timesteps // solver_steps) - 1


def train_lcm(settings: ConsistencySettings, resume: bool = False) -> Path:
    """Distil the model ``settings.base`` into ``settings.out`` (or continue the run there); returns the folder
    written."""
    return run_distillation(settings, STAGE, ConsistencyDistillation, resume)


class Distillation:
    """One distillation of a base model into a student UNet that starts as the base's own (``ldm-train lcm``,
    ``guidance``, ``progressive``): ``loss`` is a batch's loss, ``after_step`` what follows each optimiser step beside
    the student's EMA, ``written_config`` the model.json of the folder written and ``train_tensors`` what it keeps of
    the run beside the optimiser and the student; ``check_base`` refuses a base it cannot distil (by default one with
    fewer training timesteps than ``needs_timesteps``)."""

    needs_timesteps = 1

    def __init__(self, settings, config: ModelConfig, teacher: torch.nn.Module, student: torch.nn.Module,
                 forward: ForwardProcess, device: torch.device):
        self.settings, self.config, self.teacher, self.student = settings, config, teacher, student
        self.forward, self.device = forward, device  # noising: forward.add_noise
        self.alphas_cumprod = forward.alphas_cumprod.to(device)  # float64
        self.guidance_scale = settings.guidance_scale  # the teacher's

    @classmethod
    def check_base(cls, settings, config: ModelConfig) -> None:
        """``ConfigError`` where the base model cannot be distilled with these settings (before any work)."""
        count = config.schedule.num_train_timesteps
        if count < cls.needs_timesteps:
            raise ConfigError(f"the model {settings.base} has {count} training timesteps; expected at least "
                              f"{cls.needs_timesteps} (the distillation grid)")

    def loss(self, data: EncodedData, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             caption_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self) -> None:
        pass

    def written_config(self) -> ModelConfig:
        raise NotImplementedError

    def train_tensors(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs of this distillation's own networks (besides the student), by name."""
        return {}

    def load_train_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put back what ``train_tensors`` saved."""

    def guided_teacher(self, data: EncodedData, noisy: torch.Tensor, timesteps: torch.Tensor,
                       caption_ids: torch.Tensor) -> torch.Tensor:
        """The teacher's classifier-free guided output at ``guidance_scale`` (the runtime's ``apply_guidance``:
        uncond + w (cond - uncond); at 1 its conditional output alone, as the runtime runs it), no gradient."""
        with torch.no_grad():
            conditional = _conditioning(data, caption_ids, self.device)
            if self.guidance_scale == 1.0:
                return self.teacher(noisy, timesteps, **conditional)
            unconditional = _conditioning(data, torch.zeros_like(caption_ids), self.device)
            both = self.teacher(torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]),
                                torch.cat([unconditional["context"], conditional["context"]]),
                                torch.cat([unconditional["context_mask"], conditional["context_mask"]]))
            output_unconditional, output_conditional = both.chunk(2)
            return apply_guidance(output_unconditional, output_conditional, self.guidance_scale)


def run_distillation(settings, stage: str, kind: type[Distillation], resume: bool = False) -> Path:
    """Distil ``settings.base`` into ``settings.out`` as ``kind`` says (``resume``: continue the run there); the one
    process of the run."""
    settings.validate()
    process = start_process(settings.device)
    if process.world_size > 1:
        end_process(process)
        raise ConfigError(f"ldm-train {stage} runs in one process; expected it without torchrun")
    try:
        return _train(settings, stage, kind, process.device, resume)
    finally:
        end_process(process)


def _train(settings, stage: str, kind: type[Distillation], device: torch.device, resume: bool = False) -> Path:
    out = Path(settings.out)
    start_step = 0
    if resume:
        state = load_train_state(out, stage, optimizers=("_optimizer",))
        check_resume_settings(state.settings, settings, out, state.step)
        start_step = state.step
    networks = load_checkpoint(settings.base)
    config = networks.config
    kind.check_base(settings, config)
    count = config.schedule.num_train_timesteps
    if config.unet.in_channels != config.autoencoder.latent_channels:
        raise ConfigError(f"--base {settings.base} is an inpainting model (its UNet takes "
                          f"{config.unet.in_channels} channels); expected a text-to-image model")
    teacher, text_encoder, autoencoder = networks.unet, networks.text_encoder, networks.autoencoder
    for module in (teacher, text_encoder, autoencoder):
        module.requires_grad_(False).eval().to(device)
    torch.manual_seed(settings.seed)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    average = copy.deepcopy(teacher)
    dataset = build_dataset(settings.data, config.image_size, settings.seed, skip_bad=settings.skip_bad_images)
    data = _with_context(encode_dataset(dataset, autoencoder, text_encoder, device, settings.batch_size, True),
                         text_encoder, device)
    trainable = [parameter for parameter in student.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    distillation = kind(settings, config, teacher, student, ForwardProcess(config.schedule), device)
    if resume:
        tensors = load_tensors(out / TRAIN_STATE_TENSORS)
        student.load_state_dict(select_prefixed(tensors, "student."))
        average.load_state_dict(load_tensors(out / "unet.safetensors"))  # the averaged weights, as saved
        optimizer_from_tensors(optimizer, "optimizer", tensors, state.settings["_optimizer"])
        distillation.load_train_tensors(tensors)
    out.mkdir(parents=True, exist_ok=True)
    live = LiveFolder(out, resumed=resume)
    metrics = MetricsLog(live.path / METRICS_JSONL, start_step if resume else None)
    progress = TrainingProgress(settings.steps, start_step, stage, enabled=True)
    single = _SingleProcess()
    try:
        for step in range(start_step, settings.steps):
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
            _, latents, noise, timesteps, caption_ids = training_batch(
                data, step, settings.batch_size, single, settings.seed, generator, config.latent_scale_factor,
                count, 0.0)
            loss = distillation.loss(data, latents.to(device), noise.to(device), timesteps.to(device), caption_ids,
                                     generator)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(settings, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
            check_finite(step, out, loss=loss.detach(), gradient_norm=grad_norm)
            optimizer.step()
            distillation.after_step()
            _update_ema(average, student, settings.average_decay, step)
            done = step + 1
            progress.update(loss=float(loss.detach()))
            if done % 10 == 0 or done == settings.steps:
                metrics.write(done, {"loss": float(loss.detach()), "grad_norm": float(grad_norm)})
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                _save(out, settings, stage, networks, distillation, average, optimizer, done,
                      first=live.first, logs=live.pending)
                live.saved(metrics)
    finally:
        progress.close()
        live.close()
    return out


class ConsistencyDistillation(Distillation):
    """Latent consistency distillation: the student's consistency function at a grid timestep against the target
    network's one teacher step earlier."""

    needs_timesteps = SOLVER_STEPS

    def __init__(self, *args):
        super().__init__(*args)
        self.target = copy.deepcopy(self.teacher)
        count = self.config.schedule.num_train_timesteps
        self.grid = solver_grid(count, SOLVER_STEPS).to(self.device)
        self.stride = count // SOLVER_STEPS

    def loss(self, data, latents, noise, timesteps, caption_ids, generator):
        index = torch.randint(0, SOLVER_STEPS, (len(latents),), generator=generator).to(self.device)
        return _consistency_loss(self, data, latents, noise, caption_ids, self.grid[index])

    def after_step(self) -> None:
        _update_target(self.target, self.student, self.settings.ema_decay)

    def written_config(self) -> ModelConfig:
        return distilled_config(self.config, self.settings)

    def train_tensors(self) -> dict[str, torch.Tensor]:
        return {f"target.{k}": v for k, v in self.target.state_dict().items()}

    def load_train_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.target.load_state_dict(select_prefixed(tensors, "target."))


def _consistency_loss(run: ConsistencyDistillation, data: EncodedData, latents: torch.Tensor, noise: torch.Tensor,
                      caption_ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """One batch's pseudo-Huber consistency loss between the student at t_{n+k} = ``start`` and the target network
    at t_n, on the teacher's guided DDIM step between them."""
    prediction_type, alphas_cumprod = run.config.schedule.prediction_type, run.alphas_cumprod
    previous = (start - run.stride).clamp(min=0)
    alpha = alphas_cumprod[start].view(-1, 1, 1, 1).float()
    alpha_previous = alphas_cumprod[previous].view(-1, 1, 1, 1).float()
    noisy = run.forward.add_noise(latents, noise, start)
    conditional = _conditioning(data, caption_ids, run.device)
    prediction = consistency_function(run.student(noisy, start, **conditional), noisy, start,
                                      alphas_cumprod, prediction_type)
    guided = run.guided_teacher(data, noisy, start, caption_ids)
    with torch.no_grad():
        stepped = ddim_step(guided, noisy, alpha, alpha_previous, prediction_type)
        wanted = consistency_function(run.target(stepped, previous, **conditional), stepped, previous,
                                      alphas_cumprod, prediction_type)
    difference = (prediction.float() - wanted.float()).pow(2)
    return (torch.sqrt(difference + run.settings.huber_c**2) - run.settings.huber_c).mean()


@torch.no_grad()
def _update_target(target: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    for kept, trained in zip(target.parameters(), student.parameters()):
        kept.lerp_(trained, 1.0 - decay)


def distilled_config(config: ModelConfig, settings: ConsistencySettings) -> ModelConfig:
    """The base model's description with the distilled model's defaults: the lcm sampler at ``sample_steps`` steps
    over the distillation grid, guidance 1 (the student has the guidance in it)."""
    defaults = SamplerDefaults(name="lcm", steps=settings.sample_steps, guidance_scale=1.0)
    return dataclasses.replace(config, default_sampler=defaults)


def _save(out: Path, settings, stage: str, networks, distillation: Distillation, average, optimizer,
          step: int, first: bool, logs: Path | None) -> None:
    config = networks.config
    weights = {"autoencoder": networks.autoencoder.state_dict(), "unet": average.state_dict()}
    if TEXT_ENCODER_WEIGHTS in weight_files(config):
        weights["text_encoder"] = networks.text_encoder.state_dict()
    optimizer_tensors, optimizer_meta = optimizer_to_tensors(optimizer, "optimizer")
    train_tensors = {**optimizer_tensors,
                     **{f"student.{k}": v for k, v in distillation.student.state_dict().items()},
                     **distillation.train_tensors()}
    text_folder = networks.folder / TEXT_ENCODER_DIR
    save_checkpoint(out, distillation.written_config(), weights, train_tensors, stage, step,
                    {**settings.to_dict(), "_optimizer": optimizer_meta},
                    save_tokenizer=networks.text_encoder.save_tokenizer,
                    text_encoder_folder=text_folder if text_folder.is_dir() else None, first=first, logs=logs)
