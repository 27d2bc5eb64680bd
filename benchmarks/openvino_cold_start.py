"""The openvino engine's cold start: where the seconds before its first image go, per graph, batch bucket and
precision, with the compile cache empty (cold) and filled (warm), beside onnxruntime's first image.

    python -c "from ldm_tools.bench.sources import *; write_preset_checkpoint('sd15', 16, 'sd15-ckpt'); \\
        export_onnxruntime_engine('sd15-ckpt', 'sd15-engine', 16, 128, 128)"
    mkdir /tmp/before && cp -r ldm_* benchmarks /tmp/before/     # the code to compare with: this tree, with
    git show BASE:ldm_runtime/engines/openvino_engine.py > /tmp/before/ldm_runtime/engines/openvino_engine.py
    OMP_NUM_THREADS=1 python benchmarks/openvino_cold_start.py sd15-engine --threads 1 --precisions fp32,bf16 \\
        --rounds 2 --label after --compare before=/tmp/before \\
        --json benchmarks/results/cpu-openvino-cold-start-sd15.json

First image: each run is a fresh process, spawned as ldm-bench spawns its workers and timed the same way, from the
moment the parent starts it to the end of one guided request (DDIM, ``--steps`` steps, guidance 5, the engine dir's
image size: ldm-bench's first image). Per round and precision: the engine with its compile cache off (what
ldm-bench's openvino peers do), then with a fresh cache folder twice (cold, then warm), with ``--compare``'s code
and, right after, with this tree's, so that both see the same load on the machine; then onnxruntime once. Each run
records its import, engine construction, every compile (seconds, and whether it came from the compile cache), the
first call of each graph at each row count (after its compile), its peak resident memory and the load average.

Per bucket (``--buckets``): in one fresh process per precision, cache off, each graph called at each bucket's rows
in turn, twice: the compile it triggers, its first call and its second (the steady call).

Compile cache per graph (``--cache-probe``, for every graph under 1 GiB of weights: SD's UNet's figures are the
first-image runs'): the graph compiled at 2 rows with the cache off, then into an empty cache (compile and store),
then by a new engine from that cache (read, check, import), each the fastest of ``--repeats``; with the engine's
``CACHE_UP_TO_BYTES`` lifted, so that every graph goes through the cache. Works on any engine dir (the demo model's:
where the cache pays).

Every cache folder is a temporary folder deleted after its runs: at SD's size one entry is GBs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "a large red circle on the left, on a blue background"  # ldm-bench's
GUIDANCE_SCALE = 5.0  # ldm-bench's


def instrument(records: dict[str, list]) -> None:
    """Record every compile (graph, shapes, seconds, from the cache or not) and the first call of each graph at
    each row count (seconds, without the compile it triggered) of every OpenVinoEngine in this process."""
    from ldm_runtime.engines.openvino_engine import OpenVinoEngine

    compile_graph, import_cached, run = OpenVinoEngine._compile, OpenVinoEngine._import_cached, OpenVinoEngine.run
    hits: list[bool] = []

    def timed_compile(self, graph, shapes, **extra):
        hits.clear()
        started = time.perf_counter()
        compiled = compile_graph(self, graph, shapes, **extra)
        records["compiles"].append({"graph": graph, "shapes": {name: list(shape) for name, shape in shapes.items()},
                                    "seconds": round(time.perf_counter() - started, 3),
                                    "from_cache": bool(hits and hits[-1])})
        return compiled

    def noted_import(self, key, config):
        compiled = import_cached(self, key, config)
        hits.append(compiled is not None)
        return compiled

    seen = set()

    def timed_run(self, graph, feeds):
        rows = next(iter(feeds.values())).shape[0]
        compiles = len(records["compiles"])
        started = time.perf_counter()
        outputs = run(self, graph, feeds)
        seconds = time.perf_counter() - started - sum(entry["seconds"] for entry in records["compiles"][compiles:])
        if (graph, rows) not in seen:
            seen.add((graph, rows))
            records["first_calls"].append({"graph": graph, "rows": rows, "seconds": round(seconds, 3)})
        return outputs

    OpenVinoEngine._compile, OpenVinoEngine._import_cached, OpenVinoEngine.run = timed_compile, noted_import, timed_run


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def first_image_child(connection, source: str | None, engine: str, engine_dir: str, precision: str, threads: int,
                      cache_dir: str | None, steps: int) -> None:
    """In a spawned process: build the engine from the code in ``source`` (None: this tree), make ldm-bench's first
    image, send what it took."""
    try:
        records: dict[str, list] = {"compiles": [], "first_calls": []}
        started = time.time()
        if source is not None:
            sys.path.insert(0, source)
        from ldm_runtime.pipeline import GenerationRequest, Pipeline

        if engine == "openvino":
            from ldm_runtime.engines.openvino_engine import OpenVinoEngine

            instrument(records)
            imported = time.time()
            built = OpenVinoEngine(engine_dir, precision=precision, intra_op_threads=threads, cache_dir=cache_dir)
        else:
            from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine

            imported = time.time()
            built = OnnxRuntimeEngine(engine_dir, intra_op_threads=threads)
        loaded = time.time()
        size = built.info.image_size
        request = GenerationRequest(prompt=PROMPT, seed=0, sampler="ddim", steps=steps, guidance_scale=GUIDANCE_SCALE,
                                    height=size, width=size)
        image = Pipeline(built).generate([request], batch_size=1)[0]
        import ldm_runtime

        connection.send(("ok", {"code": str(Path(ldm_runtime.__file__).parents[1]),
                                "imports_s": round(imported - started, 3), "engine_s": round(loaded - imported, 3),
                                "generate_s": round(time.time() - loaded, 3), "ready_at": time.time(),
                                "image_std": float(np.asarray(image).std()), "peak_rss_gib": peak_rss_gib(),
                                **records}))
    except BaseException as error:  # the parent reports it and goes on with the next run
        connection.send(("error", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"))


def buckets_child(connection, engine_dir: str, precision: str, threads: int, buckets: list[int]) -> None:
    """In a spawned process: every graph of the first image at each bucket's rows, twice, cache off."""
    try:
        records: dict[str, list] = {"compiles": [], "first_calls": []}
        from ldm_runtime.engines.openvino_engine import OpenVinoEngine

        instrument(records)
        engine = OpenVinoEngine(engine_dir, precision=precision, intra_op_threads=threads, cache_dir=None)
        rng = np.random.default_rng(0)
        channels, latent = engine.info.latent_channels, engine.info.image_size // engine.info.latent_factor
        calls = {  # graph -> (rows -> its arguments, made before the clock starts; the call)
            "text_encoder": (lambda rows: [[PROMPT] * rows], engine.encode_text),
            "unet": (lambda rows: [rng.standard_normal((rows, channels, latent, latent)).astype(np.float32),
                                   np.full(rows, 500), *engine.encode_text([PROMPT] * rows)], engine.unet),
            "vae_decoder": (lambda rows: [rng.standard_normal((rows, channels, latent, latent)).astype(np.float32)],
                            engine.decode),
        }
        table = []
        for graph, (arguments, call) in calls.items():
            for rows in [rows for rows in buckets if rows <= engine.info.max_batch_size]:
                values, seconds, compile_s = arguments(rows), [], 0.0
                for _ in range(2):
                    compiles = len(records["compiles"])
                    started = time.perf_counter()
                    call(*values)
                    seconds.append(time.perf_counter() - started)
                    compile_s += sum(entry["seconds"] for entry in records["compiles"][compiles:])
                table.append({"graph": graph, "rows": rows, "compile_s": round(compile_s, 3),
                              "first_call_s": round(seconds[0] - compile_s, 3), "second_call_s": round(seconds[1], 3)})
        connection.send(("ok", {"table": table, "compiles": records["compiles"], "peak_rss_gib": peak_rss_gib(),
                                "compiled_once_for_every_bucket": sorted(name for name, per in engine.per_bucket.items()
                                                                         if not per)}))
    except BaseException as error:
        connection.send(("error", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"))


def cache_child(connection, engine_dir: str, precision: str, threads: int, cache_root: str | None,
                repeats: int) -> None:
    """In a spawned process: each graph's compile with the cache off, into an empty cache, and from it."""
    try:
        from ldm_runtime.engines import openvino_engine

        openvino_engine.CACHE_UP_TO_BYTES = float("inf")  # every graph through the cache, to time it

        def engine(cache_dir):
            return openvino_engine.OpenVinoEngine(engine_dir, precision=precision, intra_op_threads=threads,
                                                  verify=False, cache_dir=cache_dir)

        probe = engine(None)
        table = []
        for graph, entry in probe.manifest.graphs.items():
            weights = probe._weight_bytes(graph)
            if weights >= 2**30:
                continue
            shapes = {spec.name: tuple(2 if axis == "batch" else axis if isinstance(axis, int)
                                       else probe.manifest.dims[axis].opt for axis in spec.shape)
                      for spec in entry.inputs}
            seconds: dict[str, list[float]] = {"compile": [], "compile_and_store": [], "read_check_import": []}
            for _ in range(repeats):
                folder = Path(tempfile.mkdtemp(prefix="ov-cache-probe-", dir=cache_root))
                try:
                    for stage, cache_dir in (("compile", None), ("compile_and_store", folder),
                                             ("read_check_import", folder)):
                        fresh = engine(cache_dir)
                        started = time.perf_counter()
                        fresh._request(graph, shapes)
                        seconds[stage].append(time.perf_counter() - started)
                        del fresh
                    blob_bytes = sum(path.stat().st_size for path in folder.glob("*.blob"))
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
            table.append({"graph": graph, "weights_mb": round(weights / 2**20, 1),
                          "blob_mb": round(blob_bytes / 2**20, 1),
                          **{f"{stage}_s": round(min(values), 3) for stage, values in seconds.items()}})
        connection.send(("ok", {"table": table}))
    except BaseException as error:
        connection.send(("error", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"))


def spawn(target, *args) -> tuple[dict[str, Any] | None, float]:
    """Run ``target(connection, *args)`` in a spawned process; (what it sent or None after an error, seconds
    from its start to its answer's ``ready_at``, or to its answer)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    started = time.time()
    process = context.Process(target=target, args=(sender, *args), daemon=True)
    process.start()
    sender.close()
    try:
        status, value = receiver.recv()
    except EOFError:
        status, value = "error", f"the process died with exit code {process.exitcode}"
    process.join()
    if status == "error":
        print(f"  failed: {value}", flush=True)
        return {"error": value}, float("nan")
    return value, value.pop("ready_at", time.time()) - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine_dir")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps of the first image (ldm-bench's sd15 run: 2)")
    parser.add_argument("--rounds", type=int, default=1, help="times every first-image run is made")
    parser.add_argument("--buckets", default="1,2,4,8,16", help="rows per call in the per-bucket part ('' skips it)")
    parser.add_argument("--cache-root", default=None, help="where the temporary cache folders go (default: TMPDIR)")
    parser.add_argument("--first-image", default="yes", choices=("yes", "no"), help="make the first-image runs")
    parser.add_argument("--cache-probe", action="store_true", help="time each graph's compile against the cache")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each --cache-probe stage")
    parser.add_argument("--label", default="this tree", help="the name of this tree's runs")
    parser.add_argument("--compare", default=None, metavar="LABEL=DIR",
                        help="also make every first-image run with the code in DIR (a copy of the packages with an "
                             "earlier engine), round by round beside this tree's, named LABEL")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from ldm_tools.bench.cli import machine_info

    precisions = args.precisions.split(",")
    sources: dict[str, str | None] = {args.label: None}
    if args.compare:
        label, _, folder = args.compare.partition("=")
        if not (label and Path(folder, "ldm_runtime").is_dir()):
            parser.error(f"--compare {args.compare!r}: expected LABEL=DIR, DIR holding the ldm_runtime package")
        sources = {label: str(Path(folder).resolve()), **sources}
    first_images: list[dict[str, Any]] = []

    def run(label: str, round_index: int, engine: str, precision: str | None, cache: str,
            cache_dir: str | None) -> None:
        result, seconds = spawn(first_image_child, sources[label], engine, args.engine_dir, precision or "fp32",
                                args.threads, cache_dir, args.steps)
        if cache_dir is not None:
            result["cache_bytes"] = sum(path.stat().st_size for path in Path(cache_dir).iterdir() if path.is_file())
        first_images.append({"round": round_index, "engine": engine, "precision": precision,
                             "compile_cache": cache, "first_image_s": round(seconds, 2),
                             "load_average_1min": round(os.getloadavg()[0], 2), **result, "label": label})
        print(f"[{label}, round {round_index}] {engine} {precision or ''} cache {cache}: first image after "
              f"{seconds:.1f} s (engine {result.get('engine_s', float('nan')):.1f} s, generate "
              f"{result.get('generate_s', float('nan')):.1f} s, peak {result.get('peak_rss_gib')} GiB, load average "
              f"{os.getloadavg()[0]:.1f})", flush=True)

    for round_index in range(args.rounds if args.first_image == "yes" else 0):
        for precision in precisions:
            for label in sources:
                run(label, round_index, "openvino", precision, "off", None)
                folder = Path(tempfile.mkdtemp(prefix="ov-cold-start-", dir=args.cache_root))
                try:
                    for state in ("cold", "warm"):
                        run(label, round_index, "openvino", precision, state, str(folder))
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
        run(args.label, round_index, "onnxruntime", None, "none", None)

    per_bucket = {}
    buckets = [int(rows) for rows in args.buckets.split(",") if rows]
    for precision in precisions if buckets else []:
        result, _ = spawn(buckets_child, args.engine_dir, precision, args.threads, buckets)
        per_bucket[precision] = result
        for row in result.get("table", []):
            print(f"{precision} {row['graph']} x{row['rows']}: compile {row['compile_s']:.2f} s, first call "
                  f"{row['first_call_s']:.2f} s, second {row['second_call_s']:.2f} s", flush=True)

    cache_probe = {}
    for precision in precisions if args.cache_probe else []:
        result, _ = spawn(cache_child, args.engine_dir, precision, args.threads, args.cache_root, args.repeats)
        cache_probe[precision] = result
        for row in result.get("table", []):
            print(f"{precision} {row['graph']} ({row['weights_mb']} MB): compile {row['compile_s']:.2f} s, into the "
                  f"cache {row['compile_and_store_s']:.2f} s, from it {row['read_check_import_s']:.2f} s", flush=True)

    summary: dict[str, dict[str, float]] = {}  # code -> "engine precision cache" -> median first image, s
    for record in first_images:
        name = " ".join(filter(None, (record["engine"], record["precision"], record["compile_cache"])))
        summary.setdefault(record["label"], {}).setdefault(name, []).append(record["first_image_s"])
    summary = {code: {name: round(float(np.median(values)), 2) for name, values in runs.items()}
               for code, runs in summary.items()}
    print(json.dumps(summary, indent=1), flush=True)
    if args.json:
        report = {"machine": machine_info(), "settings": {
            "engine_dir": args.engine_dir, "threads": args.threads, "steps": args.steps, "sampler": "ddim",
            "guidance_scale": GUIDANCE_SCALE, "rounds": args.rounds, "buckets": buckets,
            "code": {label: source or "this tree" for label, source in sources.items()}},
            "first_image_median_s": summary, "first_image": first_images, "per_bucket": per_bucket,
            "cache_probe": cache_probe}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
