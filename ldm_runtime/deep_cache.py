"""Which steps of a sampling run the UNet runs whole under feature caching (DeepCache, Ma et al. 2024).

At a whole step the UNet runs in full and its deep features (the hidden state entering the last up-block,
``UNet.forward_with_deep_features``) are kept; at the steps between, only the shallow part runs, on the kept
features (``UNet.forward_shallow``). A run of ``calls`` UNet calls with interval N has ``ceil(calls / N)`` whole
steps, step 0 always among them:

- "uniform": steps 0, N, 2N, ...
- "quadratic": the paper's non-uniform schedule, the whole steps packed around a step part-way in (where the
  paper measures the deep features changing fastest) and spread out toward both ends: indices
  ``c + sign(x) |x| ** p`` for ``x`` evenly spaced from ``-c ** (1/p)`` to ``(calls - c) ** (1/p)``, with
  ``c = QUADRATIC_CENTER * calls`` and ``p`` lowered from ``QUADRATIC_POWER`` in steps of 0.02 until the indices
  are distinct (the paper's ``sample_from_quad_center``; its SD setting is centre 15 of 50 steps, power 1.4).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ldm_runtime.config import CACHE_SCHEDULES

QUADRATIC_CENTER = 0.3  # the paper's SD setting: step 15 of 50
QUADRATIC_POWER = 1.4
POWER_STEP = 0.02


@functools.lru_cache(maxsize=1024)
def whole_steps(calls: int, interval: int, schedule: str = "uniform") -> frozenset[int]:
    """The UNet calls (0-based) of a ``calls``-call run that run the whole UNet, for cache interval ``interval``
    (1: every call) and schedule ``schedule`` (one of ``CACHE_SCHEDULES``)."""
    if schedule not in CACHE_SCHEDULES:
        raise ValueError(f"cache schedule is {schedule!r}; expected one of {', '.join(CACHE_SCHEDULES)}")
    if calls < 1 or interval < 1:
        raise ValueError(f"calls {calls} and interval {interval} must be positive")
    count = math.ceil(calls / interval)
    if interval == 1 or count >= calls:
        return frozenset(range(calls))
    if schedule == "uniform":
        return frozenset(range(0, calls, interval))
    return frozenset(_quadratic(calls, count))


def _quadratic(calls: int, count: int) -> list[int]:
    center = QUADRATIC_CENTER * calls
    power = QUADRATIC_POWER
    while power >= 1:
        x = np.linspace(-center ** (1 / power), (calls - center) ** (1 / power), count + 1)
        indices = np.floor(center + np.sign(x) * np.abs(x) ** power + 1e-9).astype(np.int64)
        steps = sorted({0, *np.clip(indices[:-1], 0, calls - 1).tolist()})
        if len(steps) == count:
            return steps
        power -= POWER_STEP
    return list(range(0, calls, math.ceil(calls / count)))  # evenly spread: reached only for counts near calls
