#!/usr/bin/env bash
# The whole GPU check in one call, on a CUDA machine that has python3 with torch, triton and pytest
# (no venv, nothing installed): the kernel tests compiled on the GPU (TRITON_INTERPRET and LDM_KERNELS
# unset), both kernel benchmarks, the triton engine's tests, the sd15 UNet step (eager fp16 against
# the triton engine), and, wherever tensorrt imports, the tensorrt engine against the onnxruntime engine on a
# tiny engine dir exported with --backend tensorrt (scripts/tensorrt_parity.py). Results go to "${OUT:-./gpu-results}"; the exit status is
# non-zero if any step failed, and every step runs even after an earlier one fails.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-./gpu-results}"
python="${PYTHON:-python3}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET LDM_KERNELS
failed=()

section() { printf '\n==== %s\n' "$*"; }

section "device"
if ! "$python" -c 'import torch' 2>/dev/null; then
    echo "gpu_check: $python cannot import torch; set PYTHON to an interpreter with CUDA torch and triton" >&2
    exit 2
fi
if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device is visible to $python (torch.cuda.is_available() is False)" >&2
    exit 2
fi
if ! "$python" -c 'import triton, pytest' 2>/dev/null; then
    echo "gpu_check: $python lacks triton or pytest, which this check uses but does not install" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
"$python" - <<'EOF' | tee "$out/device.txt"
import torch, triton
print(f"gpu: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, triton {triton.__version__}")
EOF

# run_step NAME STEM COMMAND...: COMMAND's output also goes to $out/STEM.txt; NAME is recorded if it fails
run_step() {
    local name="$1" stem="$2"
    shift 2
    if ! "$@" 2>&1 | tee "$out/$stem.txt"; then
        failed+=("$name")
    fi
}

section "kernel tests (compiled Triton on the GPU)"
run_step "kernel tests" pytest-kernels "$python" -m pytest tests/ldm_kernels -m "not slow" -q -rs -p no:cacheprovider \
    --junitxml="$out/pytest-kernels.xml"

section "GroupNorm+SiLU benchmark"
run_step bench_group_norm bench_group_norm "$python" benchmarks/bench_group_norm.py --json "$out/bench_group_norm.json"

section "attention benchmark"
run_step bench_attention bench_attention "$python" benchmarks/bench_attention.py --json "$out/bench_attention.json"

section "triton engine tests (compiled Triton and CUDA graphs on the GPU)"
run_step "triton engine tests" pytest-triton-engine "$python" -m pytest tests/ldm_runtime/test_triton_engine.py -q -rs \
    -p no:cacheprovider --junitxml="$out/pytest-triton-engine.xml"

section "UNet step benchmark: eager fp16 against the triton engine (sd15, 64x64 latents)"
run_step bench_unet_step bench_unet_step "$python" benchmarks/bench_unet_step.py --json "$out/bench_unet_step.json"

section "tensorrt engine: parity with the onnxruntime engine (tiny model, fp32 and fp16 plans)"
if ! "$python" -c 'import tensorrt' 2>/dev/null; then
    echo "tensorrt engine: skipped (import tensorrt fails for $python)" | tee "$out/tensorrt-parity.txt"
elif ! missing="$("$python" -c '
import importlib.util
names = ("onnx", "onnxscript", "onnxruntime", "tokenizers", "transformers", "safetensors")
print(" ".join(name for name in names if importlib.util.find_spec(name) is None))')" || [ -n "$missing" ]; then
    echo "tensorrt engine: skipped (tensorrt imports, but $python lacks: ${missing:-?}, which the export needs)" \
        | tee "$out/tensorrt-parity.txt"
else
    run_step "tensorrt parity" tensorrt-parity "$python" scripts/tensorrt_parity.py --json "$out/tensorrt_parity.json"
fi

section "summary"
echo "results in $out"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "gpu_check: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "gpu_check: all steps passed"
