"""One UNet call on OpenVINO compiled for fixed shapes (one compile per row count) against one compile whose batch
axis is a range (1 to the engine dir's largest batch): the two ways the openvino engine compiles a graph.

    OMP_NUM_THREADS=1 python benchmarks/bench_openvino_shapes.py engines/sd15 --threads 1 --rows 2,16 --rounds 7

Calls are interleaved round by round (both ways, every row count); prints the median and fastest call per way and
row count, the compile time and first call, and the process's anonymous memory after each compile (OpenVINO maps
the weights file it reads, so what a compile adds shows there, apart from the page cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def anonymous_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="2,16", help="UNet rows per call, comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    import openvino

    manifest = json.loads((args.engine_dir / "manifest.json").read_text())
    dims, inputs = manifest["dims"], manifest["graphs"]["unet"]["inputs"]
    spatial = {"latent_height": dims["latent_height"]["opt"], "latent_width": dims["latent_width"]["opt"]}
    rows_list = [int(rows) for rows in args.rows.split(",")]
    if max(rows_list) > dims["batch"]["max"]:
        parser.error(f"--rows {args.rows} passes the engine dir's largest batch {dims['batch']['max']}")
    core = openvino.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
              "INFERENCE_NUM_THREADS": str(args.threads)}
    model = core.read_model(str(args.engine_dir / manifest["graphs"]["unet"]["file"]))
    print(f"read the UNet: anonymous memory {anonymous_gib():.2f} GiB", flush=True)

    def shapes(rows: int | None) -> dict:
        batch = openvino.Dimension(1, dims["batch"]["max"]) if rows is None else rows
        return {t["name"]: openvino.PartialShape([batch if axis == "batch" else spatial.get(axis, axis)
                                                  for axis in t["shape"]]) for t in inputs}

    def feeds(rows: int) -> dict[str, np.ndarray]:
        rng, out = np.random.default_rng(0), {}
        for t in inputs:
            shape, dtype = [rows if a == "batch" else spatial.get(a, a) for a in t["shape"]], np.dtype(t["dtype"])
            out[t["name"]] = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                              else np.full(shape, 500, dtype) if dtype.kind in "iu" else np.ones(shape, dtype))
        return out

    def compile_for(rows: int | None):
        reshaped = model.clone()
        reshaped.reshape(shapes(rows))
        started = time.perf_counter()
        request = core.compile_model(reshaped, "CPU", config).create_infer_request()
        return request, time.perf_counter() - started

    requests, times = {}, {}
    for way in ("fixed", "range"):
        for rows in rows_list:
            if way == "fixed" or rows == rows_list[0]:  # the range's one compile serves every row count
                request, seconds = compile_for(rows if way == "fixed" else None)
                print(f"{way} compile ({rows if way == 'fixed' else 'all'} rows): {seconds:.1f} s, anonymous memory "
                      f"{anonymous_gib():.2f} GiB", flush=True)
            requests[way, rows] = request
            started = time.perf_counter()
            requests[way, rows].infer(feeds(rows))
            print(f"{way} first call, {rows} rows: {time.perf_counter() - started:.2f} s", flush=True)
            times[way, rows] = []
    for _ in range(args.rounds):
        for rows in rows_list:
            for way in ("fixed", "range"):
                inputs_now = feeds(rows)
                started = time.perf_counter()
                requests[way, rows].infer(inputs_now)
                times[way, rows].append(time.perf_counter() - started)
    for rows in rows_list:
        fixed, ranged_ms = (1000 * statistics.median(times[w, rows]) for w in ("fixed", "range"))
        print(f"{rows} rows: fixed {fixed:.1f} ms (min {1000 * min(times['fixed', rows]):.1f}), range "
              f"{ranged_ms:.1f} ms (min {1000 * min(times['range', rows]):.1f}), range / fixed {ranged_ms / fixed:.2f}")


if __name__ == "__main__":
    main()
