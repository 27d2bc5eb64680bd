"""Fused kernels with plain PyTorch references; ``ldm_kernels.dispatch`` picks one per call.

``ldm_kernels.group_norm`` and ``ldm_kernels.attention`` are the functions models call (LDM_KERNELS =
auto | reference | triton, see ldm_kernels/dispatch.py). They share their names with the modules that
hold the Triton kernels, so reach those with ``from ldm_kernels.group_norm import group_norm_triton``.
"""

from ldm_kernels.dispatch import attention, group_norm

__all__ = ["attention", "group_norm"]
