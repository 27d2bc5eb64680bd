"""The sd15 preset's imported twin through the whole chain: Stable Diffusion 1.5's real configuration with random
weights, written as a diffusers folder, then ``ldm-import``, ``ldm-export --engine fp16`` (graphs over 2 GB, with
external data) and one ``ldm-sample`` at the model's size with a few steps. Reports the wall time and the peak
RSS of each stage, each run as its own process (``os.wait4`` gives that process's own peak).

    python benchmarks/bench_sd15_import.py --work runs/sd15-import                    # SD 1.5's sizes, 512x512
    python benchmarks/bench_sd15_import.py --work /tmp/small --config small --steps 1  # a check in a minute

No downloads: the CLIP tokenizer is a small BPE vocabulary written here (the text encoder keeps SD 1.5's
49408-token embedding; the prompt only needs tokens that exist).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    # Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5): UNet 859.5 M parameters, VAE 83.7 M, CLIP ViT-L/14 text
    "sd15": {"unet_channels": (320, 640, 1280, 1280), "vae_channels": (128, 256, 512, 512), "layers": 2,
             "text_width": 768, "text_layers": 12, "text_heads": 12, "image_size": 512},
    # The same structure, small enough to check this script in a minute on a CPU
    "small": {"unet_channels": (32, 64, 64, 64), "vae_channels": (32, 32, 64, 64), "layers": 1,
              "text_width": 64, "text_layers": 2, "text_heads": 2, "image_size": 64},
}
PROMPT = "a red lighthouse"


def write_diffusers_folder(folder: Path, sizes: dict, seed: int) -> None:
    """A random-weight StableDiffusionPipeline of ``sizes`` with SD 1.5's scheduler, saved with safetensors."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=sizes["image_size"] // 8, block_out_channels=sizes["unet_channels"],
                                layers_per_block=sizes["layers"], cross_attention_dim=sizes["text_width"],
                                attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=sizes["vae_channels"], layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=sizes["image_size"])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=sizes["text_width"], intermediate_size=4 * sizes["text_width"],
        num_hidden_layers=sizes["text_layers"], num_attention_heads=sizes["text_heads"], max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=sizes["text_width"]))
    tokenizer_files = folder.parent / f".{folder.name}-bpe"
    tokenizer_files.mkdir(parents=True, exist_ok=True)
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    vocab = [*letters, *(f"{letter}</w>" for letter in letters), "<|startoftext|>", "<|endoftext|>"]
    (tokenizer_files / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    (tokenizer_files / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tokenizer_files / "vocab.json"), str(tokenizer_files / "merges.txt"),
                              pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=77)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              set_alpha_to_one=False, skip_prk_steps=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    shutil.rmtree(tokenizer_files)
    scheduler_json = folder / "scheduler" / "scheduler_config.json"  # SD 1.5's own says so too
    scheduler_json.write_text(json.dumps({**json.loads(scheduler_json.read_text()), "clip_sample": False}))


def run_stage(name: str, command: list[str], log: Path) -> dict:
    """Run ``command`` as its own process (output to ``log``); its wall time and its own peak RSS."""
    print(f"{name}: {' '.join(command)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{name} failed with exit status {code}; its output is in {log}:\n{log.read_text()[-2000:]}")
    result = {"stage": name, "wall_s": seconds, "peak_rss_gib": usage.ru_maxrss / 2**20, "command": command}
    print(f"{name}: {seconds:.0f} s, peak RSS {result['peak_rss_gib']:.2f} GiB", file=sys.stderr, flush=True)
    return result


def folder_gib(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path, help="a folder to write into (must not exist)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sd15")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps of the one ldm-sample (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.work.exists():
        parser.error(f"--work {args.work} already exists; expected a new folder")
    args.work.mkdir(parents=True)
    sizes = CONFIGS[args.config]
    size = sizes["image_size"]
    python = sys.executable
    scripts = Path(python).parent
    stages = [run_stage("write diffusers folder", [python, __file__, "--write-diffusers", str(args.work / "diffusers"),
                                                   args.config, str(args.seed)], args.work / "write.log")]
    stages.append(run_stage("ldm-import", [str(scripts / "ldm-import"), str(args.work / "diffusers"), "--out",
                                           str(args.work / "checkpoint")], args.work / "import.log"))
    stages.append(run_stage("ldm-export --engine fp16", [
        str(scripts / "ldm-export"), str(args.work / "checkpoint"), "--out", str(args.work / "engine"),
        "--engine", "fp16", "--backend", "onnxruntime", "--batch-range", "1:2:2", "--size-range", f"{size}:{size}",
        "--skip-validation"], args.work / "export.log"))
    stages.append(run_stage(f"ldm-sample {size}x{size}, {args.steps} steps", [
        str(scripts / "ldm-sample"), "--model", str(args.work / "engine"), PROMPT, "--steps", str(args.steps),
        "--height", str(size), "--width", str(size), "--out", str(args.work / "sample.png")],
        args.work / "sample.log"))
    graphs = sorted(path.name for path in (args.work / "engine").iterdir())
    report = {
        "config": args.config, "image_size": size, "steps": args.steps,
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "checkpoint_gib": folder_gib(args.work / "checkpoint"), "engine_gib": folder_gib(args.work / "engine"),
        "engine_files": graphs, "stages": stages,
    }
    print("| stage | wall s | peak RSS GiB |\n|---|---|---|")
    for stage in stages:
        print(f"| {stage['stage']} | {stage['wall_s']:.0f} | {stage['peak_rss_gib']:.2f} |")
    print(f"checkpoint {report['checkpoint_gib']:.2f} GiB, engine dir {report['engine_gib']:.2f} GiB: "
          f"{', '.join(graphs)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--write-diffusers":  # the first stage, in its own process
        write_diffusers_folder(Path(sys.argv[2]), CONFIGS[sys.argv[3]], int(sys.argv[4]))
        sys.exit(0)
    sys.exit(main())
