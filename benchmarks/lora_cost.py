"""What per-request LoRA costs: UNet steps/s at batch 4 with an adapter fused into the weights, with one adapter on
every row per request, and with 4 different adapters in one batch, on the torch engine and on an onnxruntime engine
dir exported with --lora-slots; and, for comparison, the time to re-export an engine dir with an adapter fused.

    .venv/bin/python benchmarks/lora_cost.py --preset tiny --threads 1 --out benchmarks/results/cpu-lora-cost.json

The model is a random-weight checkpoint of the preset; the adapters are random kohya LoRAs of rank --rank on every
linear layer and 1x1 convolution of the UNet (what an engine dir's slots take). Each figure is the median of
--calls timed UNet calls after 3 warm-up calls, the variants timed in turn (interleaved), the rows and
inputs the same for every variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from ldm_export.engine_dir import export_engine
from ldm_export.lora import AdapterFile, fuse_checkpoint
from ldm_export.options import ExportOptions
from ldm_runtime.config import preset
from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
from ldm_runtime.engines.torch_adapters import is_pointwise
from ldm_runtime.engines.torch_engine import TorchEngine
from ldm_tools.bench.cli import machine_info
from ldm_train.checkpoint import write_random_checkpoint

BATCH = 4


def write_adapter(unet: torch.nn.Module, path: Path, rank: int, seed: int) -> Path:
    """A random kohya LoRA of every linear layer and 1x1 convolution of ``unet``."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if not is_pointwise(module):
            continue
        out, size_in = module.weight.shape[:2]
        key = "lora_unet_" + name.replace(".", "_")
        kernel = (1, 1) if module.weight.dim() == 4 else ()
        tensors[f"{key}.lora_down.weight"] = (rng.standard_normal((rank, size_in, *kernel)) / size_in ** 0.5
                                              ).astype(np.float32)
        tensors[f"{key}.lora_up.weight"] = (0.1 * rng.standard_normal((out, rank, *kernel))).astype(np.float32)
    save_file(tensors, str(path))
    return path


def steps_per_second(variants: dict[str, tuple], calls: int) -> dict[str, float]:
    """{name: UNet calls per second} of ``variants`` {name: (engine, inputs, adapters or None)}, timed interleaved:
    each of ``calls`` rounds times every variant once (in an order rotated round by round), so that a load change
    on the machine weighs on every variant alike; the median per variant."""
    def call(engine, inputs, adapters) -> float:
        started = time.perf_counter()
        engine.unet(*inputs, **({} if adapters is None else {"adapters": adapters}))
        return time.perf_counter() - started

    names = list(variants)
    for name in names:
        for _ in range(3):
            call(*variants[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(calls):
        for offset in range(len(names)):
            name = names[(round_index + offset) % len(names)]
            times[name].append(call(*variants[name]))
    return {name: 1.0 / statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="lora-cost-"))
    checkpoint = root / "checkpoint"
    write_random_checkpoint(checkpoint, preset(args.preset), 0)
    base = TorchEngine(checkpoint, device="cpu")
    files = {f"a{index}": write_adapter(base.unet_model, root / f"a{index}.safetensors", args.rank, index)
             for index in range(BATCH)}
    started = time.perf_counter()
    fused_checkpoint = fuse_checkpoint(checkpoint, root / "fused", [AdapterFile(files["a0"], 0.8)])
    fuse_seconds = time.perf_counter() - started

    config = base.config
    side = config.image_size // config.autoencoder.factor
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(BATCH, config.autoencoder.latent_channels, side, side, generator=generator)
    context, mask = base.encode_text([f"prompt {index}" for index in range(BATCH)])
    timesteps = np.array([999, 700, 400, 100])
    one = [(("a0", 0.8),)] * BATCH
    mixed = [((name, 0.8),) for name in files]
    results: dict = {"machine": machine_info(), "preset": args.preset, "rank": args.rank, "batch": BATCH,
                     "threads": args.threads, "calls": args.calls, "unet_steps_per_second": {}}
    figures = results["unet_steps_per_second"]

    per_request = TorchEngine(checkpoint, device="cpu", adapters=files)
    fused = TorchEngine(fused_checkpoint, device="cpu")
    inputs = (latents, timesteps, context, mask)
    figures["torch"] = steps_per_second({"base": (base, inputs, None), "fused": (fused, inputs, None),
                                         "per_request_one_adapter": (per_request, inputs, one),
                                         "per_request_4_adapters": (per_request, inputs, mixed)}, args.calls)

    export_options = ExportOptions(precision="fp32", batch_range=(1, BATCH, 8), validation_seed=0)
    started = time.perf_counter()
    slots_dir = export_engine(checkpoint, root / "slots", ExportOptions(
        **{**vars(export_options), "lora_slots": args.rank * BATCH}))
    results["export_with_slots_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    fused_dir = export_engine(fused_checkpoint, root / "fused-engine", export_options)
    results["fuse_and_reexport_seconds"] = fuse_seconds + time.perf_counter() - started
    sessions = {"intra_op_threads": args.threads, "device": "cpu"}
    slotted = OnnxRuntimeEngine(slots_dir, adapters=files, **sessions)
    fused_engine = OnnxRuntimeEngine(fused_dir, **sessions)
    host = tuple(np.asarray(value) for value in (latents, timesteps, context, mask))
    figures["onnxruntime"] = steps_per_second({"fused": (fused_engine, host, None),
                                               "slots_no_adapter": (slotted, host, None),
                                               "per_request_one_adapter": (slotted, host, one),
                                               "per_request_4_adapters": (slotted, host, mixed)}, args.calls)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
