"""The run's random inputs replay: the same ``LDM_TEST_SEED`` gives a test the same draws, another one other draws."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST = "tests/ldm_runtime/test_noise.py::test_initial_noise_of_a_batch_equals_each_seed_drawn_alone"


def drawn_seeds(base_seed: str) -> str:
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q", "-s",
                             TEST], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "LDM_TEST_SEED": base_seed})
    assert result.returncode == 0, result.stdout + result.stderr
    return re.search(r"^seeds \[.*\]$", result.stdout, re.MULTILINE).group(0)


def test_the_same_base_seed_replays_a_tests_random_draws_and_another_changes_them():
    assert drawn_seeds("1234") == drawn_seeds("1234")
    assert drawn_seeds("1234") != drawn_seeds("1235")


def test_a_base_seed_that_is_not_a_number_is_refused_in_one_line():
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q", TEST],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "LDM_TEST_SEED": "abc"})
    assert result.returncode != 0 and "LDM_TEST_SEED is 'abc'; expected a whole number" in result.stderr
