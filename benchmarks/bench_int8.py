"""int8 UNets on the openvino engine: what they cost in fidelity against eager PyTorch fp32 and what they gain
in speed against the fp32 openvino engine.

    ldm-export models/shapes-demo --out /tmp/demo-fp32 --engine fp32 --batch-range 1:2:16 --skip-validation
    OMP_NUM_THREADS=2 PYTHONPATH=/path/to/nncf python benchmarks/bench_int8.py /tmp/demo-fp32 \
        --checkpoint models/shapes-demo --threads 2 --json benchmarks/results/cpu-int8-demo.json

Two int8 UNets, both made with NNCF (``pip install nncf``; not a dependency of the project):

- ``int8-ptq``: post-training quantization of weights and activations (``nncf.quantize``, transformer model
  type), calibrated on the UNet inputs of real sampling runs: ``--calibration-prompts`` training-split captions
  of the shapes set, 25 guided DDIM steps each, recorded from the fp32 openvino engine;
- ``int8-weights``: NNCF's data-free int8 weight compression (``nncf.compress_weights``, INT8_ASYM), activations
  left in fp32.

Fidelity: the held-out prompts of ``ldm-eval`` (``--prompts`` of them, seed i for prompt i), 25 DDIM steps,
guidance 5, through eager PyTorch fp32 (the reference), the fp32 openvino engine and each int8 variant; the
PSNR of each image against the reference (the issue's bar: >= 30 dB for reduced precision, >= 40 dB for fp32).
Speed: one UNet call at each of ``--rows``, the variants taking turns round by round, median milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

STEPS = 25
GUIDANCE = 5.0


def record_unet_inputs(engine, pipeline, prompts: list[str]) -> list[dict[str, np.ndarray]]:
    """The feeds of every UNet call while ``pipeline`` makes one image per prompt (2 guided rows a call)."""
    from ldm_runtime.pipeline import GenerationRequest

    recorded: list[dict[str, np.ndarray]] = []
    original = engine.run

    def recording_run(graph, feeds):
        if graph == "unet":
            recorded.append({name: np.array(value) for name, value in engine.cast_inputs(graph, feeds).items()})
        return original(graph, feeds)

    engine.run = recording_run
    try:
        for index, prompt in enumerate(prompts):
            pipeline.generate([GenerationRequest(prompt=prompt, seed=10_000 + index, sampler="ddim", steps=STEPS,
                                                 guidance_scale=GUIDANCE)], batch_size=1)
    finally:
        engine.run = original
    return recorded


def images(pipeline, prompts: list[str]) -> list[np.ndarray]:
    from ldm_runtime.pipeline import GenerationRequest

    requests = [GenerationRequest(prompt=prompt, seed=index, sampler="ddim", steps=STEPS, guidance_scale=GUIDANCE)
                for index, prompt in enumerate(prompts)]
    return [np.asarray(image) for image in pipeline.generate(requests, batch_size=1)]


def unet_call_ms(engine, rows: int, rng: np.random.Generator) -> Callable[[], float]:
    manifest = engine.manifest
    tokens, width = manifest.graphs["unet"].inputs[2].shape[1:]
    side = manifest.model.image_size // manifest.model.latent_factor
    latents = rng.standard_normal((rows, manifest.model.latent_channels, side, side)).astype(np.float32)
    timesteps = rng.integers(0, 1000, rows)
    context = rng.standard_normal((rows, tokens, width)).astype(np.float32)
    mask = np.ones((rows, tokens), dtype=bool)

    def call() -> float:
        started = time.perf_counter()
        engine.unet(latents, timesteps, context, mask)
        return 1000 * (time.perf_counter() - started)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", help="an fp32 engine dir of the model (ldm-export --engine fp32)")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint dir it was exported from (the reference)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts for the fidelity check")
    parser.add_argument("--calibration-prompts", type=int, default=8)
    parser.add_argument("--rows", default="2,16", help="UNet rows of the timed calls")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import nncf
    import torch

    from ldm_export.validate import psnr_db
    from ldm_runtime.engines import load_engine
    from ldm_runtime.engines.openvino_engine import OpenVinoEngine
    from ldm_runtime.pipeline import Pipeline
    from ldm_train.data.shapes import ShapesDataset

    torch.set_num_threads(args.threads)
    heldout = ShapesDataset.heldout(args.prompts, 32, seed=0)
    eval_prompts = [heldout[i][1] for i in range(args.prompts)]
    train_set = ShapesDataset(args.calibration_prompts, 32, seed=0)
    calibration_prompts = [train_set[i][1] for i in range(args.calibration_prompts)]

    def openvino() -> OpenVinoEngine:
        return OpenVinoEngine(args.engine_dir, intra_op_threads=args.threads, verify=False, cache_dir=None)

    fp32 = openvino()
    started = time.perf_counter()
    feeds = record_unet_inputs(fp32, Pipeline(fp32), calibration_prompts)
    record_s = time.perf_counter() - started
    shapes = {name: list(value.shape) for name, value in feeds[0].items()}

    def fixed_unet():
        model = fp32.models["unet"].clone()
        model.reshape(shapes)
        return model

    started = time.perf_counter()
    ptq = nncf.quantize(fixed_unet(), nncf.Dataset(feeds), subset_size=len(feeds),
                        model_type=nncf.ModelType.TRANSFORMER)
    ptq_s = time.perf_counter() - started
    started = time.perf_counter()
    weights = nncf.compress_weights(fixed_unet(), mode=nncf.CompressWeightsMode.INT8_ASYM)
    weights_s = time.perf_counter() - started
    variants = {"openvino-fp32": fp32}
    for name, model in (("int8-ptq", ptq), ("int8-weights", weights)):
        engine = openvino()
        engine.models["unet"] = model  # reshaped per batch bucket on first use, as the fp32 graph is
        variants[name] = engine

    reference = images(Pipeline(load_engine(args.checkpoint, engine="torch")), eval_prompts)
    fidelity = {}
    for name, engine in variants.items():
        psnrs = [psnr_db([image], [reference_image]) for reference_image, image in
                 zip(reference, images(Pipeline(engine), eval_prompts))]
        fidelity[name] = {"psnr_db_mean": float(np.mean(psnrs)), "psnr_db_min": float(np.min(psnrs))}

    speed = {}
    for rows in (int(value) for value in args.rows.split(",")):
        calls = {name: unet_call_ms(engine, rows, np.random.default_rng(rows)) for name, engine in variants.items()}
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():
            call()  # compile this bucket, warm up
        names = list(calls)
        for repeat in range(args.repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                samples[name].append(calls[name]())
        base = statistics.median(samples["openvino-fp32"])
        speed[str(rows)] = {name: {"median_ms": statistics.median(values),
                                   "speedup_vs_fp32": base / statistics.median(values)}
                            for name, values in samples.items()}

    report = {"engine_dir": args.engine_dir, "checkpoint": args.checkpoint, "threads": args.threads,
              "model": fp32.manifest.raw["model"], "prompts": len(eval_prompts), "calibration_prompts": len(calibration_prompts),
              "calibration_unet_calls": len(feeds), "record_s": record_s, "quantize_s": ptq_s,
              "compress_weights_s": weights_s, "nncf": nncf.__version__, "fidelity": fidelity, "speed": speed}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
