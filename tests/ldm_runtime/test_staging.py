"""What a killed writer leaves beside its target is removed by the next writer of the same target, and only that:
a live writer's temporary copy, and other targets' copies, are left alone. Writers are real processes killed with
SIGKILL (no cleanup code runs), at a point they announce, so nothing depends on the machine's speed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ldm_runtime.staging import REPLACED, remove_dead_temporaries, temporary_folder, write_atomic

REPO = Path(__file__).resolve().parents[2]


class Writer:
    """A child process that runs ``script`` (``target`` is bound to a Path), prints "ready" and then waits
    until it is killed."""

    def __init__(self, target: Path, script: str):
        code = "import sys\nfrom pathlib import Path\nfrom ldm_runtime.staging import *\n" \
               f"target = Path({str(target)!r})\n" + textwrap.dedent(script) + \
               "\nprint('ready', flush=True)\nsys.stdin.read()\n"
        self.process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if line != "ready\n":
            self.process.kill()
            raise AssertionError(f"writer did not start: {line!r} {self.process.stderr.read()}")

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()
        self.process.stderr.close()


@pytest.fixture
def writers():
    started: list[Writer] = []

    def start(target: Path, script: str) -> Writer:
        started.append(Writer(target, script))
        return started[-1]

    yield start
    for writer in started:
        if writer.process.poll() is None:
            writer.kill()


HOLD_FOLDER = """
    held = temporary_folder(target)
    folder = held.__enter__()
    (folder / "graph.onnx").write_bytes(b"x" * 100_000)
"""


def temporaries(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def test_a_killed_writers_folder_is_removed_by_the_next_writer_of_the_same_target(tmp_path, writers):
    target = tmp_path / "engine"
    writers(target, HOLD_FOLDER).kill()
    [left] = temporaries(target)
    assert left.startswith(".engine.partial-") and (tmp_path / left / "graph.onnx").stat().st_size == 100_000

    with temporary_folder(target) as folder:
        assert temporaries(target) == [folder.name]  # the killed writer's folder is gone, ours is there
    assert temporaries(target) == []


def test_a_live_writers_folder_and_other_targets_folders_are_left_alone(tmp_path, writers):
    target = tmp_path / "engine"
    live = writers(target, HOLD_FOLDER)
    other = writers(tmp_path / "engine-2", HOLD_FOLDER)
    other.kill()
    [live_folder] = temporaries(target)
    [other_folder] = temporaries(tmp_path / "engine-2")

    with temporary_folder(target) as folder:
        (folder / "mine").write_text("complete")
        os.replace(folder, target)
    assert (target / "mine").read_text() == "complete"
    assert temporaries(target) == [live_folder] and (tmp_path / live_folder / "graph.onnx").is_file()
    assert temporaries(tmp_path / "engine-2") == [other_folder]  # another target: its own writers clean it

    live.kill()
    with temporary_folder(target):
        pass
    assert temporaries(target) == []


def test_an_old_target_moved_aside_by_a_killed_writer_is_put_back(tmp_path, writers):
    target = tmp_path / "engine"
    target.mkdir()
    (target / "manifest.json").write_text("old engine")
    # killed between moving the old engine aside and renaming its replacement into place
    writers(target, f"""
        held = temporary_folder(target, {REPLACED!r})
        aside = held.__enter__()
        target.rename(aside / target.name)
    """).kill()
    assert not target.exists() and len(temporaries(target)) == 1

    with temporary_folder(target):
        assert (target / "manifest.json").read_text() == "old engine"
    assert temporaries(target) == []


def test_a_killed_writers_temporary_file_is_removed_by_the_next_atomic_write(tmp_path, writers):
    target = tmp_path / "unet.safetensors"
    writers(target, """
        held = temporary_folder(target)
        (held.__enter__() / target.name).write_bytes(b"x" * 100_000)
    """).kill()
    assert len(temporaries(target)) == 1

    write_atomic(target, lambda path: path.write_bytes(b"weights"))
    assert target.read_bytes() == b"weights" and temporaries(target) == []


def test_a_failed_atomic_write_leaves_the_target_untouched_and_nothing_beside_it(tmp_path):
    target = tmp_path / "model.json"
    target.write_text("old")

    def fail(path: Path) -> None:
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_text() == "old" and temporaries(target) == []


def test_a_writer_that_replaces_the_file_keeps_its_temporary_copy_locked(tmp_path):
    target = tmp_path / "unet.safetensors"

    def replace_then_sweep(path: Path) -> None:
        path.with_name("elsewhere").write_bytes(b"weights")
        os.replace(path.with_name("elsewhere"), path)  # as safetensors' save_file does: a new inode
        remove_dead_temporaries(target)  # another writer of the same target starting now
        assert path.read_bytes() == b"weights"

    write_atomic(target, replace_then_sweep)
    assert target.read_bytes() == b"weights" and temporaries(target) == []


def test_a_file_written_atomically_inside_a_temporary_folder_does_not_wait_on_that_folders_lock(tmp_path):
    with temporary_folder(tmp_path / "engine") as staging:
        write_atomic(staging / "manifest.json", lambda path: path.write_text("{}"))  # as a TensorRT plan is
        assert (staging / "manifest.json").read_text() == "{}"
        assert sorted(p.name for p in staging.iterdir()) == ["manifest.json"]
