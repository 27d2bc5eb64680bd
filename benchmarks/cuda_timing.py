"""GPU timing for the kernel benchmarks: CUDA events around single calls, a cold L2 for each.

Every timed call starts after a 256 MiB write (larger than any current GPU's L2), so a kernel is
charged for reading its inputs from HBM as it would be inside a UNet step, not from a warm cache.
"""

from __future__ import annotations

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
    from kernels.dispatch import kernels_interpreted

    if kernels_interpreted():
        print(f"{script}: TRITON_INTERPRET=1 makes the kernels run in Triton's interpreter; unset it", file=sys.stderr)
        sys.exit(2)


def time_calls_ms(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls."""
    l2_flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        l2_flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def summarize_ms(times: list[float]) -> dict[str, float]:
    """Median and the 10th/90th percentiles (the spread) of a list of milliseconds."""
    deciles = statistics.quantiles(times, n=10)
    return {"median_ms": statistics.median(times), "p10_ms": deciles[0], "p90_ms": deciles[-1]}


def device_description() -> dict[str, str]:
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": str(torch.version.cuda)}
