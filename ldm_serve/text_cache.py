"""An engine whose ``encode_text`` remembers the last prompts it encoded.

Under step-level batching each joining request is started on its own, which costs a text-encoder call for its
prompt and its negative prompt; the negative prompt is nearly always "" and prompts repeat. The text encoder
works row by row (a prompt's context is the same alone or in a batch: bit for bit on the CPU engines, which
run it one prompt at a time or row-wise exactly), so a remembered row is the row a new call would give.

Only the batcher's worker thread calls it, so it needs no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

from ldm_runtime.adapters import AdapterChoice
from ldm_runtime.arrays import concatenate
from ldm_runtime.engines.base import Array, Engine

DEFAULT_CAPACITY = 256  # prompts remembered (ldm-serve --text-cache)


class TextEncodingCache:
    """``engine`` with an LRU cache of up to ``capacity`` prompts' ``(context, mask)`` rows in front of
    ``encode_text``; every other attribute is the engine's."""

    def __init__(self, engine: Engine, capacity: int = DEFAULT_CAPACITY):
        assert capacity >= 1, capacity
        self.engine = engine
        self.info = engine.info
        self.capacity = capacity
        self._rows: OrderedDict[tuple[str, AdapterChoice], tuple[Array, Array]] = OrderedDict()

    def encode_text(self, prompts: list[str],
                    adapters: Sequence[AdapterChoice] | None = None) -> tuple[Array, Array]:
        """B prompts -> (context (B, L, D), context_mask (B, L)), encoding only those not remembered; ``adapters``:
        each prompt's LoRA adapters (remembered apart: they may change its encoding)."""
        keys = list(zip(prompts, adapters if adapters is not None else [()] * len(prompts)))
        missing = [key for key in dict.fromkeys(keys) if key not in self._rows]
        if missing:
            choices = [choice for _, choice in missing]
            context, mask = self.engine.encode_text([prompt for prompt, _ in missing],
                                                    *([choices] if any(choices) else []))
            for row, key in enumerate(missing):
                self._rows[key] = (context[row:row + 1], mask[row:row + 1])
        rows = [self._rows[key] for key in keys]
        for key in keys:
            self._rows.move_to_end(key)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)
        return concatenate([context for context, _ in rows]), concatenate([mask for _, mask in rows])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)
