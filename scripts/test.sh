#!/usr/bin/env bash
# Sets up .venv if needed, then runs the test suite on the CPU (Triton kernels under its interpreter).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh"
cd "$root"
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
# One thread per xdist worker: two workers on two cores, no oversubscription. Tests marked with one xdist_group
# run on one worker (the Ray tests: one Ray instance at a time). The report ends with the 25 slowest tests.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# a worker that dies is not replaced: the run ends naming the test it died in (a replaced worker can leave
# pytest-xdist 3.8's loadgroup scheduling waiting for ever at the end of the run)
exec "$root/.venv/bin/python" -m pytest -n "${LDM_TEST_WORKERS:-2}" --dist loadgroup --max-worker-restart=0 \
    --durations=25 "$@"
