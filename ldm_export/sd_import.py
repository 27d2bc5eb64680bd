"""``ldm-import``: a Stable Diffusion 1.x / 2.x checkpoint -> an ordinary checkpoint dir (model.json, safetensors,
tokenizer/) that ldm-sample, ldm-export and ldm-serve take.

    ldm-import path/to/stable-diffusion-v1-5 --out runs/sd15      # a diffusers folder (safetensors weights)
    ldm-import v2-1_768-ema-pruned.safetensors --tokenizer sd21/tokenizer --prediction-type v_prediction --out runs/sd21
    ldm-import path/to/stable-diffusion-v1-5 --lora style.safetensors:0.8 --out runs/sd15-style   # a LoRA fused in
    ldm-import runs/ldm --lora style.safetensors --out runs/ldm-style                # into one of our checkpoint dirs

A diffusers folder holds ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
``scheduler/``. Our networks use diffusers' parameter names, so the UNet and VAE weights keep their keys; the
CLIP text encoder's go under ``model.``. Every setting that makes the model Stable Diffusion (CLIP text encoder,
cross-attention over all 77 tokens, epsilon or v prediction, linear projections, per-level heads, fp32
attention, the VAE scaling factor, the scheduler's settings and the sampler its class names) is written into
model.json.

``--lora FILE[:SCALE]`` (repeatable) fuses LoRA adapters into the weights written, and model.json records each one's
file name, sha256 and scale (``ldm_export.lora``); on a checkpoint dir (ldm-train's or ldm-import's) it writes a copy
with the adapters fused.

Pickled weights (``.ckpt``, ``.bin``, ``.pt``) are refused, never loaded: unpickling runs code. So are the kinds
this runtime does not run (SDXL, SD3, Flux, upscalers, a LoRA file as the source), each named in one line. Stable
Diffusion's inpainting models (9-channel UNets: the latents, the mask and the masked image's latents) are imported
as any other, and model.json's unet.in_channels says which they are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ldm_export.diffusers_config import autoencoder_from_diffusers, text_encoder_from_transformers, unet_from_diffusers
from ldm_export.diffusers_limits import MODEL_INDEX_LIMITS, SCHEDULER_LIMITS, check_values
from ldm_export.diffusers_scheduler import schedule_from_diffusers
from ldm_export.errors import ImportRefusedError
from ldm_export.imported_checkpoint import (checked_weights, clip_shapes, clip_state_dict, fit_state_dict,
                                            write_checkpoint)
from ldm_export.lora import AdapterFile, adapter_argument, fuse_checkpoint, fuse_into_import
from ldm_export.sd_single_file import import_single_file
from ldm_export.untrusted_files import read_json_object, read_safetensors_header
from ldm_runtime.command_line import (OneLineArgumentParser, check_writable_folder, report_user_error,
                                      sigterm_as_ctrl_c)
from ldm_runtime.config import ConfigError, ModelConfig
from ldm_runtime.errors import DiskFullError, UserError
from ldm_runtime.safetensors_header import PICKLE_SUFFIXES

PROG = "ldm-import"
LORA_SOURCE = ("LoRA weights (an adapter for a base model, not a model); pass it as --lora FILE[:SCALE] to the "
               "import of its base model")
CONVERT_HINT = ("convert it to .safetensors first, in a throwaway environment you trust with the file (e.g. "
                "diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py --to_safetensors), "
                "or download the .safetensors release")
# model_index.json pipeline classes that are Stable Diffusion 1.x/2.x (the same five components; an inpainting model's
# UNet takes 9 channels, which its config.json says)
SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
UNSUPPORTED_PIPELINES = {
    "StableDiffusionXL": "SDXL",
    "StableDiffusion3": "Stable Diffusion 3",
    "Flux": "Flux",
    "StableDiffusionUpscale": "an upscaler",
    "StableDiffusionDepth2Img": "a depth-to-image model",
    "StableCascade": "Stable Cascade",
    "Kandinsky": "Kandinsky",
    "PixArt": "PixArt",
}


# --- reading the source ---------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "a JSON file of a diffusers Stable Diffusion folder")


def refuse_pickle(path: Path) -> None:
    """``ImportRefusedError`` for a pickled weight file (never opened)."""
    raise ImportRefusedError(f"{path} is a pickled checkpoint ({path.suffix}); ldm-import never unpickles "
                             f"(loading a pickle can run any code): {CONVERT_HINT}")


def _weights_file(component: Path) -> Path:
    """The safetensors weights of a diffusers component folder (the fp32 file, else a variant such as fp16)."""
    if not component.is_dir():
        raise ImportRefusedError(f"{component} does not exist; expected a diffusers component folder")
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (component / name).is_file():
            return component / name
    variants = sorted(component.glob("*.safetensors"))
    if len(variants) == 1:
        return variants[0]
    if len(variants) > 1:
        raise ImportRefusedError(f"{component} holds several weight files {[p.name for p in variants]} and none "
                                 f"named diffusion_pytorch_model.safetensors or model.safetensors; keep one")
    if list(component.glob("*.safetensors.index.json")):
        raise ImportRefusedError(f"{component} holds sharded weights; ldm-import takes one .safetensors file "
                                 f"per component")
    pickled = sorted(p for p in component.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        refuse_pickle(pickled[0])
    raise ImportRefusedError(f"{component} has no .safetensors weights")


def _refuse_lora(names, where: Path) -> None:
    if any("lora" in name.lower() for name in names):
        raise ImportRefusedError(f"{where} holds {LORA_SOURCE}")


# --- weights ---------------------------------------------------------------------------------------------------

# Older diffusers folders name the VAE's attention projections as the original code did.
LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy_vae(tensors: dict[str, Any]) -> dict[str, Any]:
    renamed = {}
    for name, tensor in tensors.items():
        stem, _, leaf = name.rpartition(".")
        module_path, _, projection = stem.rpartition(".")
        if ".attentions." in name and projection in LEGACY_VAE_ATTENTION:
            name = f"{module_path}.{LEGACY_VAE_ATTENTION[projection]}.{leaf}"
        renamed[name] = tensor
    return renamed


# --- the import ------------------------------------------------------------------------------------------------

def import_diffusers_folder(source: Path, out: Path, clip_skip: int = 0,
                            log: Callable[[str], None] = lambda line: None,
                            adapters: Sequence[AdapterFile] = ()) -> Path:
    """Write checkpoint dir ``out`` from the diffusers Stable Diffusion folder ``source``, ``adapters`` fused;
    returns ``out``.

    ``out`` appears complete or not at all (written in a sibling temporary folder, then renamed).
    """
    index = _read_json(source / "model_index.json")
    check_values(index, MODEL_INDEX_LIMITS, "the pipeline's", source / "model_index.json")
    pipeline = index.get("_class_name", "")
    for prefix, kind in UNSUPPORTED_PIPELINES.items():
        if pipeline.startswith(prefix):
            raise ImportRefusedError(f"{source} is {kind} ({pipeline}); ldm-import takes Stable Diffusion 1.x/2.x "
                                     f"text-to-image and inpainting models")
    if pipeline not in SD_PIPELINES:
        raise ImportRefusedError(f"{source} holds a {pipeline or 'pipeline of no named class'}; ldm-import takes "
                                 f"{' or '.join(SD_PIPELINES)} folders")

    unet_json = _read_json(source / "unet" / "config.json")
    unet_cfg = unet_from_diffusers(unet_json, source / "unet")
    autoencoder_cfg, scale = autoencoder_from_diffusers(_read_json(source / "vae" / "config.json"), source / "vae")
    text_cfg = text_encoder_from_transformers(_read_json(source / "text_encoder" / "config.json"),
                                              source / "text_encoder", clip_skip)
    scheduler_json = source / "scheduler" / "scheduler_config.json"
    scheduler_config = _read_json(scheduler_json)
    check_values(scheduler_config, SCHEDULER_LIMITS, "the scheduler's", scheduler_json)
    scheduler_notes: list[str] = []  # said once nothing else refuses the import
    schedule, sampler, default_sampler = schedule_from_diffusers(scheduler_config, scheduler_json,
                                                                 scheduler_notes.append)
    sample_size = unet_json.get("sample_size", 64)
    if isinstance(sample_size, list):
        sample_size = sample_size[0]
    config = ModelConfig(image_size=int(sample_size) * autoencoder_cfg.factor, autoencoder=autoencoder_cfg,
                         unet=unet_cfg, text_encoder=text_cfg, schedule=schedule, latent_scale_factor=scale,
                         sampler=sampler, default_sampler=default_sampler)
    try:
        config.validate()
    except ConfigError as error:
        raise ImportRefusedError(f"{source} does not describe a model these networks run: {error}") from None
    if text_cfg.hidden_size != unet_cfg.context_dim:
        raise ImportRefusedError(f"{source}: the text encoder is {text_cfg.hidden_size} wide but the UNet's "
                                 f"cross_attention_dim is {unet_cfg.context_dim}; expected them equal")

    import torch

    from ldm_runtime.models import Autoencoder, UNet

    with torch.device("meta"):  # shapes only: the weights come from the source
        unet, autoencoder = UNet(unet_cfg), Autoencoder(autoencoder_cfg)
    text_shapes = clip_shapes(text_cfg)
    unet_file, vae_file, text_file = (_weights_file(source / name) for name in ("unet", "vae", "text_encoder"))
    unet_header = read_safetensors_header(unet_file)
    _refuse_lora(unet_header, unet_file)
    weights = {
        "unet": checked_weights(unet_file, unet_header,
                                lambda tensors: fit_state_dict(unet, tensors, "UNet", unet_file)),
        "autoencoder": checked_weights(vae_file, read_safetensors_header(vae_file), lambda tensors: fit_state_dict(
            autoencoder, _rename_legacy_vae(tensors), "VAE", vae_file)),
        "text_encoder": checked_weights(text_file, read_safetensors_header(text_file), lambda tensors: fit_state_dict(
            text_shapes, clip_state_dict(tensors, text_shapes), "text encoder", text_file)),
    }
    config, weights = fuse_into_import(config, weights, adapters, log)
    write_checkpoint(out, config, weights, source / "tokenizer",
                     settings={"source": source.name, "clip_skip": clip_skip})
    for line in scheduler_notes:
        log(line)
    log(f"wrote {out} from the {unet_file.parent.name}, {vae_file.parent.name} and {text_file.parent.name} weights "
        f"of {source}")
    return out


# Keys that only one kind of single-file checkpoint has, in the order they are looked for.
SINGLE_FILE_KINDS = (
    ("lora", LORA_SOURCE),
    ("conditioner.embedders.1", "SDXL"),
    ("joint_blocks.", "Stable Diffusion 3"),
    ("double_blocks.", "Flux"),
)


def refuse_unsupported_single_file(path: Path, header: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """``ImportRefusedError`` naming the kind of a single .safetensors file that is not SD 1.x/2.x, from its
    ``header`` (key names and one shape); returns for anything else."""
    for marker, kind in SINGLE_FILE_KINDS:
        if any(marker in name.lower() for name in header):
            raise ImportRefusedError(f"{path} holds {kind}" if kind.startswith("LoRA") else
                                     f"{path} is {kind}; ldm-import takes Stable Diffusion 1.x/2.x models")


def import_source(source: str | Path, out: str | Path, clip_skip: int = 0,
                  log: Callable[[str], None] = lambda line: None, tokenizer: str | Path | None = None,
                  prediction_type: str | None = None, image_size: int | None = None,
                  adapters: Sequence[AdapterFile] = ()) -> Path:
    """Import ``source`` (a diffusers folder, or an original-layout .safetensors file with ``tokenizer``, a CLIP
    tokenizer folder, and for SD 2.x ``prediction_type``) into checkpoint dir ``out`` with ``adapters`` fused, or
    fuse ``adapters`` into a copy of checkpoint dir ``source``; ``ImportRefusedError`` in one sentence for anything
    it does not take."""
    source, out = Path(source), Path(out)
    if out.exists() or out.is_symlink():
        raise ImportRefusedError(f"--out {out} already exists; expected a new folder")
    check_writable_folder("--out's folder", out.parent)
    if source.is_dir() and (source / "model.json").is_file() and not (source / "model_index.json").exists():
        flags = (("--clip-skip", clip_skip), ("--tokenizer", tokenizer), ("--prediction-type", prediction_type),
                 ("--image-size", image_size))
        given = [flag for flag, value in flags if value]
        if not adapters or given:
            raise ImportRefusedError(f"{source} is already a checkpoint dir; expected --lora FILE[:SCALE] to fuse "
                                     f"adapters into a copy of it" + (f", and no {given[0]}" if given else ""))
        return fuse_checkpoint(source, out, adapters, log)
    if source.is_file():
        if source.suffix.lower() in PICKLE_SUFFIXES:
            refuse_pickle(source)
        if source.suffix.lower() == ".safetensors":
            header = read_safetensors_header(source)
            refuse_unsupported_single_file(source, header)
            return import_single_file(source, header, out, None if tokenizer is None else Path(tokenizer),
                                      prediction_type, image_size, clip_skip, log, adapters)
        raise ImportRefusedError(f"{source} is neither a .safetensors file nor a folder; ldm-import takes a diffusers "
                                 f"folder or an original-layout Stable Diffusion .safetensors file")
    if source.exists() and not source.is_dir():
        raise ImportRefusedError(f"{source} is not a regular file or a folder; expected a diffusers Stable Diffusion "
                                 f"folder or a .safetensors file")
    if not source.is_dir():
        raise ImportRefusedError(f"{source} does not exist; expected a diffusers Stable Diffusion folder")
    if not (source / "model_index.json").is_file():
        if any(path.name.startswith("pytorch_lora_weights") for path in source.iterdir()):
            raise ImportRefusedError(f"{source} holds {LORA_SOURCE}")
        raise ImportRefusedError(f"{source} has no model_index.json; expected a diffusers Stable Diffusion folder "
                                 f"(or, with --lora, a checkpoint dir)")
    flags = (("--tokenizer", tokenizer), ("--prediction-type", prediction_type), ("--image-size", image_size))
    given = [flag for flag, value in flags if value is not None]
    if given:
        raise ImportRefusedError(f"{source} is a diffusers folder, whose own files give the tokenizer, prediction "
                                 f"type and image size; expected no {given[0]} (it applies to single .safetensors "
                                 f"files only)")
    return import_diffusers_folder(source, out, clip_skip, log, adapters)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help="a diffusers Stable Diffusion 1.x/2.x folder, or one "
                                                         "original-layout .safetensors file; with --lora, also a "
                                                         "checkpoint dir (ldm-train's or ldm-import's)")
    parser.add_argument("--out", required=True, metavar="CHECKPOINT_DIR", help="checkpoint dir to write (must not "
                                                                                 "exist)")
    parser.add_argument("--clip-skip", type=int, default=0, metavar="N",
                        help="condition on the CLIP layer N before the last (through the final layer norm), as "
                             "diffusers' clip_skip; A1111's 'clip skip 2' is 1 (default: 0, the last layer)")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="single files only: the model's CLIP tokenizer folder (vocab.json and merges.txt, e.g. the "
                             "tokenizer/ of its diffusers release); the file holds none")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                        help="single files only: what the UNet predicts; SD 2.x files do not say (768-v models: "
                             "v_prediction, 512-base: epsilon); SD 1.x: epsilon")
    parser.add_argument("--image-size", type=int, default=None, metavar="PIXELS",
                        help="single files only: the model's native size (default: 768 for v_prediction, else 512)")
    parser.add_argument("--lora", action="append", type=adapter_argument, default=[], metavar="FILE[:SCALE]",
                        help="fuse this LoRA adapter (.safetensors, diffusers/PEFT or kohya layout; UNet and text "
                             "encoder, linear and LoCon layers) into the weights at SCALE (default 1), recorded in "
                             "model.json; repeatable, applied in order")
    return parser


def _log(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


@sigterm_as_ctrl_c
def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        import_source(args.source, args.out, args.clip_skip, _log, tokenizer=args.tokenizer,
                      prediction_type=args.prediction_type, image_size=args.image_size, adapters=args.lora)
    except UserError as error:
        return report_user_error(PROG, error)
    except OSError as error:  # a full disk is one line; any other OSError is a bug and keeps its traceback
        full = DiskFullError.from_os_error(error, args.out, f"nothing was written to {args.out}: free space and "
                                                            f"import again")
        if full is None:
            raise
        return report_user_error(PROG, full)
    except KeyboardInterrupt:
        _log(f"interrupted; nothing was written to {args.out}")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
