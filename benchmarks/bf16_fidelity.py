"""The openvino engine's bf16 against its own fp32 on whole sampling runs: the fidelity bar ``--precision auto`` reads
(a whole sampling run >= 40 dB PSNR against fp32 on the demo model and on an SD-sized random model, prompt adherence
within 0.02 on every attribute).

    ldm-export models/shapes-demo --out demo-fp32 --engine fp32
    python -c "from ldm_tools.bench.sources import *; write_preset_checkpoint('sd15', 16, 'sd15-ckpt'); \\
        export_onnxruntime_engine('sd15-ckpt', 'sd15-engine', 16, 128, 128)"
    OMP_NUM_THREADS=1 python benchmarks/bf16_fidelity.py --demo demo-fp32 --sd15 sd15-engine --threads 1 \\
        --json benchmarks/results/cpu-openvino-bf16-fidelity.json

Each image is its own request (a batch of one), sampled with the model's default sampler and steps (the engine
dir's ``default_sampler``, else ``DEFAULT_SAMPLER`` at ``DEFAULT_STEPS``), guidance 5, seed ``--seed + i``, once at
fp32 and once at bf16; one engine is in memory at a time. Reported per image: PSNR of the uint8 images and of the
final latents (peak: the fp32 latents' max - min), and the latents' relative error; per run, the PSNR of all its
images together (the mean squared error over all of them, as ``ldm-export``'s validation reports a sampling run),
which is what the bar judges. Adherence: ``ldm-eval``'s held-out prompts, classifier and scoring
(``ldm_tools.evaluate``) on the demo model at both precisions, the same seeds (``ldm-eval`` itself has no
``--precision``), and the same PSNRs over those images.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = {  # per model: the demo model's own kind of caption, and Stable Diffusion's kind for sd15
    "demo": ("a large red circle on the left, on a blue background", "a small yellow star in the center",
             "two green squares at the top", "a purple triangle on the right, on a white background",
             "three orange circles", "a large blue square at the bottom"),
    "sd15": ("a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse at dusk",
             "a bowl of fruit on a wooden table", "a red sports car in the rain"),
}
GUIDANCE_SCALE = 5.0
PSNR_BAR_DB = 40.0
ADHERENCE_BAR = 0.02


def sample(engine, prompts: list[str], seed: int) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """(uint8 images (H, W, 3), final latents (C, h, w) float32, seconds): each prompt alone, the model's default
    sampler and steps."""
    from ldm_runtime.pipeline import GenerationRequest, Pipeline

    pipeline = Pipeline(engine)
    images, latents = [], []
    started = time.perf_counter()
    for index, prompt in enumerate(prompts):
        states = pipeline.start([GenerationRequest(prompt=prompt, seed=seed + index, guidance_scale=GUIDANCE_SCALE)])
        while not states[0].done:
            states = pipeline.advance(states)
        latents.append(np.asarray(engine.to_host(states[0].latents), dtype=np.float32)[0])
        images.append(pipeline.decode(states)[0])
    return images, latents, time.perf_counter() - started


def latent_psnr_db(actual: np.ndarray, expected: np.ndarray) -> float:
    """PSNR of latents against fp32 latents, the peak being the fp32 latents' range (max - min)."""
    mse = float(np.mean((actual.astype(np.float64) - expected.astype(np.float64)) ** 2))
    peak = float(expected.max() - expected.min())
    return 100.0 if mse == 0 else min(100.0, 10 * math.log10(peak**2 / mse))


def compare_precisions(engine_dir: str, prompts: list[str], seed: int, threads: int) -> dict[str, Any]:
    """Both precisions' images and latents of ``prompts``, and bf16's PSNR and error against fp32."""
    from ldm_runtime.engines.openvino_engine import OpenVinoEngine

    runs = {}
    for precision in ("fp32", "bf16"):
        engine = OpenVinoEngine(engine_dir, precision=precision, intra_op_threads=threads, cache_dir=None)
        runs[precision] = sample(engine, prompts, seed)
        sampler = engine.info.default_sampler
        del engine
        gc.collect()
        print(f"  {precision}: {len(prompts)} images in {runs[precision][2]:.1f} s", flush=True)
    (fp32_images, fp32_latents, fp32_s), (bf16_images, bf16_latents, bf16_s) = runs["fp32"], runs["bf16"]
    latent_psnr = [latent_psnr_db(actual, expected) for actual, expected in zip(bf16_latents, fp32_latents)]
    relative = [float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
                for actual, expected in zip(bf16_latents, fp32_latents)]
    return {"engine_dir": engine_dir, "prompts": prompts, "seeds": [seed + i for i in range(len(prompts))],
            "default_sampler": sampler, **image_psnrs(bf16_images, fp32_images), "latent_psnr_db": latent_psnr,
            "min_latent_psnr_db": min(latent_psnr), "latent_relative_error": relative,
            "seconds": {"fp32": round(fp32_s, 2), "bf16": round(bf16_s, 2)}}


def image_psnrs(actual: list[np.ndarray], expected: list[np.ndarray]) -> dict[str, Any]:
    """bf16's uint8 images against fp32's: the run's PSNR (all images together), per image, the worst, and the
    fraction of images under the bar."""
    from ldm_export.validate import psnr_db

    per_image = [psnr_db([a], [e]) for a, e in zip(actual, expected)]
    return {"run_psnr_db": psnr_db(actual, expected), "image_psnr_db": per_image, "min_image_psnr_db": min(per_image),
            "images_under_bar": sum(value < PSNR_BAR_DB for value in per_image) / len(per_image)}


def compare_adherence(engine_dir: str, count: int, threads: int) -> dict[str, Any]:
    """ldm-eval's adherence and FID on the demo model at fp32 and at bf16 (its defaults: held-out prompts of data
    seed 0, seeds 0..count-1, the model's default sampler and steps, its guidance and eta, batches of 16)."""
    from ldm_runtime.engines.openvino_engine import OpenVinoEngine
    from ldm_runtime.pipeline import Pipeline
    from ldm_tools.evaluate import DEFAULT_CLASSIFIER, EvalSettings, generate_images, score_samples
    from ldm_train.classifier import load_classifier
    from ldm_train.data.shapes import ShapesDataset

    defaults = EvalSettings(model=engine_dir, json="")
    classifier, _ = load_classifier(str(DEFAULT_CLASSIFIER))
    results, samples = {}, {}
    for precision in ("fp32", "bf16"):
        engine = OpenVinoEngine(engine_dir, precision=precision, intra_op_threads=threads, cache_dir=None)
        pipeline = Pipeline(engine)
        sampler = pipeline.default_sampler
        steps = pipeline.default_steps_for(sampler)
        prompts = ShapesDataset.heldout(count, engine.info.image_size, defaults.data_seed)
        captions = [prompts.caption(i) for i in range(count)]
        truths = [prompts.labels(i) for i in range(count)]
        started = time.perf_counter()
        samples[precision] = generate_images(engine, captions, [defaults.seed + i for i in range(count)], steps,
                                             defaults.guidance, defaults.eta, defaults.batch_size, sampler)
        seconds = time.perf_counter() - started
        real = ShapesDataset.heldout(3 * count, classifier.config.image_size, defaults.data_seed)
        scores = score_samples(samples[precision], truths, captions, real.images_uint8(range(count, 2 * count)),
                               real.images_uint8(range(2 * count, 3 * count)), classifier)
        results[precision] = {"adherence": {name: round(value, 4) for name, value in scores["adherence"].items()},
                              "fid_in_domain": round(scores["fid_in_domain"], 4),
                              "fid_real_floor": round(scores["fid_real_floor"], 4), "sampler": sampler,
                              "steps": steps, "generate_s": round(seconds, 2)}
        del engine
        gc.collect()
        print(f"  adherence {precision}: {results[precision]['adherence']}", flush=True)
    differences = {name: round(abs(results["bf16"]["adherence"][name] - value), 4)
                   for name, value in results["fp32"]["adherence"].items() if not math.isnan(value)}
    psnrs = image_psnrs(list(samples["bf16"]), list(samples["fp32"]))
    del psnrs["image_psnr_db"]  # 200 numbers; the run, the worst and the share under the bar tell the story
    return {"prompts": count, "guidance": defaults.guidance, **results, "difference": differences,
            "max_difference": max(differences.values()), "images": psnrs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", required=True, help="the demo model's fp32 engine dir (from models/shapes-demo)")
    parser.add_argument("--sd15", default=None, help="an sd15-preset random model's fp32 engine dir (none: skipped)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--demo-images", type=int, default=len(PROMPTS["demo"]))
    parser.add_argument("--sd15-images", type=int, default=2)
    parser.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts for adherence (0: skipped)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for flag, value, most in (("--demo-images", args.demo_images, len(PROMPTS["demo"])),
                              ("--sd15-images", args.sd15_images, len(PROMPTS["sd15"]))):
        if not 1 <= value <= most:
            parser.error(f"{flag} is {value}; expected 1 to {most}")
    import openvino

    from ldm_runtime.engines.openvino_engine import cpu_capabilities
    from ldm_tools.bench.cli import machine_info

    if "BF16" not in cpu_capabilities(openvino.Core()):
        parser.error("this CPU has no native bf16 (OpenVINO does not report BF16), so there is nothing to measure")
    report: dict[str, Any] = {"machine": machine_info(), "guidance_scale": GUIDANCE_SCALE,
                              "bar": {"min_image_psnr_db": PSNR_BAR_DB, "adherence": ADHERENCE_BAR}, "models": {}}
    sources = {"demo": (args.demo, args.demo_images), "sd15": (args.sd15, args.sd15_images)}
    for model, (engine_dir, images) in sources.items():
        if engine_dir is None:
            continue
        print(f"{model}: {engine_dir}", flush=True)
        report["models"][model] = result = compare_precisions(engine_dir, list(PROMPTS[model][:images]), args.seed,
                                                              args.threads)
        each = ", ".join(f"{value:.1f}" for value in result["image_psnr_db"])
        print(f"  images: run {result['run_psnr_db']:.1f} dB, each {each} dB; latents "
              f"{', '.join(f'{value:.1f}' for value in result['latent_psnr_db'])} dB", flush=True)
    if args.eval_prompts:
        report["adherence"] = compare_adherence(args.demo, args.eval_prompts, args.threads)
        images = report["adherence"]["images"]
        print(f"  adherence: largest difference {report['adherence']['max_difference']}; its {args.eval_prompts} "
              f"images: run {images['run_psnr_db']:.1f} dB, worst {images['min_image_psnr_db']:.1f} dB", flush=True)
    runs = {model: result["run_psnr_db"] for model, result in report["models"].items()}
    if "adherence" in report:
        runs["demo, ldm-eval's prompts"] = report["adherence"]["images"]["run_psnr_db"]
    report["worst_run"] = dict(zip(("model", "psnr_db"), min(runs.items(), key=lambda item: item[1])))
    report["meets_bar"] = bool(report["worst_run"]["psnr_db"] >= PSNR_BAR_DB and "sd15" in report["models"]
                               and "adherence" in report and report["adherence"]["max_difference"] <= ADHERENCE_BAR)
    print(f"worst sampling run {report['worst_run']} (bar {PSNR_BAR_DB:g} dB); meets the bar: {report['meets_bar']}",
          flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
