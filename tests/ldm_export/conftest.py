"""One fp32 and one fp16 export of the tiny checkpoint per test run, shared by the export tests."""

import pytest

from tests.ldm_export.tiny_checkpoint import shared_tiny_checkpoint, shared_tiny_engine


@pytest.fixture(scope="session")
def fp32_export(tmp_path_factory):
    return shared_tiny_engine(tmp_path_factory, "fp32")


@pytest.fixture(scope="session")
def fp16_export(tmp_path_factory):
    return shared_tiny_engine(tmp_path_factory, "fp16")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return shared_tiny_checkpoint(tmp_path_factory)
