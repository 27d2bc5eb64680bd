"""Prompts encoded at their own lengths against padded to the tokenizer's max_length, on one engine dir whose text
encoder takes any length (``ldm-export`` writes one for a model that masks padding): the text encoder's
milliseconds a prompt both ways, and whether whole sampling runs give the same images both ways.

    ldm-export models/shapes-demo --out runs/frontier-demo-fp32 --engine fp32 --batch-range 1:2:32
    OMP_NUM_THREADS=2 python benchmarks/text_by_length.py runs/frontier-demo-fp32 --threads 2 \\
        --json text-by-length.json
    OMP_NUM_THREADS=2 python benchmarks/text_by_length.py runs/frontier-demo-fp32 --threads 2 --engine openvino \\
        --precision bf16 --images 32

Timing: ldm-eval's held-out prompts (seeds 0 on), in batches of ``--batch``, the two ways taking turns for
``--repeats`` rounds (median, lowest and highest). Images: ``--images`` prompts sampled both ways at the model's
default sampler, steps and guidance unless given, compared byte for byte.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine_dir")
    parser.add_argument("--engine", choices=("onnxruntime", "openvino"), default="onnxruntime",
                        help="openvino encodes at max_length by default; this times it both ways too")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="openvino's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="prompts a text encoder call")
    parser.add_argument("--prompts", type=int, default=320, help="prompts a timing round")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for flag, value in (("--threads", args.threads), ("--batch", args.batch), ("--prompts", args.prompts),
                        ("--repeats", args.repeats), ("--images", args.images)):
        if value < 1:
            parser.error(f"{flag} is {value}; expected a positive integer")

    from ldm_runtime.engines import load_engine
    from ldm_runtime.manifest import TEXT_LENGTH
    from ldm_runtime.pipeline import GenerationRequest, Pipeline
    from ldm_tools.bench.cli import machine_info
    from ldm_tools.evaluate import heldout_prompts

    precision = {"precision": args.precision} if args.engine == "openvino" else {}
    engine = load_engine(args.engine_dir, engine=args.engine, intra_op_threads=args.threads, **precision)
    if TEXT_LENGTH not in engine.manifest.dims:
        parser.error(f"{args.engine_dir} has a text encoder of fixed length; expected an engine dir exported with "
                     f"its {TEXT_LENGTH} axis (a model that masks padding, by this ldm-export)")
    prompts, _ = heldout_prompts(max(args.prompts, args.images), engine.info.image_size, 0)
    ways = {"max_length": False, "by_length": True}

    def encode_all(by_length: bool) -> float:
        engine.encodes_by_length = by_length
        start = time.perf_counter()
        for first in range(0, args.prompts, args.batch):
            engine.encode_text(prompts[first:first + args.batch])
        return (time.perf_counter() - start) / args.prompts * 1e3

    for by_length in ways.values():
        encode_all(by_length)  # warm-up
    rounds: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(args.repeats):
        for way, by_length in ways.items():
            rounds[way].append(encode_all(by_length))
    tokens = [int(count) for count in engine.tokenize(prompts[:args.prompts])[1].sum(axis=1)]

    pipeline = Pipeline(engine)
    settings = {key: value for key, value in (("sampler", args.sampler), ("steps", args.steps),
                                              ("guidance_scale", args.guidance)) if value is not None}
    requests = [GenerationRequest(prompt=prompt, seed=seed, **settings) for seed, prompt in
                enumerate(prompts[:args.images])]
    images = {}
    for way, by_length in ways.items():
        engine.encodes_by_length = by_length
        images[way] = pipeline.generate(requests, batch_size=args.batch)
    same = sum(np.array_equal(a, b) for a, b in zip(images["max_length"], images["by_length"]))

    result = {
        "engine_dir": args.engine_dir, "engine": args.engine, **precision, "threads": args.threads,
        "batch": args.batch,
        "prompts": args.prompts, "repeats": args.repeats, "machine": machine_info(),
        "tokens": {"mean": statistics.fmean(tokens), "max_length": engine.manifest.model.text_max_length,
                   "mean_encoded_length": statistics.fmean(engine.manifest.text_length(n) for n in tokens)},
        "ms_per_prompt": {way: {"median": statistics.median(values), "min": min(values), "max": max(values),
                                "rounds": values} for way, values in rounds.items()},
        "images": {"count": args.images, "identical": same, "settings": settings},
    }
    for way in ways:
        spread = result["ms_per_prompt"][way]
        print(f"{way}: {spread['median']:.2f} ms a prompt ({spread['min']:.2f}-{spread['max']:.2f})")
    print(f"tokens a prompt: {result['tokens']['mean']:.1f} on average, encoded at "
          f"{result['tokens']['mean_encoded_length']:.1f} by length, {result['tokens']['max_length']} otherwise")
    print(f"images identical both ways: {same} of {args.images}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if same == args.images else 1


if __name__ == "__main__":
    sys.exit(main())
