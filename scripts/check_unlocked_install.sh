#!/usr/bin/env bash
# Installs ldm-runtime's wheel into a clean venv with today's newest releases (no lock) beside Hugging Face's
# `kernels`, then checks that pip check is clean, that `import kernels` is Hugging Face's and `import ldm_kernels`
# ours, and that the demo model samples. Needs the package registry; writes only under a temporary folder
# (LDM_CHECK_DIR keeps it), and exits non-zero at the first failure.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
work="${LDM_CHECK_DIR:-$(mktemp -d)}"
[ -n "${LDM_CHECK_DIR:-}" ] || trap 'rm -rf "$work"' EXIT
read -r -a torch_spec <<< "${LDM_TORCH_SPEC:-$(grep -m1 -o '^torch==[^ ;]*' "$root/requirements/lock.txt")}"
"$python" -m venv "$work/venv"
py="$work/venv/bin/python"
pip=("$py" -m pip install --quiet --disable-pip-version-check)
echo "check: installing ${torch_spec[*]} and building the wheel" >&2
"${pip[@]}" "${torch_spec[@]}" "setuptools>=68" wheel
mkdir -p "$work/source"  # the build writes build/ and *.egg-info: into a copy, not the working tree
tar -C "$root" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./runs --exclude='*.egg-info' -cf - . \
    | tar -C "$work/source" -xf -
"$py" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation "$work/source" -w "$work/dist"
wheel="$(ls "$work/dist"/ldm_runtime-*.whl)"
echo "check: installing $(basename "$wheel") with the newest transformers and kernels" >&2
"${pip[@]}" "$wheel[cpu]" "transformers>=5.25" kernels
"$py" -m pip check
"$py" -m pip freeze | grep -iE '^(torch|transformers|kernels|numpy|onnxruntime)=='
cd "$work"
"$py" - <<'PY'
import kernels, ldm_kernels
assert "site-packages/kernels/" in kernels.__file__ and hasattr(kernels, "get_kernel"), kernels.__file__
assert "site-packages/ldm_kernels/" in ldm_kernels.__file__, ldm_kernels.__file__
print(f"check: import kernels -> {kernels.__file__}; import ldm_kernels -> {ldm_kernels.__file__}")
PY
"$work/venv/bin/ldm-sample" --model "$root/models/shapes-demo" "a large red circle on the left, on a blue background" \
    --seed 0 --steps 25 --out "$work/sample"
test -s "$work/sample/000-seed0.png"
echo "check: the wheel installs beside today's transformers and kernels, and the demo model samples"
