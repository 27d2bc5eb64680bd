#!/usr/bin/env bash
# Creates .venv (once, and again when pyproject.toml, the lock or this script changes) and installs the project into
# it with every package at the version requirements/lock.txt pins (the set the suite last passed on), taken as pip
# constraints so that only what LDM_EXTRAS needs is installed. LDM_UNLOCKED=1 resolves afresh from pyproject's ranges.
# Torch: an interpreter that already imports torch (say, a CUDA build) lends it to the venv through
# --system-site-packages and it is never replaced (nor is any pin its own requirements exclude: see
# lock_constraints.py); otherwise LDM_TORCH_SPEC (pip arguments; default: the lock's torch, whose CPU build this
# machine's pip finds locally) is installed before anything can ask for a newer one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LDM_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
extras="${LDM_EXTRAS:-dev}"
stamp="$venv/.ldm-installed"
lock="$root/requirements/lock.txt"
unlocked="${LDM_UNLOCKED:-0}"
if [ "$unlocked" != 0 ] && [ "$unlocked" != 1 ]; then
    echo "bootstrap: LDM_UNLOCKED is '$unlocked'; expected 1 (resolve afresh) or 0 (install the lock, the default)" >&2
    exit 2
fi
if [ ! -f "$lock" ]; then
    echo "bootstrap: $lock is missing; expected the committed lock (git checkout requirements/lock.txt)" >&2
    exit 2
fi
want="$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" "$root/scripts/lock_constraints.py" "$lock" \
    | sha256sum | cut -d' ' -f1) $extras unlocked=$unlocked"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "bootstrap: $python is not Python >= 3.11; set PYTHON=/path/to/python3.11+" >&2
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
    read -r -a torch_spec <<< "${LDM_TORCH_SPEC:-$(grep -m1 -o '^torch==[^ ;]*' "$lock")}"
    echo "bootstrap: installing ${torch_spec[*]}" >&2
    "${pip[@]}" "${torch_spec[@]}"
fi
if [ "$unlocked" = 1 ]; then
    echo "bootstrap: installing ldm-runtime[$extras] into $venv, resolved afresh (LDM_UNLOCKED=1)" >&2
    "${pip[@]}" -e "$root[$extras]"
else
    constraints="$venv/ldm-constraints.txt"
    "$venv/bin/python" "$root/scripts/lock_constraints.py" "$lock" > "$constraints"
    echo "bootstrap: installing ldm-runtime[$extras] into $venv at the versions of requirements/lock.txt" >&2
    "${pip[@]}" -c "$constraints" -e "$root[$extras]"
fi
echo "$want" > "$stamp"
