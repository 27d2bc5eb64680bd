"""TensorRT plans from an engine dir's ONNX graphs (TensorRT 10 Python API).

One plan per graph, one optimisation profile each: min / opt / max shapes from the manifest's ``dims``
(the --batch-range and --size-range of the export). fp16 engines build with ``BuilderFlag.FP16``; the
ONNX graphs' own fp32 islands stay fp32. A timing cache (``tensorrt.timing_cache`` in the engine dir) is
shared by the four builds and kept for rebuilds on the same GPU and TensorRT version. A plan runs only on
the GPU model and TensorRT version it was built with: the manifest records both, and
``ldm_runtime.manifest.check_tensorrt_plans`` refuses a mismatch; ``ldm-export --rebuild-plans`` rebuilds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ldm_export.errors import ExportError
from ldm_runtime.engines.tensorrt_plans import gpu_identity, tensorrt_missing  # shared with the runtime
from ldm_runtime.files import sha256_file, write_atomic, write_text_atomic
from ldm_runtime.manifest import MANIFEST_JSON, DimRange, load_manifest, verify_engine_files

TIMING_CACHE = "tensorrt.timing_cache"
WORKSPACE_BYTES = 8 << 30  # the most scratch memory TensorRT may use while timing tactics


def _profile_shape(shape: list[int | str], dims: dict[str, DimRange], which: str) -> tuple[int, ...]:
    return tuple(size if isinstance(size, int) else getattr(dims[size], which) for size in shape)


def build_plans(engine_dir: Path, manifest: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Build ``<graph>.plan`` for every graph of the engine dir's manifest; returns the manifest's "tensorrt"
    entry (versions, GPU, plans with sha256 and profile shapes). ``ExportError`` if TensorRT refuses a graph."""
    import tensorrt as trt

    missing = tensorrt_missing()
    if missing:
        raise ExportError(missing)
    gpu_name, capability = gpu_identity()
    dims = {name: DimRange(**value) for name, value in manifest["dims"].items()}
    previous = manifest.get("tensorrt") or {}
    cache_path = engine_dir / TIMING_CACHE
    same_machine = (previous.get("tensorrt_version"), previous.get("gpu_name")) == (trt.__version__, gpu_name)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() and same_machine else b""
    logger = trt.Logger(trt.Logger.WARNING)
    plans = {}
    for name, graph in manifest["graphs"].items():
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10 networks are always explicit-batch
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(engine_dir / graph["file"])):
            first = str(parser.get_error(0)) if parser.num_errors else "no parser error recorded"
            raise ExportError(f"TensorRT {trt.__version__} cannot parse {graph['file']}: {first}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if manifest["precision"] == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        shapes = {}
        for tensor in graph["inputs"]:
            shapes[tensor["name"]] = {which: _profile_shape(tensor["shape"], dims, which)
                                      for which in ("min", "opt", "max")}
            profile.set_shape(tensor["name"], shapes[tensor["name"]]["min"], shapes[tensor["name"]]["opt"],
                              shapes[tensor["name"]]["max"])
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError(f"TensorRT {trt.__version__} could not build a plan for {graph['file']} "
                              f"(its log above says why)")
        plan_path = engine_dir / f"{name}.plan"
        write_atomic(plan_path, lambda temporary: temporary.write_bytes(memoryview(serialized)))
        cache_bytes = bytes(memoryview(config.get_timing_cache().serialize()))
        plans[name] = {"file": plan_path.name, "sha256": sha256_file(plan_path), "size": plan_path.stat().st_size,
                       "profile": {tensor: {k: list(v) for k, v in s.items()} for tensor, s in shapes.items()}}
        log(f"built {plan_path.name} with TensorRT {trt.__version__}")
    write_atomic(cache_path, lambda temporary: temporary.write_bytes(cache_bytes))
    return {"tensorrt_version": trt.__version__, "gpu_name": gpu_name, "compute_capability": capability,
            "precision": manifest["precision"], "timing_cache": TIMING_CACHE, "plans": plans}


def rebuild_plans(engine_dir: Path, log: Callable[[str], None]) -> Path:
    """Rebuild the TensorRT plans of an existing engine dir from its ONNX graphs, on this GPU and TensorRT,
    and rewrite its manifest. ``EngineDirError`` for a broken engine dir, ``ExportError`` without TensorRT/GPU."""
    manifest = load_manifest(engine_dir)
    verify_engine_files(engine_dir, manifest)
    missing = tensorrt_missing("--rebuild-plans")
    if missing:
        raise ExportError(missing)
    data = dict(manifest.raw)
    data["tensorrt"] = build_plans(engine_dir, data, log)
    data["backend"] = "tensorrt"
    write_text_atomic(engine_dir / MANIFEST_JSON, json.dumps(data, indent=2) + "\n")
    return engine_dir
