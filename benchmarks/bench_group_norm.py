"""Fused Triton GroupNorm+SiLU against torch's group_norm followed by silu, at the SD 1.5 UNet's shapes.

Batch 2 (classifier-free guidance), 64x64 latents, 32 groups, fp16. GB/s counts the least traffic
the op needs (read x, write y, read weight and bias once), the roofline input for a memory-bound
op; the fused kernel really reads x twice (statistics, then output), torch's pair moves 5x x's size.

    python benchmarks/bench_group_norm.py [--rep-ms 100] [--warmup-ms 25] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from cuda_timing import add_timing_flags, device_description, require_cuda, summarize_ms, time_calls_ms

SD15_UNET_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)]
NUM_GROUPS = 32


def bench_shape(shape, dtype, rep_ms, warmup_ms) -> dict:
    from ldm_kernels.group_norm import group_norm_reference, group_norm_triton

    channels = shape[1]
    x = torch.randn(shape, dtype=dtype, device="cuda")
    weight = torch.randn(channels, dtype=dtype, device="cuda")
    bias = torch.randn(channels, dtype=dtype, device="cuda")

    def fused():
        return group_norm_triton(x, NUM_GROUPS, weight, bias, 1e-5, "silu")

    def torch_pair():
        return F.silu(F.group_norm(x, NUM_GROUPS, weight, bias, 1e-5))

    exact = group_norm_reference(x.float(), NUM_GROUPS, weight.float(), bias.float(), 1e-5, "silu")
    bytes_per_call = 2 * x.numel() * x.element_size() + 2 * channels * weight.element_size()
    row = {"shape": list(shape), "groups": NUM_GROUPS, "dtype": str(dtype).removeprefix("torch."),
           "bytes_per_call": bytes_per_call,
           "max_abs_error_vs_fp32": {"triton": (fused().float() - exact).abs().max().item(),
                                     "torch": (torch_pair().float() - exact).abs().max().item()}}
    for name, fn in (("triton", fused), ("torch", torch_pair)):
        summary = summarize_ms(time_calls_ms(fn, rep_ms, warmup_ms))
        summary["gb_per_s"] = bytes_per_call / (summary["median_ms"] * 1e-3) / 1e9
        row[name] = summary
    row["speedup"] = row["torch"]["median_ms"] / row["triton"]["median_ms"]
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':>20} {'MB':>6} | {'triton ms (p10-p90)':>24} {'GB/s':>6} | "
          f"{'torch ms (p10-p90)':>24} {'GB/s':>6} | {'speedup':>7} | max|err| triton/torch")
    for row in rows:
        cells = []
        for name in ("triton", "torch"):
            r = row[name]
            cells.append(f"{r['median_ms']:8.4f} ({r['p10_ms']:.4f}-{r['p90_ms']:.4f}) {r['gb_per_s']:6.0f}")
        errors = row["max_abs_error_vs_fp32"]
        print(f"{str(tuple(row['shape'])):>20} {row['bytes_per_call'] / 1e6:6.2f} | {cells[0]} | {cells[1]} | "
              f"{row['speedup']:6.2f}x | {errors['triton']:.2e}/{errors['torch']:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_flags(parser, rep_ms=100, warmup_ms=25)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    require_cuda("bench_group_norm")

    rows = [bench_shape(shape, torch.float16, args.rep_ms, args.warmup_ms) for shape in SD15_UNET_SHAPES]
    print(f"GroupNorm({NUM_GROUPS} groups)+SiLU, fp16, {device_description()['gpu']}")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "group_norm_silu", **device_description(), "rep_ms": args.rep_ms,
                       "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
