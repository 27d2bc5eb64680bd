"""Picks the implementation of each fused op per call.

``LDM_KERNELS`` is read on every call, so tests and users change it with ``os.environ`` (or
pytest's ``monkeypatch.setenv``) at any time:

- ``auto`` (default): the Triton op on CUDA tensors when Triton is installed, the PyTorch reference
  elsewhere (CPU inference and ONNX export see only ordinary torch ops).
- ``reference``: always the PyTorch reference.
- ``triton``: always the Triton op (``torch.ops.ldm.*``). On CPU tensors this runs the kernels under
  Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the environment before ``ldm_kernels`` is
  first imported (Triton decides compiled or interpreted when a kernel is defined).

A model can also pin the choice for itself, whatever LDM_KERNELS says: ``use_backend(module, name)``
sets ``kernel_backend`` on every GroupNorm and attention layer inside it, and those layers pass it on
as the ``backend`` argument of the functions below (the triton engine pins "triton"). ``None``
follows LDM_KERNELS. Pinning "triton" pins an attention layer whose head dim is over the kernel's
256 (an autoencoder's single-head attention at Stable Diffusion's width, 512) to the reference: a
model that pins "triton" runs every layer the kernels take in them and can still run whole.

Under "auto", inputs a kernel cannot take (float64, attention head dims over 256, attention that
needs gradients, bfloat16 under Triton's interpreter) go to the reference; under "triton" they raise
ValueError. Integer tensors are refused by both. torch.compile guards on LDM_KERNELS, so a compiled
function retraces when it changes.
"""

from __future__ import annotations

import os

import torch

from ldm_kernels.attention import MAX_HEAD_DIM, attention_op, attention_reference, check_attention_args
from ldm_kernels.group_norm import _group_norm_apply_kernel, check_group_norm_args, group_norm_op, group_norm_reference

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # Triton ships for Linux only
    InterpretedFunction = None

BACKENDS = ("auto", "reference", "triton")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def selected_backend(backend: str | None = None) -> str:
    """``backend`` when given, else the value of LDM_KERNELS (unset or empty: "auto"); ValueError for
    anything that is not one of BACKENDS."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"kernel backend {backend!r} is not one of {', '.join(BACKENDS)}")
        return backend
    backend = os.environ.get("LDM_KERNELS") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"LDM_KERNELS={backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


def use_backend(module: torch.nn.Module, backend: str | None) -> torch.nn.Module:
    """Pins every kernel-calling layer inside ``module`` to ``backend`` (None: follow LDM_KERNELS again).
    Returns ``module``."""
    if backend is not None:
        selected_backend(backend)
    for layer in module.modules():
        if hasattr(layer, "kernel_backend"):
            too_wide = getattr(layer, "head_dim", 0) > MAX_HEAD_DIM  # an attention layer the kernel cannot take
            layer.kernel_backend = "reference" if backend == "triton" and too_wide else backend
    return module


def triton_available() -> bool:
    """Whether the Triton package imported (it ships for Linux only)."""
    return InterpretedFunction is not None


def kernels_interpreted() -> bool:
    """Whether the kernels were defined under TRITON_INTERPRET=1 and so run on CPU tensors."""
    return triton_available() and isinstance(_group_norm_apply_kernel, InterpretedFunction)


def use_triton(tensor: torch.Tensor, unsupported: str | None = None, backend: str | None = None) -> bool:
    """Whether an op on ``tensor`` runs the Triton kernel under ``backend`` (None: the current LDM_KERNELS).

    ``unsupported`` names inputs the kernel cannot take (None when it can): "auto" then picks the
    reference, and "triton" raises ValueError naming them.
    """
    backend = selected_backend(backend)
    if not tensor.dtype.is_floating_point:  # the reference would truncate its result to the integers
        raise ValueError(f"the fused ops take floating-point tensors, not {tensor.dtype}")
    if backend == "reference":
        return False
    if tensor.dtype not in KERNEL_DTYPES:
        unsupported = f"{tensor.dtype} tensors (the kernels take float32, float16 and bfloat16)"
    elif tensor.dtype == torch.bfloat16 and not tensor.is_cuda and kernels_interpreted():
        unsupported = "bfloat16 tensors under Triton's interpreter (numpy has no bfloat16)"
    if backend == "auto":
        return tensor.is_cuda and triton_available() and unsupported is None
    if not triton_available():
        raise RuntimeError("LDM_KERNELS=triton but the triton package is not installed")
    if not tensor.is_cuda and not kernels_interpreted():
        raise RuntimeError(f"LDM_KERNELS=triton cannot run on a {tensor.device.type} tensor unless "
                           "TRITON_INTERPRET=1 is set before ldm_kernels is imported")
    if unsupported is not None:
        raise ValueError(f"LDM_KERNELS=triton cannot run {unsupported}")
    return True


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5, activation: str | None = None, backend: str | None = None) -> torch.Tensor:
    """GroupNorm over (B, C, *spatial) fp32/fp16/bf16 x (contiguous NCHW or (B, C, L)), statistics in
    fp32, then SiLU when activation == "silu". weight/bias: (C,) or None. Returns x's shape and dtype.
    Differentiable on both paths. ``backend`` overrides LDM_KERNELS for this call."""
    if not use_triton(x, backend=backend):
        return group_norm_reference(x, num_groups, weight, bias, eps, activation)
    check_group_norm_args(x, num_groups, weight, bias, activation)
    return group_norm_op(x, num_groups, weight, bias, eps, activation == "silu")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
              backend: str | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v per (batch, head). q: (B, H, Lq, D), k/v: (B, H, Lk, D), one dtype of
    fp32/fp16/bf16; key_padding_mask: (B, Lk) bool (True = attend); scale defaults to 1/sqrt(D).
    Returns (B, H, Lq, D) in q's dtype, zeros for a batch element whose keys are all masked.
    The Triton kernel is forward only: under "auto", inputs that need gradients take the reference.
    ``backend`` overrides LDM_KERNELS for this call."""
    if q.dim() != 4:
        check_attention_args(q, k, v, key_padding_mask)  # raises, naming the shapes
    unsupported = None
    if q.shape[-1] > MAX_HEAD_DIM:
        unsupported = f"attention with head dim {q.shape[-1]} (the kernel's maximum is {MAX_HEAD_DIM})"
    elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        unsupported = "attention that needs gradients (the kernel is forward only)"
    if not use_triton(q, unsupported, backend):
        return attention_reference(q, k, v, key_padding_mask, scale)
    check_attention_args(q, k, v, key_padding_mask)
    return attention_op(q, k, v, key_padding_mask, scale)
