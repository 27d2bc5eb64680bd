"""scripts/bootstrap.sh installs the project at the versions of requirements/lock.txt (as pip constraints, less torch
and less whatever the installed torch pins itself), or resolves afresh with LDM_UNLOCKED=1; LDM_TORCH_SPEC is pip
arguments, split into words. The venv's python is a stub that records each pip call (one argument a line), says torch
is missing, and runs scripts with the real interpreter, so nothing installs."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"
PIP_OPTIONS = ["--quiet", "--disable-pip-version-check"]

STUB_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-c" ]; then exit 1; fi  # 'import torch': not installed
if [ "$1 $2 $3" = "-m pip install" ]; then
    shift 3
    printf '%s\\n' "$@" >> "$(dirname "$0")/pip-calls"
    printf '%s\\n' "----" >> "$(dirname "$0")/pip-calls"
    exit 0
fi
case "$1" in *.py) exec "$REAL_PYTHON" "$@" ;; esac
exit 2
"""


def run_bootstrap(tmp_path: Path, **env_overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stub = venv / "bin" / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key not in ("LDM_TORCH_SPEC", "LDM_UNLOCKED")}
    env.update(LDM_VENV=str(venv), PYTHON=sys.executable, REAL_PYTHON=sys.executable, LDM_EXTRAS="dev",
               **env_overrides)
    result = subprocess.run(["bash", str(REPO / "scripts" / "bootstrap.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    return result, venv


def pip_calls(tmp_path: Path, **env_overrides: str) -> list[list[str]]:
    result, venv = run_bootstrap(tmp_path, **env_overrides)
    assert result.returncode == 0, result.stderr
    calls = (venv / "bin" / "pip-calls").read_text().split("----\n")
    return [call.splitlines() for call in calls if call]


def locked_torch() -> str:
    pins = [line.split(";")[0].strip() for line in LOCK.read_text().splitlines() if line.startswith("torch==")]
    assert len(pins) == 1, pins
    return pins[0]


def test_torch_spec_with_an_index_url_reaches_pip_as_separate_arguments(tmp_path):
    calls = pip_calls(tmp_path, LDM_TORCH_SPEC="torch==2.13.0+cpu  --index-url https://download.pytorch.org/whl/cpu")
    assert calls == [
        [*PIP_OPTIONS, "torch==2.13.0+cpu", "--index-url", "https://download.pytorch.org/whl/cpu"],
        [*PIP_OPTIONS, "-c", str(tmp_path / "venv" / "ldm-constraints.txt"), "-e", f"{REPO}[dev]"],
    ]


def test_default_torch_spec_is_the_locked_torch_and_the_project_installs_under_the_lock(tmp_path):
    calls = pip_calls(tmp_path)
    assert calls[0] == [*PIP_OPTIONS, locked_torch()] and len(calls) == 2
    constraints = (tmp_path / "venv" / "ldm-constraints.txt").read_text().splitlines()
    lock_pins = [line.split("#")[0].strip() for line in LOCK.read_text().splitlines() if line[:1].isalnum()]
    # the stub runs lock_constraints.py with this interpreter, whose torch is pinned as it is
    installed_torch = [f"torch=={importlib.metadata.version('torch')}"]
    assert constraints == [pin for pin in lock_pins if not pin.startswith("torch==")] + installed_torch
    assert any(pin.startswith("transformers==") for pin in constraints), constraints


def test_unlocked_resolves_from_the_ranges_without_constraints(tmp_path):
    calls = pip_calls(tmp_path, LDM_UNLOCKED="1")
    assert calls == [[*PIP_OPTIONS, locked_torch()], [*PIP_OPTIONS, "-e", f"{REPO}[dev]"]]


def test_an_unknown_unlocked_value_is_refused_in_one_line(tmp_path):
    result, venv = run_bootstrap(tmp_path, LDM_UNLOCKED="yes")
    assert result.returncode == 2 and not (venv / "bin" / "pip-calls").exists()
    assert result.stderr == ("bootstrap: LDM_UNLOCKED is 'yes'; expected 1 (resolve afresh) or 0 (install the lock, "
                             "the default)\n")


@pytest.fixture(scope="module")
def lock_constraints():
    spec = importlib.util.spec_from_file_location("lock_constraints", REPO / "scripts" / "lock_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOCK_TEXT = """# a comment
numpy==2.4.6 ; python_full_version == '3.11.*'
    # via torch
torch==2.13.0
triton==3.7.1 ; sys_platform == 'linux'
sympy==1.14.0
"""


def test_a_cuda_torchs_own_pins_win_over_the_lock(lock_constraints, capsys):
    Requirement = lock_constraints.Requirement
    cuda_torch = {"triton": Requirement("triton==3.6.0"), "sympy": Requirement("sympy>=1.13.3")}
    assert lock_constraints.constraints(LOCK_TEXT, cuda_torch) == [
        "numpy==2.4.6 ; python_full_version == '3.11.*'", "sympy==1.14.0"]
    assert "triton 3.7.1 left to torch, which requires triton==3.6.0" in capsys.readouterr().err


def test_a_cpu_torch_leaves_every_pin_but_its_own(lock_constraints):
    assert lock_constraints.constraints(LOCK_TEXT, {}) == [
        "numpy==2.4.6 ; python_full_version == '3.11.*'", "triton==3.7.1 ; sys_platform == 'linux'", "sympy==1.14.0"]


def test_the_committed_lock_pins_every_package_exactly(lock_constraints):
    pins = lock_constraints.constraints(LOCK.read_text(), {})
    assert len(pins) > 50
    unpinned = [pin for pin in pins if "==" not in pin.split(";")[0]]
    assert not unpinned, unpinned
