"""scripts/bootstrap.sh hands pip what it was given: LDM_TORCH_SPEC is pip arguments, split into words. The venv's
python is a stub that records each pip call (one argument a line) and says torch is missing, so nothing installs."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STUB_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-c" ]; then exit 1; fi  # 'import torch': not installed
if [ "$1 $2 $3" = "-m pip install" ]; then
    shift 3
    printf '%s\\n' "$@" >> "$(dirname "$0")/pip-calls"
    printf '%s\\n' "----" >> "$(dirname "$0")/pip-calls"
    exit 0
fi
exit 2
"""


def pip_calls(tmp_path: Path, torch_spec: str | None) -> list[list[str]]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stub = venv / "bin" / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "LDM_TORCH_SPEC"}
    env.update(LDM_VENV=str(venv), PYTHON=sys.executable, LDM_EXTRAS="dev")
    if torch_spec is not None:
        env["LDM_TORCH_SPEC"] = torch_spec
    result = subprocess.run(["bash", str(REPO / "scripts" / "bootstrap.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = (venv / "bin" / "pip-calls").read_text().split("----\n")
    return [call.splitlines() for call in calls if call]


def test_torch_spec_with_an_index_url_reaches_pip_as_separate_arguments(tmp_path):
    calls = pip_calls(tmp_path, "torch==2.13.0+cpu  --index-url https://download.pytorch.org/whl/cpu")
    options = ["--quiet", "--disable-pip-version-check"]
    assert calls == [
        [*options, "torch==2.13.0+cpu", "--index-url", "https://download.pytorch.org/whl/cpu"],
        [*options, "-e", f"{REPO}[dev]"],
    ]


def test_default_torch_spec_is_the_pinned_cpu_build(tmp_path):
    calls = pip_calls(tmp_path, None)
    assert calls[0][-1] == "torch==2.13.0" and len(calls) == 2
