"""The engine dir every server test serves: one fp32 export of the tiny checkpoint per test run."""

from pathlib import Path

import pytest

from tests.ldm_export.tiny_checkpoint import shared_tiny_engine


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory) -> Path:
    _, engine, code, output = shared_tiny_engine(tmp_path_factory, "fp32")
    assert code == 0, output
    return engine
