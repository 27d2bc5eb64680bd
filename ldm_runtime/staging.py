"""Temporary folders beside a target, and the removal of those that a killed writer left behind.

A writer builds ``target`` in a folder ``.{target.name}.partial-XXXXXXXX`` beside it (an engine dir is that folder;
a single file is written inside it) and renames it into place once it is complete. A SIGKILL or a power cut runs
no cleanup, so a partial copy would stay for ever. Instead each writer holds an exclusive ``flock`` on its folder
for as long as it lives (the kernel drops it when the process dies, however it dies), and every later writer of
the same target first removes the folders whose lock it can take: those of writers that have died. A live
writer's folder is never touched, so concurrent writers of one target stay safe (a fresh folder that a sweep removes
in the instant before its writer locks it is replaced by another). No lock is taken on the parent folder, which
may itself be a writer's locked temporary folder. Only the standard library is imported here; locks need POSIX
``flock`` (Linux, macOS).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

PARTIAL = "partial"  # a target being written
REPLACED = "replaced"  # an old target moved aside while its replacement is renamed into place


def current_umask() -> int:
    """This process's umask (read by setting it and putting it back): the permissions a folder this module makes
    private (mkdtemp) gives up where it becomes a shared artifact."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temporary_prefix(target: Path, kind: str = PARTIAL) -> str:
    """The name every temporary copy of ``target`` of this kind starts with: ``.{name}.{kind}-``."""
    return f".{target.name}.{kind}-"


def _lock_if_dead(path: Path) -> int | None:
    """A descriptor holding folder ``path``'s lock when no live writer holds it, else None (and None for a
    symlink or anything else that is not a folder we can open)."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(handle)
        return None
    return handle


def remove_dead_temporaries(target: Path, kinds: tuple[str, ...] = (PARTIAL, REPLACED)) -> list[Path]:
    """Remove the temporary copies of ``target`` (of these kinds) whose writers have died; returns them. A writer
    creating its folder at this instant may see it removed before it locked it: ``temporary_folder`` then takes
    another."""
    removed = []
    prefixes = tuple(temporary_prefix(target, kind) for kind in kinds)
    try:
        names = sorted(name for name in os.listdir(target.parent) if name.startswith(prefixes))
    except OSError:
        return removed
    for name in names:
        path = target.parent / name
        handle = _lock_if_dead(path)
        if handle is None:
            continue
        try:
            if name.startswith(temporary_prefix(target, REPLACED)):
                _put_back(path / target.name, target)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(handle)
    return removed


def _put_back(aside: Path, target: Path) -> None:
    """A writer killed between moving the old ``target`` aside and renaming its replacement into place left no
    ``target``: the old one goes back, as if the replacement had never been tried."""
    if os.path.lexists(aside) and not os.path.lexists(target):
        os.replace(aside, target)


@contextlib.contextmanager
def temporary_folder(target: Path, kind: str = PARTIAL) -> Iterator[Path]:
    """A fresh, locked, private folder beside ``target`` (its parent is created if missing), after removing
    what dead writers of ``target`` left. Removed on exit unless the caller renamed it away; the lock is
    held until exit, through the rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(target)
    folder, handle = _new_locked_folder(target, kind)
    try:
        yield folder
    finally:
        try:
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(handle)


def _new_locked_folder(target: Path, kind: str) -> tuple[Path, int]:
    """mkdtemp beside ``target``, then lock it. Until the lock is taken another writer's sweep may take it for a
    dead writer's and remove it; then this writer notices (the lock fails, or the path no longer names the folder
    it locked) and makes another."""
    while True:
        folder = Path(tempfile.mkdtemp(prefix=temporary_prefix(target, kind), dir=target.parent))
        try:
            handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(folder, follow_symlinks=False).st_ino == os.fstat(handle).st_ino:
                return folder, handle
        except (BlockingIOError, FileNotFoundError):
            pass
        os.close(handle)


def write_atomic(path: Path, write) -> None:
    """Write ``path`` through ``write(temporary_path)`` into a locked temporary folder beside it, fsync it, then
    rename it over ``path``: a crash leaves the old file or the new one, and the next writer of ``path`` removes
    what a killed one left. (The lock is on the folder, since writers such as safetensors replace the file.)"""
    with temporary_folder(path) as folder:
        temporary = folder / path.name
        write(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
