"""The triton engine: a checkpoint's PyTorch model with the fused Triton kernels, in fp16 or bf16, its UNet
call replayed from a CUDA graph captured once per batch bucket.

Every GroupNorm(+SiLU) and attention layer of the three networks is pinned to the Triton kernels
(``ldm_kernels.dispatch.use_backend``); the rest is ordinary PyTorch. The sampler's latents stay on the GPU
for the whole loop (the pipeline works on this engine's torch tensors); a UNet call copies its inputs into
the captured graph's static buffers, replays it, and copies the output out: one launch from the host
instead of several hundred, which is what a small batch is bound by.

Batch buckets: a UNet call of B rows runs as chunks of the largest bucket, each padded with copies of
its last row up to the smallest bucket that holds it (as the torch engine pads its chunks). So at most
one graph per bucket and latent shape is captured, lazily on first use, and an image does not depend on
the other rows of its bucket. Across buckets the GPU libraries may pick other algorithms, which moves
results in the last bits of fp16.

Without a CUDA device the engine refuses to load. The exception is Triton's interpreter: with
``TRITON_INTERPRET=1`` set before ``ldm_kernels`` is imported and ``device="cpu"``, the same code runs on the
CPU without CUDA graphs, slowly, which is how the tests check it against the torch engine.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm_kernels import dispatch
from ldm_runtime.engines.base import DEFAULT_MAX_BATCH_SIZE
from ldm_runtime.engines.cuda_graph import CapturedCall
from ldm_runtime.engines.torch_engine import TorchEngine
from ldm_runtime.errors import EngineLoadError

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
ENGINE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float32 for checks against the torch engine


class TritonUnavailable(EngineLoadError):
    """This machine cannot run the triton engine; the message is one sentence saying what is missing."""


def triton_device(device: str) -> torch.device:
    """The device the triton engine would run on for ``device`` ("auto", "cuda", "cuda:N", "cpu"), or
    ``TritonUnavailable`` naming what is missing."""
    if not dispatch.triton_available():
        raise TritonUnavailable("the triton engine needs the triton package, which is not installed "
                                "(it ships for Linux); use --engine torch or --engine onnxruntime")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cpu":
        if dispatch.kernels_interpreted():
            return resolved
        raise TritonUnavailable(
            "the triton engine needs a CUDA GPU and none is visible (torch.cuda.is_available() is "
            f"{torch.cuda.is_available()}); use --engine torch or --engine onnxruntime on this machine")
    return resolved


class TritonEngine(TorchEngine):
    """``TorchEngine`` with the Triton kernels, a half-precision model and CUDA-graph UNet calls.

    ``dtype``: torch.float16 (default) or torch.bfloat16; torch.float32 for comparisons.
    ``batch_buckets``: the UNet batch sizes graphs are captured for (see the module docstring).
    ``cuda_graphs``: False runs the UNet eagerly (still bucketed); always False on the CPU.
    Raises ``TritonUnavailable`` on a machine without a CUDA GPU (and without Triton's interpreter).
    """

    name = "triton"
    adapters_missing = "its captured CUDA graphs fix the UNet's weights"

    def __init__(self, checkpoint_dir: str | Path, device: str = "auto", dtype: torch.dtype = torch.float16,
                 batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS, cuda_graphs: bool = True,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE):
        resolved = triton_device(device)
        if dtype not in ENGINE_DTYPES:
            raise ValueError(f"dtype {dtype} is not one of {[str(d) for d in ENGINE_DTYPES]} for the triton engine")
        if dtype == torch.bfloat16 and resolved.type == "cpu":
            raise ValueError("dtype torch.bfloat16 needs the compiled kernels on a CUDA GPU; Triton's interpreter "
                             "(the CPU) has no bfloat16: use torch.float16 or torch.float32")
        if (not batch_buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_buckets)):
            raise ValueError(f"batch_buckets is {batch_buckets!r}; expected positive integers")
        super().__init__(checkpoint_dir, device=str(resolved), dtype=dtype, unet_chunk_size=None,
                         max_batch_size=max_batch_size, kernels="triton")
        self.batch_buckets = tuple(sorted(set(batch_buckets)))
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self._graphs: dict[tuple[int, ...], CapturedCall] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    def bucket_for(self, rows: int) -> int:
        """The smallest bucket that holds ``rows`` (1 <= rows <= the largest bucket)."""
        return next(bucket for bucket in self.batch_buckets if bucket >= rows)

    def _unet_chunk(self, batch: int) -> int:
        return self.batch_buckets[-1]

    def _padded_rows(self, rows: int, chunk: int) -> int:
        return self.bucket_for(rows)

    def _run_unet(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        if not self.cuda_graphs:
            return self.unet_model(*inputs)
        key = tuple(inputs[0].shape) + tuple(inputs[2].shape[1:])
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = CapturedCall(self.unet_model, inputs, self._graph_pool)
        return captured.replay(inputs)

    @property
    def captured_shapes(self) -> list[tuple[int, ...]]:
        """(bucket, C, h, w, L, D) of each UNet graph captured so far."""
        return sorted(self._graphs)

