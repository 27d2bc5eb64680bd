"""The engine dir every server test serves: one fp32 export of the tiny checkpoint per test run; the same without
its feature-caching graph; and the tiny checkpoint itself, for the tests that serve it on the torch engine."""

import json
import shutil
from pathlib import Path

import pytest

from tests.ldm_export.tiny_checkpoint import shared_tiny_checkpoint, shared_tiny_engine


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory) -> Path:
    _, engine, code, output = shared_tiny_engine(tmp_path_factory, "fp32")
    assert code == 0, output
    return engine


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return shared_tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def engine_dir_without_deep_cache(engine_dir, tmp_path_factory) -> Path:
    """The engine dir as an export without feature caching writes it: no unet_shallow graph, so its engine cannot
    cache the UNet's features across steps (``deep_cache`` false)."""
    from ldm_runtime.manifest import SHALLOW_UNET_GRAPH

    copy = tmp_path_factory.mktemp("engine-without-deep-cache") / "engine"
    shutil.copytree(engine_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for name in manifest["graphs"].pop(SHALLOW_UNET_GRAPH, {"files": {}})["files"]:
        (copy / name).unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return copy
