"""Where ``ldm-export`` writes: ``--out`` must be new, or with ``--force`` an engine dir (or an empty folder).

Light on imports, so that ``ldm-export`` refuses a bad ``--out`` before it loads torch and onnx.
"""

from __future__ import annotations

from pathlib import Path

from ldm_export.errors import ExportError
from ldm_runtime.command_line import check_replaceable_folder, check_writable_folder
from ldm_runtime.errors import EngineDirError
from ldm_runtime.manifest import MANIFEST_JSON, load_manifest


def check_out(out: Path, force: bool) -> None:
    """An existing --out is refused unless --force, and --force replaces only an engine dir or an empty folder;
    ``UsageError`` when --out could not be written at all (its folder is a file, or not writable)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder; expected the path of a new engine dir (or of an "
                          f"engine dir to replace with --force)")
    check_writable_folder("--out's folder", out.parent)
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise ExportError(f"--out {out} already exists; pass --force to replace it")
    if out.is_dir() and not out.is_symlink() and (_is_engine_dir(out) or not any(out.iterdir())):
        check_replaceable_folder("--out", out)
        return
    raise ExportError(f"--out {out} exists and is not an engine dir (no {MANIFEST_JSON} that ldm-export wrote); "
                      f"refusing to replace it even with --force")


def _is_engine_dir(folder: Path) -> bool:
    """Whether ``folder``'s manifest.json is an engine manifest the runtime reads (another program's manifest.json,
    a web app's say, is not)."""
    try:
        load_manifest(folder)
    except EngineDirError:
        return False
    return True
