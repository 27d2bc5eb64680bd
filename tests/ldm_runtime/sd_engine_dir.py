"""The SD 2.x-like tiny Stable Diffusion of tests/ldm_export/tiny_sd.py (v-prediction, linear projections: it stands
for both kinds, as in the export tests), imported with ldm-import and exported at fp32 once per test run, shared by
every module and pytest-xdist worker that runs an engine dir's image edits against diffusers."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.conftest import base_seed
from tests.ldm_export.tiny_checkpoint import _run_lock, _shared_root

KIND = "sd2"  # the folder of test_image_to_image's ``stable_diffusion("sd2")``: the same seed, the same weights


def shared_sd2_engine_dir(tmp_path_factory) -> tuple[Path, Path]:
    """(the diffusers folder, the fp32 engine dir ldm-export made of its import): written once per test run, with
    a validation seed derived from the run's base seed so that the export replays too."""
    from ldm_export.engine_dir import ExportOptions, export_engine
    from ldm_export.sd_import import import_source
    from tests.ldm_export.test_sd_import import _kind_seed
    from tests.ldm_export.tiny_sd import SD2_LIKE, write_diffusers_folder

    root = _shared_root(tmp_path_factory)
    folder = root / f"{KIND}-like-engine-fp32"
    source, engine_dir, done = folder / "diffusers", folder / "engine", folder / "done"
    with _run_lock(root, folder.name):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed part-way left
            write_diffusers_folder(SD2_LIKE, source, _kind_seed(KIND))
            checkpoint = import_source(source, folder / "checkpoint")
            seed = int.from_bytes(hashlib.sha256(f"{base_seed()}:{folder.name}".encode()).digest()[:4], "little")
            export_engine(checkpoint, engine_dir, ExportOptions(precision="fp32", validation_seed=seed))
            done.touch()
    return source, engine_dir


@pytest.fixture(scope="session")
def sd2_engines(tmp_path_factory):
    """engine name -> (diffusers' pipeline of the SD 2.x-like folder, our pipeline over that engine on the fp32
    engine dir of its import), each made on first use; skips where the engine's library is not installed."""
    made: dict[str, tuple] = {}

    def model(engine_name: str):
        pytest.importorskip(engine_name)
        from diffusers import StableDiffusionPipeline

        from ldm_runtime.engines import load_engine
        from ldm_runtime.pipeline import Pipeline

        if engine_name not in made:
            source, engine_dir = shared_sd2_engine_dir(tmp_path_factory)
            pipe = StableDiffusionPipeline.from_pretrained(str(source), safety_checker=None,
                                                           requires_safety_checker=False)
            engine = load_engine(engine_dir, engine=engine_name, intra_op_threads=1)
            assert engine.info.name == engine_name
            made[engine_name] = pipe, Pipeline(engine)
        return made[engine_name]

    return model
