"""One UNet call of an engine dir on the CPU engines, interleaved: openvino and onnxruntime (and, with
``--fused-unet``, onnxruntime on a UNet rewritten by onnxruntime's transformer optimizer).

    python benchmarks/bench_engine_unet.py ENGINE_DIR [--threads 1] [--rows 2,16] [--repeats 45]
        [--fused-unet unet_fused.onnx]

Each round calls every engine once on the same inputs, the first engine rotating from round to round, so
slow drifts in the machine's load fall on all of them alike. Per engine it prints the median wall time (and
its interquartile range), the median CPU time of this process (on a machine shared with other jobs the CPU
time is the steadier figure), the median and interquartile range of the per-round speed-up over onnxruntime,
and the relative error of the output against onnxruntime's. Inputs: latents at the export's opt size, random
timesteps, random context, a mask with random padding in its second half.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def quartiles(values: list[float]) -> tuple[float, float]:
    first, _, third = statistics.quantiles(values, n=4)
    return first, third


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="2,16", help="UNet batch sizes (guidance doubles the images)")
    parser.add_argument("--repeats", type=int, default=45)
    parser.add_argument("--fused-unet", default=None, metavar="ONNX",
                        help="a UNet rewritten by onnxruntime.transformers.optimizer, timed as 'ort-fused'")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import onnxruntime as ort

    from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
    from ldm_runtime.engines.openvino_engine import OpenVinoEngine

    engines = {"onnxruntime": OnnxRuntimeEngine(args.engine_dir, intra_op_threads=args.threads, verify=False),
               "openvino": OpenVinoEngine(args.engine_dir, intra_op_threads=args.threads, verify=False)}
    if args.fused_unet:
        fused = OnnxRuntimeEngine(args.engine_dir, intra_op_threads=args.threads, verify=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.log_severity_level = 3
        fused.sessions["unet"] = ort.InferenceSession(args.fused_unet, options, providers=["CPUExecutionProvider"])
        engines["ort-fused"] = fused
    manifest = engines["onnxruntime"].manifest
    tokens, width = manifest.graphs["unet"].inputs[2].shape[1:]
    side = manifest.dims["latent_height"].opt
    rng = np.random.default_rng(args.seed)
    names = list(engines)
    for rows in (int(value) for value in args.rows.split(",")):
        latents = rng.standard_normal((rows, manifest.model.latent_channels, side, side)).astype(np.float32)
        timesteps = rng.integers(0, 1000, rows)
        context = rng.standard_normal((rows, tokens, width)).astype(np.float32)
        mask = np.ones((rows, tokens), dtype=bool)
        mask[:, tokens // 2:] = rng.random((rows, tokens - tokens // 2)) < 0.5
        outputs = {name: engine.unet(latents, timesteps, context, mask) for name, engine in engines.items()}  # warm
        reference = outputs["onnxruntime"]
        wall = {name: [] for name in names}
        cpu = {name: [] for name in names}
        for round_index in range(args.repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                cpu_start, wall_start = time.process_time(), time.perf_counter()
                engines[name].unet(latents, timesteps, context, mask)
                wall[name].append(time.perf_counter() - wall_start)
                cpu[name].append(time.process_time() - cpu_start)
        for name in names:
            wall_ratio = [base / own for own, base in zip(wall[name], wall["onnxruntime"])]
            cpu_ratio = [base / own for own, base in zip(cpu[name], cpu["onnxruntime"])]
            error = np.linalg.norm(outputs[name] - reference) / np.linalg.norm(reference)
            print(f"threads {args.threads} rows {rows:3d} {name:12s} wall {statistics.median(wall[name]) * 1e3:7.1f} ms "
                  f"(IQR {quartiles(wall[name])[0] * 1e3:.1f}-{quartiles(wall[name])[1] * 1e3:.1f})  "
                  f"cpu {statistics.median(cpu[name]) * 1e3:7.1f} ms  "
                  f"x ort: wall {statistics.median(wall_ratio):.2f} ({quartiles(wall_ratio)[0]:.2f}-"
                  f"{quartiles(wall_ratio)[1]:.2f}), cpu {statistics.median(cpu_ratio):.2f} "
                  f"({quartiles(cpu_ratio)[0]:.2f}-{quartiles(cpu_ratio)[1]:.2f})  rel. err {error:.1e}", flush=True)


if __name__ == "__main__":
    main()
