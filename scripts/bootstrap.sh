#!/usr/bin/env bash
# Creates .venv (once, and again when pyproject.toml changes) and installs the project into it.
# Torch: an interpreter that already imports torch (say, a CUDA build) lends it to the venv through
# --system-site-packages and it is never replaced; otherwise LDM_TORCH_SPEC (pip arguments; default torch==2.13.0,
# the CPU build this machine's pip finds locally) is installed before anything can ask for a newer one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LDM_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
extras="${LDM_EXTRAS:-dev}"
stamp="$venv/.ldm-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1) $extras"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "bootstrap: $python is not Python >= 3.10; set PYTHON=/path/to/python3.10+" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    if "$python" -c 'import torch' 2>/dev/null; then
        echo "bootstrap: reusing the torch of $python ($("$python" -c 'import torch; print(torch.__version__)'))" >&2
        "$python" -m venv --system-site-packages "$venv"
    else
        "$python" -m venv "$venv"
    fi
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    # pip arguments, split on whitespace: "torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu"
    read -r -a torch_spec <<< "${LDM_TORCH_SPEC:-torch==2.13.0}"
    echo "bootstrap: installing ${torch_spec[*]}" >&2
    "${pip[@]}" "${torch_spec[@]}"
fi
echo "bootstrap: installing ldm-runtime[$extras] into $venv" >&2
"${pip[@]}" -e "$root[$extras]"
echo "$want" > "$stamp"
