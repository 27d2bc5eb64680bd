"""Where a batch's time goes in ``Pipeline.generate``: the text encoder, one UNet call, the decoder, and the whole
request batch at a given sampler, steps and guidance, per image; the rest of the whole (the sampler's updates,
noise, conversions) is what the three stages leave. What does not shrink with the steps bounds what fewer steps
can save.

    ldm-export models/shapes-demo --out runs/frontier-demo-fp32 --engine fp32 --batch-range 1:2:32
    OMP_NUM_THREADS=2 python benchmarks/pipeline_stages.py runs/frontier-demo-fp32 --engine onnxruntime \\
        --threads 2 --batch 16 --sampler ddim --steps 5 --guidance 3 --json stages.json

Every figure is the median of ``--repeats`` timings after one warm-up call of each, the stages taking turns so that
the machine's drift reaches them alike; the UNet is timed at the batch's rows with guidance (2 per image) and
without (1 per image).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine_dir")
    parser.add_argument("--engine", choices=("onnxruntime", "openvino"), default="onnxruntime")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="openvino's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="images in the batch")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for flag, value in (("--threads", args.threads), ("--batch", args.batch), ("--steps", args.steps),
                        ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{flag} is {value}; expected a positive integer")

    from ldm_runtime.engines import load_engine
    from ldm_runtime.pipeline import GenerationRequest, Pipeline
    from ldm_tools.bench.cli import machine_info
    from ldm_tools.evaluate import heldout_prompts

    precision = {"precision": args.precision} if args.engine == "openvino" else {}
    engine = load_engine(args.engine_dir, engine=args.engine, intra_op_threads=args.threads, **precision)
    if args.batch > engine.info.max_images:
        parser.error(f"--batch is {args.batch}; the engine dir holds at most {engine.info.max_images} images a call")
    pipeline = Pipeline(engine)
    info = engine.info
    captions, _ = heldout_prompts(args.batch, info.image_size, 0)
    size = info.image_size // info.latent_factor
    rng = np.random.default_rng(0)
    context, mask = engine.encode_text(captions + [""])
    rows = {"unguided": args.batch, "guided": 2 * args.batch}
    latents = {name: engine.to_array(rng.standard_normal((count, info.latent_channels, size, size), np.float32))
               for name, count in rows.items()}
    contexts = {name: (context[np.arange(count) % len(captions)], mask[np.arange(count) % len(captions)])
                for name, count in rows.items()}
    requests = [GenerationRequest(prompt=caption, seed=index, sampler=args.sampler, steps=args.steps,
                                  guidance_scale=args.guidance) for index, caption in enumerate(captions)]
    stages: dict[str, Callable[[], Any]] = {
        "text encoder": lambda: engine.encode_text(captions + [""]),
        "UNet call, 1 row an image": lambda: engine.unet(latents["unguided"], np.full(rows["unguided"], 500, np.int64),
                                                         *contexts["unguided"]),
        "UNet call, 2 rows an image": lambda: engine.unet(latents["guided"], np.full(rows["guided"], 500, np.int64),
                                                          *contexts["guided"]),
        "decoder": lambda: engine.decode(latents["unguided"]),
        "whole batch": lambda: pipeline.generate(requests, batch_size=args.batch),
    }
    seconds: dict[str, list[float]] = {name: [] for name in stages}
    for run in stages.values():
        run()  # warm-up
    for _ in range(args.repeats):
        for name, run in stages.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    per_image_ms = {name: 1000 * statistics.median(values) / args.batch for name, values in seconds.items()}
    guided = args.guidance != 1.0
    unet_ms = args.steps * per_image_ms["UNet call, 2 rows an image" if guided else "UNet call, 1 row an image"]
    per_image_ms["rest of the whole (sampler updates, noise, conversions)"] = (
        per_image_ms["whole batch"] - per_image_ms["text encoder"] - per_image_ms["decoder"] - unet_ms)
    for name, value in per_image_ms.items():
        print(f"{name}: {value:.2f} ms an image", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": machine_info(), "settings": {key: str(value) if isinstance(value, Path) else value
                                                    for key, value in vars(args).items()},
            "per_image_ms": {name: round(value, 3) for name, value in per_image_ms.items()},
            "seconds": seconds}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
