"""The kernels lower through Triton's real compiler (TTIR -> PTX -> cubin for sm_90) on a machine
without a GPU, catching what the interpreter lets through: type changes of loop-carried values,
constexpr-only branches, dot shapes and dtypes the hardware path rejects."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ldm_kernels.dispatch import triton_available

REPO_ROOT = Path(__file__).resolve().parents[2]

LOWER_EVERY_VARIANT = """
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget

    group_norm = importlib.import_module("ldm_kernels.group_norm")
    attention = importlib.import_module("ldm_kernels.attention")
    TARGET = GPUTarget("cuda", 90, 32)

    def lower(kernel, argument_types, constexprs, **options):  # argument_types: the non-int32 ones
        signature = {name: "constexpr" if name in constexprs else argument_types.get(name, "i32")
                     for name in kernel.arg_names}
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        assert triton.compile(source, target=TARGET, options=options).asm["cubin"]

    for dtype, flags in (("fp16", True), ("bf16", False)):
        lower(group_norm._group_norm_partial_stats_kernel, {"x_ptr": f"*{dtype}", "stats_ptr": "*fp32"},
              {"BLOCK": 1024}, num_warps=4)
        lower(group_norm._group_norm_apply_kernel,
              {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "bias_ptr": "*fp32",
               "stats_ptr": "*fp32", "eps": "fp32"},
              {"HAS_WEIGHT": flags, "HAS_BIAS": flags, "APPLY_SILU": flags, "CHUNKS_POW2": 8, "BLOCK": 1024},
              num_warps=4)
    for dtype, element_size, head_dim, has_mask in (("fp16", 2, 64, True), ("bf16", 2, 256, False),
                                                    ("fp32", 4, 128, True)):
        block_m, block_n, num_warps, num_stages = attention._launch_config(head_dim, element_size, False)
        lower(attention._attention_forward_kernel,
              {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "mask_ptr": "*u8",
               "out_ptr": f"*{dtype}", "qk_scale_log2e": "fp32"},
              {"HAS_MASK": has_mask, "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
               "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": head_dim},
              num_warps=num_warps, num_stages=num_stages)
    print("lowered")
"""


@pytest.mark.skipif(not triton_available(), reason="needs the triton package")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile the kernels for real")
def test_kernels_lower_to_sm90_cubin_without_a_gpu():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(LOWER_EVERY_VARIANT)], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "lowered", result.stderr[-3000:]
