#!/usr/bin/env bash
# Regenerates requirements/lock.txt with uv: every package that the dev and ray extras need, at the newest versions
# that pyproject.toml's ranges allow, for every Python >= 3.11 and platform (uv's universal resolution), resolved
# with torch at LDM_LOCK_TORCH (default: the version the lock pins now, which bootstrap.sh installs).
# A new lock is a change like any other: ./scripts/test.sh (which installs from it) must pass before it is committed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lock="$root/requirements/lock.txt"
python="${PYTHON:-python3}"
torch_version="${LDM_LOCK_TORCH:-$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$lock" 2>/dev/null || true)}"
if [ -z "$torch_version" ]; then
    echo "refresh_lock: $lock pins no torch; set LDM_LOCK_TORCH to the torch version to lock with (e.g. 2.13.0)" >&2
    exit 2
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if command -v uv >/dev/null 2>&1; then
    uv=uv
else
    echo "refresh_lock: installing uv into a temporary venv" >&2
    "$python" -m venv "$work/uv"
    "$work/uv/bin/python" -m pip install --quiet --disable-pip-version-check uv
    uv="$work/uv/bin/uv"
fi
echo "torch==$torch_version" > "$work/torch.txt"
cd "$root"
"$uv" pip compile pyproject.toml --extra dev --extra ray --universal --python-version 3.11 \
    --constraint "$work/torch.txt" --custom-compile-command "./scripts/refresh_lock.sh" --quiet \
    --output-file "$work/lock.txt"
mkdir -p "$(dirname "$lock")"
# the torch constraint's temporary path would change the lock on every refresh: name its variable instead
sed "s|-c $work/torch.txt|-c LDM_LOCK_TORCH|" "$work/lock.txt" > "$lock"
echo "refresh_lock: wrote $lock ($(grep -c '^[a-z0-9]' "$lock") packages, torch $torch_version);" \
    "run ./scripts/test.sh before committing it" >&2
