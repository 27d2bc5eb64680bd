"""GPU timing for the kernel benchmarks: ``triton.testing.do_bench`` (CUDA events around single calls, a cold
L2 for each).

do_bench clears a 256 MB buffer (larger than any current GPU's L2) before every timed call, so a kernel is
charged for reading its inputs from HBM as it would be inside a UNet step, not from a warm cache. It sizes the
warm-up and the timed calls by time (milliseconds), from a first estimate of one call. triton is imported only
when timing, so the scripts' ``--help`` works without it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch


def require_cuda(script: str) -> None:
    """Exits with one line (status 2) unless a CUDA device runs the compiled Triton kernels."""
    if not torch.cuda.is_available():
        print(f"{script}: needs a CUDA device (torch.cuda.is_available() is False); "
              "no CPU numbers are reported", file=sys.stderr)
        sys.exit(2)
    from ldm_kernels.dispatch import kernels_interpreted

    if kernels_interpreted():
        print(f"{script}: TRITON_INTERPRET=1 makes the kernels run in Triton's interpreter; unset it", file=sys.stderr)
        sys.exit(2)


def time_calls_ms(fn: Callable[[], object], rep_ms: float, warmup_ms: float) -> list[float]:
    """Milliseconds of each timed call of ``fn``: as many calls as fit in about ``rep_ms``, after about
    ``warmup_ms`` of untimed ones (the first call, which compiles, is never timed)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")


def add_timing_flags(parser: argparse.ArgumentParser, rep_ms: float, warmup_ms: float) -> None:
    """``--rep-ms`` and ``--warmup-ms``, the time budgets of ``time_calls_ms``, with these defaults."""
    parser.add_argument("--rep-ms", type=float, default=rep_ms,
                        help="milliseconds of timed calls per case, triton.testing.do_bench's rep (default: "
                             "%(default)s)")
    parser.add_argument("--warmup-ms", type=float, default=warmup_ms,
                        help="milliseconds of untimed calls first, after a first call that compiles (default: "
                             "%(default)s)")


def summarize_ms(times: list[float]) -> dict[str, float]:
    """Median and the 10th/90th percentiles (the spread) of a list of milliseconds."""
    deciles = statistics.quantiles(times, n=10)
    return {"median_ms": statistics.median(times), "p10_ms": deciles[0], "p90_ms": deciles[-1]}


def device_description() -> dict[str, str]:
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": str(torch.version.cuda)}
