"""A module call captured once in a CUDA graph and replayed: static input buffers, the graph, its static output.

Replaying costs one launch from the host instead of one per kernel, which is what a small batch is bound by.
Only torch is imported here, so the GPU benchmarks can use it on a machine with nothing else installed.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

WARMUP_CALLS = 2  # Triton compiles and cuDNN/cuBLAS pick their algorithms before the capture


class CapturedCall:
    """``module(*example)`` (a module, or any call that only enqueues work on the current stream, such as a
    TensorRT execution context's) captured on the current CUDA device. ``replay(inputs)`` takes tensors of the
    example's shapes and dtypes and returns a fresh tensor, or a tuple of them for a call that returns a tuple
    (the static outputs are overwritten by the next replay). ``pool``: a ``torch.cuda.graph_pool_handle()`` shared by graphs that never run concurrently."""

    def __init__(self, module: Callable[..., torch.Tensor], example: list[torch.Tensor], pool=None) -> None:
        self.static_inputs = [tensor.clone() for tensor in example]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                module(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.static_output = module(*self.static_inputs)

    def replay(self, inputs: list[torch.Tensor]) -> Any:
        for buffer, tensor in zip(self.static_inputs, inputs):
            buffer.copy_(tensor, non_blocking=True)
        self.graph.replay()
        if isinstance(self.static_output, tuple):
            return tuple(output.clone() for output in self.static_output)
        return self.static_output.clone()
