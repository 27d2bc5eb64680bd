"""Triton flash-style attention against torch's scaled_dot_product_attention at SD 1.5's shapes.

Batch 2 (classifier-free guidance) x 8 heads, fp16: self-attention at the UNet's four resolutions
(4096 tokens of head dim 40, 1024 of 80, 256 and 64 of 160) and cross-attention of the same queries
against 77 text tokens. TFLOP/s counts the two matmuls (4 * B * H * Lq * Lk * D), not the padded head
dim the kernel computes; bytes per call are q, k, v read once and the output written once.

    python benchmarks/bench_attention.py [--rep-ms 100] [--warmup-ms 25] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from cuda_timing import add_timing_flags, device_description, require_cuda, summarize_ms, time_calls_ms

BATCH, HEADS, TEXT_TOKENS = 2, 8, 77
SD15_QUERIES = [(4096, 40), (1024, 80), (256, 160), (64, 160)]  # (tokens, head dim) per UNet level


def bench_shape(kind, query_len, key_len, head_dim, dtype, rep_ms, warmup_ms) -> dict:
    from ldm_kernels.attention import attention_triton

    q = torch.randn(BATCH, HEADS, query_len, head_dim, dtype=dtype, device="cuda")
    k = torch.randn(BATCH, HEADS, key_len, head_dim, dtype=dtype, device="cuda")
    v = torch.randn_like(k)

    def fused():
        return attention_triton(q, k, v)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v)

    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flops_per_call = 4 * BATCH * HEADS * query_len * key_len * head_dim
    bytes_per_call = (2 * q.numel() + k.numel() + v.numel()) * q.element_size()
    row = {"kind": kind, "batch": BATCH, "heads": HEADS, "query_len": query_len, "key_len": key_len,
           "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."),
           "flops_per_call": flops_per_call, "bytes_per_call": bytes_per_call,
           "max_abs_error_vs_fp32": {"triton": (fused().float() - exact).abs().max().item(),
                                     "torch": (sdpa().float() - exact).abs().max().item()}}
    for name, fn in (("triton", fused), ("torch", sdpa)):
        summary = summarize_ms(time_calls_ms(fn, rep_ms, warmup_ms))
        seconds = summary["median_ms"] * 1e-3
        summary["tflop_per_s"] = flops_per_call / seconds / 1e12
        summary["gb_per_s"] = bytes_per_call / seconds / 1e9
        row[name] = summary
    row["speedup"] = row["torch"]["median_ms"] / row["triton"]["median_ms"]
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'kind':>5} {'Lq':>5} {'Lk':>5} {'D':>4} {'GFLOP':>7} {'MB':>6} | {'triton ms (p10-p90)':>24} "
          f"{'TFLOP/s':>7} | {'sdpa ms (p10-p90)':>24} {'TFLOP/s':>7} | {'speedup':>7} | max|err| triton/sdpa")
    for row in rows:
        cells = []
        for name in ("triton", "torch"):
            r = row[name]
            cells.append(f"{r['median_ms']:8.4f} ({r['p10_ms']:.4f}-{r['p90_ms']:.4f}) {r['tflop_per_s']:7.1f}")
        errors = row["max_abs_error_vs_fp32"]
        print(f"{row['kind']:>5} {row['query_len']:5d} {row['key_len']:5d} {row['head_dim']:4d} "
              f"{row['flops_per_call'] / 1e9:7.2f} {row['bytes_per_call'] / 1e6:6.2f} | {cells[0]} | {cells[1]} | "
              f"{row['speedup']:6.2f}x | {errors['triton']:.2e}/{errors['torch']:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_flags(parser, rep_ms=100, warmup_ms=25)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    require_cuda("bench_attention")

    rows = []
    for tokens, head_dim in SD15_QUERIES:
        rows.append(bench_shape("self", tokens, tokens, head_dim, torch.float16, args.rep_ms, args.warmup_ms))
        rows.append(bench_shape("cross", tokens, TEXT_TOKENS, head_dim, torch.float16, args.rep_ms, args.warmup_ms))
    print(f"attention, batch {BATCH} x {HEADS} heads, fp16, {device_description()['gpu']}")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "attention", **device_description(), "rep_ms": args.rep_ms,
                       "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
