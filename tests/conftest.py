"""Random inputs that a failure can replay: one base seed per test run, from ``LDM_TEST_SEED`` when it is set,
else drawn fresh and shown in the report header. Each test derives its own seed from the base seed and its node
id (``seed``, ``rng``), and torch's and numpy's global generators are seeded with it before the test runs, so a
failing test replays alone or in any order with ``LDM_TEST_SEED=<base> ./scripts/test.sh -k <name>``."""

from __future__ import annotations

import hashlib
import os
import random
import secrets
import shutil
import sys
import tempfile

import numpy as np
import pytest

SEED_ENV = "LDM_TEST_SEED"
COMPILE_CACHE_ENV = "LDM_COMPILE_CACHE"  # ldm_runtime.engines.openvino_engine.CACHE_ENV, read without importing it


def pytest_configure(config: pytest.Config) -> None:
    # set before xdist starts its workers, which inherit the environment and so share the base seed
    if not os.environ.get(SEED_ENV):
        os.environ[SEED_ENV] = str(secrets.randbits(32))
    base_seed()
    # engines that cache compiled graphs by default keep them in a folder of this run, not in the user's cache
    if COMPILE_CACHE_ENV not in os.environ:
        os.environ[COMPILE_CACHE_ENV] = config._ldm_compile_cache = tempfile.mkdtemp(prefix="ldm-test-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = getattr(config, "_ldm_compile_cache", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def base_seed() -> int:
    text = os.environ[SEED_ENV]
    try:
        return int(text)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV} is {text!r}; expected a whole number") from None


def pytest_report_header(config: pytest.Config) -> str:
    return f"random inputs: {SEED_ENV}={base_seed()} (set it to replay them)"


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """This test's seed: a function of the run's base seed and the test's node id (32 bits)."""
    digest = hashlib.sha256(f"{base_seed()}:{request.node.nodeid}".encode()).digest()
    value = int.from_bytes(digest[:4], "little")
    print(f"random seed {value} ({SEED_ENV}={base_seed()} replays it)")  # shown by pytest when the test fails
    return value


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _seed_global_generators(seed: int) -> None:
    """Unseeded draws (``torch.randn`` without a generator, ``np.random.*``) replay too."""
    random.seed(seed)
    np.random.seed(seed)
    if "torch" in sys.modules:  # never import torch for a test that does not
        sys.modules["torch"].manual_seed(seed)
