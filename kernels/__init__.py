"""Fused kernels with plain PyTorch references; ``kernels.dispatch`` picks one per call.

``kernels.group_norm`` and ``kernels.attention`` are the functions models call (LDM_KERNELS =
auto | reference | triton, see kernels/dispatch.py). They share their names with the modules that
hold the Triton kernels, so reach those with ``from kernels.group_norm import group_norm_triton``.
"""

from kernels.dispatch import attention, group_norm

__all__ = ["attention", "group_norm"]
