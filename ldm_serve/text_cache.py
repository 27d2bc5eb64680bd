"""An engine whose ``encode_text`` remembers the last prompts it encoded.

Under step-level batching each joining request is started on its own, which costs a text-encoder call for its
prompt and its negative prompt; the negative prompt is nearly always "" and prompts repeat. The text encoder
works row by row (a prompt's context is the same alone or in a batch: bit for bit on the CPU engines, which
run it one prompt at a time or row-wise exactly), so a remembered row is the row a new call would give.

Only the batcher's worker thread calls it, so it needs no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

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
        self._rows: OrderedDict[str, tuple[Array, Array]] = OrderedDict()

    def encode_text(self, prompts: list[str]) -> tuple[Array, Array]:
        """B prompts -> (context (B, L, D), context_mask (B, L)), encoding only those not remembered."""
        missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in self._rows]
        if missing:
            context, mask = self.engine.encode_text(missing)
            for row, prompt in enumerate(missing):
                self._rows[prompt] = (context[row:row + 1], mask[row:row + 1])
        rows = [self._rows[prompt] for prompt in prompts]
        for prompt in prompts:
            self._rows.move_to_end(prompt)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)
        return concatenate([context for context, _ in rows]), concatenate([mask for _, mask in rows])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)
