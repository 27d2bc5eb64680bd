"""ldm-export on a full disk: one line naming --out, a non-zero exit, and --out as it was (nothing, or the old
engine dir), with nothing half-written beside it."""

import errno
import os
import shutil

import pytest

import ldm_export.cli
import ldm_export.engine_dir
from ldm_export.cli import main


def out_of_space_halfway(specs, modules, dims, opset, convert, staging, log):
    """export_all that writes part of the first graph into the staging folder, then finds the disk full."""
    (staging / "text_encoder.onnx").write_bytes(b"\x08\x07" * 1000)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staging / "text_encoder.onnx"))


def beside(out) -> list[str]:
    return sorted(name for name in os.listdir(out.parent) if name.startswith(f".{out.name}."))


@pytest.mark.parametrize("old_engine", [False, True], ids=["new out", "forced over an engine dir"])
def test_a_full_disk_mid_export_is_one_line_and_leaves_out_as_it_was(old_engine, tiny_checkpoint, tmp_path, capsys,
                                                                       monkeypatch, request):
    out = tmp_path / "engine"
    if old_engine:  # --force replaces only a folder whose manifest.json is an engine manifest
        shutil.copytree(request.getfixturevalue("fp32_export")[1], out)
        before = {path.relative_to(out): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}
    monkeypatch.setattr(ldm_export.engine_dir, "export_all", out_of_space_halfway)
    force = ["--force"] if old_engine else []
    assert main([str(tiny_checkpoint), "--out", str(out), "--skip-validation", *force]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"ldm-export: error: no space left on device writing {out} ({out} is as it was: free space and export again)")
    if old_engine:
        assert {path.relative_to(out): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()} == before
    else:
        assert not out.exists()
    assert beside(out) == []


def test_a_full_disk_rebuilding_plans_is_one_line(tmp_path, capsys, monkeypatch):
    def quota_exceeded(engine_dir, log):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(engine_dir / "unet.plan"))

    monkeypatch.setattr(ldm_export.cli, "rebuild_plans", quota_exceeded)
    engine = tmp_path / "engine"
    assert main(["--rebuild-plans", str(engine)]) == 2
    assert capsys.readouterr().err == (f"ldm-export: error: disk quota exceeded writing {engine} (free space and run "
                                       f"--rebuild-plans again)\n")


def test_another_os_error_keeps_its_traceback(tiny_checkpoint, tmp_path, monkeypatch):
    def broken(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(ldm_export.engine_dir, "export_all", broken)
    with pytest.raises(OSError, match="Input/output error"):
        main([str(tiny_checkpoint), "--out", str(tmp_path / "engine"), "--skip-validation"])
