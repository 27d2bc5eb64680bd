"""One UNet step of Stable Diffusion 1.5's UNet (the ``sd15`` preset, random weights) at 64x64 latents, fp16:
eager PyTorch against the triton engine's UNet call, with the two changes it makes measured apart.

    python benchmarks/bench_unet_step.py [--batch-sizes 1,2,8] [--rep-ms 1000] [--warmup-ms 200] [--json out.json]

Four ways to run the same module on the same inputs (context: 77 tokens of 768, all attended):

- ``eager``: plain PyTorch ops (group_norm, silu, scaled_dot_product_attention), as the torch engine runs;
- ``eager+triton``: the fused Triton GroupNorm+SiLU and attention kernels, launched eagerly;
- ``graph``: the plain ops replayed from a CUDA graph;
- ``triton engine``: Triton kernels in a CUDA graph, with the engine's input copies and output clone.

The speedup column is eager / that row. The error columns compare each output with an fp32 eager run
of the same weights (max |difference| over the output's max |value|).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from cuda_timing import add_timing_flags, device_description, require_cuda, summarize_ms, time_calls_ms

LATENT_SIZE = 64
TEXT_TOKENS = 77


def make_inputs(batch: int, config, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(batch)
    latents = torch.randn(batch, config.in_channels, LATENT_SIZE, LATENT_SIZE, device="cuda", generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), device="cuda", generator=generator)
    context = torch.randn(batch, TEXT_TOKENS, config.context_dim, device="cuda", generator=generator)
    mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.bool, device="cuda")
    return [latents.to(dtype), timesteps, context.to(dtype), mask]


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.float() - reference).abs().max() / reference.abs().max()).item()


@torch.inference_mode()
def bench_batch(unet, config, batch: int, rep_ms: float, warmup_ms: float) -> dict:
    from ldm_kernels.dispatch import use_backend
    from ldm_runtime.engines.cuda_graph import CapturedCall

    inputs = make_inputs(batch, config, torch.float16)
    reference = None
    if batch == 1:  # an fp32 copy of 3.4 GB is enough once
        unet_fp32 = use_backend(unet.float(), "reference")
        reference = unet_fp32(*[t.float() if t.is_floating_point() else t for t in inputs]).float()
        unet.half()

    runs = {}
    for name, backend, graphed in (("eager", "reference", False), ("eager+triton", "triton", False),
                                   ("graph", "reference", True), ("triton engine", "triton", True)):
        use_backend(unet, backend)
        if graphed:
            captured = CapturedCall(unet, inputs, torch.cuda.graph_pool_handle())
            call = lambda captured=captured: captured.replay(inputs)  # noqa: E731
        else:
            call = lambda: unet(*inputs)  # noqa: E731
        output = call()
        row = summarize_ms(time_calls_ms(call, rep_ms, warmup_ms))
        if reference is not None:
            row["relative_error_vs_fp32"] = relative_error(output, reference)
        runs[name] = row
        del call
        if graphed:
            del captured
        torch.cuda.empty_cache()
    eager_ms = runs["eager"]["median_ms"]
    for row in runs.values():
        row["speedup_vs_eager"] = eager_ms / row["median_ms"]
        row["steps_per_s"] = 1e3 / row["median_ms"]
    return {"batch": batch, "latent": LATENT_SIZE, "dtype": "float16", "runs": runs}


def print_table(rows: list[dict]) -> None:
    print(f"{'batch':>5} {'run':>14} | {'median ms':>9} {'p10-p90 ms':>17} | {'steps/s':>7} | {'speedup':>7} | rel.err")
    for row in rows:
        for name, run in row["runs"].items():
            error = run.get("relative_error_vs_fp32")
            print(f"{row['batch']:5d} {name:>14} | {run['median_ms']:9.2f} {run['p10_ms']:8.2f}-{run['p90_ms']:8.2f} | "
                  f"{run['steps_per_s']:7.2f} | {run['speedup_vs_eager']:6.2f}x | "
                  f"{'' if error is None else f'{error:.2e}'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,2,8", help="comma-separated UNet batch sizes")
    add_timing_flags(parser, rep_ms=1000, warmup_ms=200)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        assert all(b >= 1 for b in batch_sizes)
    except (ValueError, AssertionError):
        print(f"bench_unet_step: --batch-sizes {args.batch_sizes!r} is not a list of positive integers",
              file=sys.stderr)
        return 2
    require_cuda("bench_unet_step")

    from ldm_runtime.config import preset
    from ldm_runtime.models import UNet

    config = preset("sd15").unet
    torch.manual_seed(0)
    unet = UNet(config).half().cuda().eval().requires_grad_(False)
    rows = [bench_batch(unet, config, batch, args.rep_ms, args.warmup_ms) for batch in batch_sizes]
    print(f"sd15 UNet step, {LATENT_SIZE}x{LATENT_SIZE} latents, fp16, {device_description()['gpu']}")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "unet_step", **device_description(), "rep_ms": args.rep_ms, "results": rows},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
