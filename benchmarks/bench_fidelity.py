"""Images from an engine dir against eager PyTorch fp32 on the same seeds: the fidelity bar of every reduced-precision
engine (fp32 engines >= 40 dB PSNR, bf16/fp16/int8 >= 30 dB, 25 DDIM steps).

    python benchmarks/bench_fidelity.py --checkpoint runs/sd15-ckpt --model engines/sd15-fp16 \\
        --engines onnxruntime,openvino --prompts 4 --json benchmarks/results/fidelity-sd15-fp16.json

The eager reference is the checkpoint the engine dir was exported from, run as ``ldm-export``'s validation runs it
(the plain PyTorch kernels, one UNet call per step); its images are made first and its networks freed before each
engine is loaded, so that at Stable Diffusion's size only one model is in memory at a time. Each request is made
alone (a batch of one), so every engine sees the same calls. Reports PSNR per image and over all images (the
mean squared error of all of them together, as ``ldm-export`` reports it), and each stage's wall time.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ("a red circle on a white background", "two blue squares in the top left corner",
           "a small green triangle", "a yellow star above a purple ring", "three orange dots", "a black square",
           "a pink heart on a grey background", "a large cyan hexagon")

def generate(engine, requests) -> tuple[list[np.ndarray], float]:
    from ldm_runtime.pipeline import Pipeline

    pipeline = Pipeline(engine)
    started = time.perf_counter()
    images = [np.asarray(pipeline.generate([request])[0]) for request in requests]
    return images, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint dir the engine dir came from")
    parser.add_argument("--model", type=Path, required=True, help="engine dir written by ldm-export")
    parser.add_argument("--engines", default="onnxruntime", help="comma-separated engine-dir engines")
    parser.add_argument("--prompts", type=int, default=4, help=f"images to compare (1-{len(PROMPTS)})")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0, help="request i uses seed + i")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts {args.prompts} is out of range; expected 1 to {len(PROMPTS)}")

    from ldm_export.onnx_export import reference_kernels
    from ldm_export.validate import PSNR_LIMITS_DB, psnr_db
    from ldm_runtime.engines import load_engine
    from ldm_runtime.engines.torch_engine import TorchEngine
    from ldm_runtime.manifest import load_manifest
    from ldm_runtime.pipeline import GenerationRequest
    from ldm_tools.bench.cli import machine_info

    manifest = load_manifest(args.model)
    requests = [GenerationRequest(prompt=prompt, seed=args.seed + index, sampler="ddim", steps=args.steps)
                for index, prompt in enumerate(PROMPTS[:args.prompts])]
    with reference_kernels():
        eager = TorchEngine(args.checkpoint, device="cpu", unet_chunk_size=None)
        expected, eager_seconds = generate(eager, requests)
    del eager
    gc.collect()
    print(f"eager: {len(requests)} images in {eager_seconds:.1f} s", flush=True)

    precision = manifest.precision
    results = {}
    for name in args.engines.split(","):
        engine = load_engine(args.model, engine=name, device="cpu")
        actual, seconds = generate(engine, requests)
        del engine
        gc.collect()
        per_image = [psnr_db([a], [e]) for a, e in zip(actual, expected)]
        overall = psnr_db(actual, expected)
        results[name] = {"psnr_db": overall, "psnr_db_per_image": per_image, "min_psnr_db": min(per_image),
                         "seconds": seconds, "passed": min(per_image) >= PSNR_LIMITS_DB[precision]}
        print(f"{name}: PSNR {overall:.1f} dB over {len(per_image)} images (worst {min(per_image):.1f} dB, limit "
              f"{PSNR_LIMITS_DB[precision]:.0f} dB) in {seconds:.1f} s", flush=True)

    report = {"checkpoint": str(args.checkpoint), "model": str(args.model), "precision": precision,
              "steps": args.steps, "prompts": [r.prompt for r in requests], "seeds": [r.seed for r in requests],
              "image_size": manifest.model.image_size, "limit_db": PSNR_LIMITS_DB[precision],
              "eager_seconds": eager_seconds, "engines": results,
              "machine": machine_info()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(result["passed"] for result in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
