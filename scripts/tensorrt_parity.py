"""The tensorrt engine against the onnxruntime engine on the same engine dir, on a CUDA GPU with TensorRT.

    python scripts/tensorrt_parity.py [--json results.json] [--precisions fp32,fp16] [--work DIR]

For each precision: a random-weight ``tiny`` checkpoint is exported with ``--backend tensorrt`` (ONNX graphs,
validated against eager PyTorch, then one TensorRT plan per graph); both engines then run

- every graph on the same random inputs, at UNet batches 1, 3 (padded to bucket 4) and 8, interleaved so that
  the CUDA graphs of different buckets replay one after another (relative error, TensorRT vs onnxruntime);
- one row alone and inside a full bucket (the largest |difference|: 0 means batch invariant);
- a whole sampling run of 4 requests, 25 DDIM steps (PSNR of the images, TensorRT vs onnxruntime);
- the UNet call at batch 2 and 8, with and without CUDA graphs (median ms of 50 calls, CUDA events).

Pass: per-graph relative error <= 1e-3 (fp32) / 2e-2 (fp16), images >= 40 dB (fp32) / 30 dB (fp16), a row in
its bucket equal to the row alone. The numbers go to --json; the exit status is 1 if a check failed, 2 if this
machine cannot run the check (no tensorrt, no GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RELATIVE_ERROR = {"fp32": 1e-3, "fp16": 2e-2}
MIN_PSNR_DB = {"fp32": 40.0, "fp16": 30.0}
PROMPTS = ["a red circle", "two blue squares on a green background", "a yellow triangle", ""]


def relative_error(actual, expected) -> float:
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(actual, dtype=np.float64) - expected) / np.linalg.norm(expected))


def unet_inputs(rng: np.random.Generator, rows: int, size: int, length: int, width: int):
    latents = rng.standard_normal((rows, 4, size, size)).astype(np.float32)
    timesteps = rng.integers(0, 1000, rows).astype(np.int64)
    context = rng.standard_normal((rows, length, width)).astype(np.float32)
    mask = np.ones((rows, length), dtype=bool)
    mask[:, rng.integers(1, length):] = False
    return latents, timesteps, context, mask


def time_unet_ms(engine, inputs, calls: int = 50) -> float:
    """Median milliseconds of one UNet call (inputs already on the GPU), CUDA events around each call."""
    import torch

    latents, timesteps, context, mask = inputs
    for _ in range(5):
        engine.unet(latents, timesteps, context, mask)
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        engine.unet(latents, timesteps, context, mask)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_precision(precision: str, work: Path, seed: int) -> dict:
    from ldm_export.cli import main as export_main
    from ldm_export.validate import psnr_db
    from ldm_runtime.config import preset
    from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
    from ldm_runtime.engines.tensorrt_engine import TensorRtEngine
    from ldm_runtime.pipeline import GenerationRequest, Pipeline
    from ldm_train.checkpoint import write_random_checkpoint

    checkpoint, engine_dir = work / f"checkpoint-{precision}", work / f"engine-{precision}"
    config = preset("tiny")
    write_random_checkpoint(checkpoint, config, seed)
    code = export_main([str(checkpoint), "--out", str(engine_dir), "--engine", precision, "--backend", "tensorrt"])
    if code != 0:
        return {"precision": precision, "passed": False, "failures": [f"ldm-export exited {code}"]}
    reference = OnnxRuntimeEngine(engine_dir, device="cpu")
    engine = TensorRtEngine(engine_dir)
    rng = np.random.default_rng(seed)
    length, width = config.text_encoder.max_length, engine.manifest.model.context_dim
    errors: dict[str, float] = {}

    context, _ = engine.encode_text(PROMPTS)
    errors["text_encoder"] = relative_error(engine.to_host(context), reference.encode_text(PROMPTS)[0])
    for rows in (1, 3, 8, 3, 1):  # bucket 1, 4, 8, then 4 and 1 again: graphs replayed after others
        inputs = unet_inputs(rng, rows, 8, length, width)
        output = engine.unet(engine.to_array(inputs[0]), inputs[1], engine.to_array(inputs[2]),
                             engine.to_array(inputs[3]))
        key = f"unet_batch_{rows}"
        errors[key] = max(errors.get(key, 0.0), relative_error(engine.to_host(output), reference.unet(*inputs)))
    latents = rng.standard_normal((3, 4, 12, 12)).astype(np.float32)
    errors["vae_decoder"] = relative_error(engine.to_host(engine.decode(engine.to_array(latents))),
                                           reference.decode(latents))
    images = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    errors["vae_encoder"] = relative_error(engine.to_host(engine.encode_images(engine.to_array(images))),
                                           reference.encode_images(images))

    inputs = unet_inputs(rng, 4, 8, length, width)
    device_inputs = (engine.to_array(inputs[0]), inputs[1], engine.to_array(inputs[2]), engine.to_array(inputs[3]))
    together = engine.to_host(engine.unet(*device_inputs))
    alone = engine.to_host(engine.unet(device_inputs[0][:3], inputs[1][:3], device_inputs[2][:3],
                                       device_inputs[3][:3]))
    bucket_difference = float(np.abs(alone - together[:3]).max())

    requests = [GenerationRequest(prompt=prompt or "a circle", seed=seed + index, steps=25)
                for index, prompt in enumerate(PROMPTS)]
    psnr = psnr_db(Pipeline(engine).generate(requests), Pipeline(reference).generate(requests))

    timings = {}
    for rows in (2, 8):
        inputs = unet_inputs(rng, rows, 8, length, width)
        device_inputs = (engine.to_array(inputs[0]), inputs[1], engine.to_array(inputs[2]),
                         engine.to_array(inputs[3]))
        timings[f"unet_batch_{rows}_graph_ms"] = time_unet_ms(engine, device_inputs)
        uncaptured = TensorRtEngine(engine_dir, cuda_graphs=False)
        timings[f"unet_batch_{rows}_no_graph_ms"] = time_unet_ms(uncaptured, device_inputs)

    failures = [f"{graph} relative error {error:.2e} > {RELATIVE_ERROR[precision]:.0e}"
                for graph, error in errors.items() if not error <= RELATIVE_ERROR[precision]]
    if bucket_difference != 0.0:
        failures.append(f"a row alone differs from the same row in its bucket by {bucket_difference:.2e}")
    if not psnr >= MIN_PSNR_DB[precision]:
        failures.append(f"images {psnr:.1f} dB < {MIN_PSNR_DB[precision]} dB")
    return {"precision": precision, "tensorrt": engine.manifest.tensorrt["tensorrt_version"],
            "gpu": engine.manifest.tensorrt["gpu_name"], "relative_error": errors,
            "bucket_row_difference": bucket_difference, "images_psnr_db": psnr, "unet_timing": timings,
            "captured_shapes": [list(map(str, shape)) for shape in engine.captured_shapes],
            "passed": not failures, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--precisions", default="fp32,fp16", help="comma-separated (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the checkpoints and engine dirs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from ldm_runtime.engines.tensorrt_plans import tensorrt_missing

    missing = tensorrt_missing("tensorrt_parity")
    if missing:
        print(f"tensorrt_parity: skipped: {missing}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        results = [check_precision(precision, work, args.seed) for precision in args.precisions.split(",")]
    for result in results:
        print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    failed = [result["precision"] for result in results if not result["passed"]]
    print(f"tensorrt_parity: {'FAILED ' + ', '.join(failed) if failed else 'passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
