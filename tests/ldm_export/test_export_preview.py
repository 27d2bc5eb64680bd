"""The latent preview map (``latent_preview.json``) travels with the model: ldm-export writes the one fitted on the
eager model into the engine dir, or copies the checkpoint's own (checked first: a broken one stops the export in one
line before any graph is written), so that a server starts without fitting one."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import ldm_export.onnx_export
from ldm_export.cli import main
from ldm_runtime.engines.torch_engine import TorchEngine
from ldm_runtime.previews import (MIN_FIT_R2, PREVIEW_FILE, LatentPreview, fit_latent_preview, load_latent_preview,
                                  save_latent_preview)
from tests.ldm_export.test_export_cli import stand_in_graph


def test_the_engine_dir_holds_the_map_fitted_on_the_eager_model_or_none_where_it_explains_too_little(fp32_export):
    checkpoint, engine, code, output = fp32_export
    assert code == 0, output
    expected, score = fit_latent_preview(TorchEngine(checkpoint, device="cpu"))
    config = TorchEngine(checkpoint, device="cpu").info
    written = load_latent_preview(engine, config.latent_channels, config.latent_factor)
    if score >= MIN_FIT_R2:
        assert written is not None and np.allclose(written.weights, expected.weights, atol=1e-6)
        assert f"wrote {PREVIEW_FILE} (a linear map from latents to RGB explaining R² {score:.2f}" in output
    else:
        assert written is None and f"no {PREVIEW_FILE}: a linear map explains R² {score:.2f}" in output


@pytest.fixture
def quick_export(monkeypatch):
    """ldm-export with stand-in graphs and no validation: what is left to test is the folder around the graphs."""
    monkeypatch.setattr(ldm_export.onnx_export, "export_graph", stand_in_graph)
    return lambda checkpoint, out: main([str(checkpoint), "--out", str(out), "--skip-validation"])


def test_a_checkpoints_own_map_is_copied_into_the_engine_dir(tiny_checkpoint, tmp_path, quick_export, capsys):
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")
    weights = np.arange(15, dtype=np.float32).reshape(5, 3) / 20  # tiny: 4 latent channels and a bias row, f=2
    save_latent_preview(checkpoint, LatentPreview(weights=weights, factor=2))
    assert quick_export(checkpoint, tmp_path / "engine") == 0, capsys.readouterr().err
    assert (tmp_path / "engine" / PREVIEW_FILE).read_bytes() == (checkpoint / PREVIEW_FILE).read_bytes()
    assert f"copied {checkpoint / PREVIEW_FILE}" in capsys.readouterr().err


def test_a_broken_map_in_the_checkpoint_is_one_line_before_any_graph_is_written(tiny_checkpoint, tmp_path,
                                                                                monkeypatch, capsys):
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")
    (checkpoint / PREVIEW_FILE).write_text('{"format": 1, "factor": 2, "weights": [[0, 0, 0]]}')
    exported = []
    monkeypatch.setattr(ldm_export.onnx_export, "export_graph", lambda *args: exported.append(args))
    assert main([str(checkpoint), "--out", str(tmp_path / "engine")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{checkpoint / PREVIEW_FILE} is not a latent preview map" in err, err
    assert exported == [] and not (tmp_path / "engine").exists()
