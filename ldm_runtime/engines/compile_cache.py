"""The openvino engine's compile cache: compiled graphs kept in a folder so that a later process loads them instead
of compiling again, and used only when they provably are what was stored under the key asked for.

An entry is ``<key>.blob`` (the compiled graph) and ``<key>.json`` (its record: the key, the blob's size and sha256),
each written whole or not at all; ``key`` is a sha256 over everything the compile depends on (``cache_key``). An entry
whose record names another key, whose blob's sha256 differs from the record, or that cannot be read is logged in one
line, dropped, and reported as a miss, so the caller compiles again. A folder owned by another user or writable by
others (without the sticky bit) is refused in one line, and an entry file owned by another user or writable by
others is dropped: either could hold a graph someone else compiled. Processes sharing a folder compile one at a
time under an exclusive ``flock`` on ``ldm-compile.lock``; one that has waited ``$LDM_COMPILE_LOCK_TIMEOUT`` seconds
(default 600) says so and goes on without the cache. Only the standard library is imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import stat
import time
from pathlib import Path
from typing import Any, Iterator

from ldm_runtime.errors import EngineLoadError
from ldm_runtime.staging import write_atomic

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

CACHE_ENV = "LDM_COMPILE_CACHE"
LOCK_TIMEOUT_ENV = "LDM_COMPILE_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 600.0
LOCK_POLL_S = 0.1  # how often a waiting process tries the lock again
CACHE_LOCK = "ldm-compile.lock"  # in the cache folder: held while compiling, so one process writes an entry at a time
RECORD_FORMAT = 1
log = logging.getLogger(__name__)


def default_cache_dir() -> Path | None:
    """Where compiled graphs are kept unless the caller names a folder: ``$LDM_COMPILE_CACHE`` (None when it is
    "off" or empty), else ``$XDG_CACHE_HOME/ldm-runtime/openvino``, else ``~/.cache/ldm-runtime/openvino``."""
    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return None if configured.strip().lower() in ("", "off") else Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ldm-runtime" / "openvino"


def lock_timeout_s() -> float:
    """Seconds a process waits for another's compile lock: ``$LDM_COMPILE_LOCK_TIMEOUT``, else 600."""
    text = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise EngineLoadError(f"{LOCK_TIMEOUT_ENV} is {text!r}; expected a number of seconds, 0 or more")
    return seconds


def cache_key(*parts: Any) -> str:
    """A hex sha256 naming a compile by everything it depends on (JSON-serialisable parts, dict keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def writable_by_others(info: os.stat_result) -> str | None:
    """Why another user could change this file or folder (a folder with the sticky bit only adds files, which
    are checked one by one), or None when only this user can."""
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        return f"it is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
    sticky_folder = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_folder:
        return f"other users can write to it (mode {stat.filemode(info.st_mode)})"
    return None


class UnusableEntry(Exception):
    """Why a cache entry cannot be trusted; the message is what the one-line warning says."""


def read_own_file(path: Path) -> bytes:
    """The bytes of regular file ``path`` (not through a symlink) that only this user can write, else
    ``UnusableEntry`` saying why; ``FileNotFoundError`` when there is none."""
    try:
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as error:  # ELOOP: a symlink
        raise UnusableEntry(f"{path.name} cannot be opened ({error.strerror or error})") from None
    with os.fdopen(handle, "rb") as file:
        info = os.fstat(handle)
        why = "it is not a regular file" if not stat.S_ISREG(info.st_mode) else writable_by_others(info)
        if why:
            raise UnusableEntry(f"{path.name}: {why}")
        return file.read()


class CompileCache:
    """Compiled graphs in ``folder``, keyed by ``cache_key``; open one with ``CompileCache.open``."""

    def __init__(self, folder: Path, lock_timeout_s: float):
        self.folder, self.lock_timeout_s = folder, lock_timeout_s

    @classmethod
    def open(cls, folder: str | Path) -> CompileCache | None:
        """The cache in ``folder`` (made, only this user may write, if missing), or None with a one-line warning
        when it cannot be made or others could write to it; the caller then compiles in this process only."""
        folder = Path(folder)
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            why = writable_by_others(folder.stat())
            if why is None and not os.access(folder, os.W_OK | os.X_OK):
                why = "this user cannot write to it"
        except OSError as error:
            why = str(error)
        if why:
            log.warning("the openvino compile cache %s cannot be used (%s); compiling in this process only (set %s "
                        "to a folder only you can write to, or to off)", folder, why, CACHE_ENV)
            return None
        return cls(folder, lock_timeout_s())

    def paths(self, key: str) -> tuple[Path, Path]:
        """The entry's blob and record."""
        return self.folder / f"{key}.blob", self.folder / f"{key}.json"

    def load(self, key: str) -> bytes | None:
        """The blob stored under ``key``; None when there is none, or when the entry is not provably the one
        written under ``key`` (then it is logged in one line and dropped)."""
        blob_path, record_path = self.paths(key)
        if not (os.path.lexists(blob_path) or os.path.lexists(record_path)):
            return None
        try:
            record = json.loads(read_own_file(record_path))
            blob = read_own_file(blob_path)
            if not isinstance(record, dict) or record.get("key") != key:
                raise UnusableEntry("its record is for another entry")
            if record.get("sha256") != hashlib.sha256(blob).hexdigest():
                raise UnusableEntry("its sha256 differs from the one recorded when it was written")
        except FileNotFoundError as error:
            self.drop(key, f"{Path(error.filename).name} is missing")
        except (OSError, ValueError, RecursionError) as error:  # ValueError: a record that is not JSON
            self.drop(key, f"it cannot be read ({error})")
        except UnusableEntry as error:
            self.drop(key, str(error))
        else:
            return blob
        return None

    def store(self, key: str, blob: bytes, **about: Any) -> None:
        """Keep ``blob`` under ``key``, with ``about`` (JSON values) in its record for a person reading it; a
        failure to write is logged, not raised, since the cache only saves time."""
        blob_path, record_path = self.paths(key)
        record = {"format": RECORD_FORMAT, "key": key, "bytes": len(blob),
                  "sha256": hashlib.sha256(blob).hexdigest(), **about}
        try:
            write_atomic(blob_path, lambda temporary: temporary.write_bytes(blob))
            write_atomic(record_path, lambda temporary: temporary.write_text(json.dumps(record, indent=1)))
        except OSError as error:
            log.warning("cannot write the openvino compile cache entry %s (%s); it will be compiled again next time",
                        blob_path, error)

    def drop(self, key: str, why: str) -> None:
        """Log in one line why the entry under ``key`` is not used, and remove it."""
        blob_path, record_path = self.paths(key)
        log.warning("the openvino compile cache entry %s is not used (%s); dropped it and compiling again",
                    blob_path, why)
        for path in (blob_path, record_path):
            with contextlib.suppress(OSError):  # a foreign file in a sticky folder stays; it is never read
                path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[bool]:
        """Hold the folder's compile lock across processes while the block runs. Yields False (after one line
        saying so) when another process held it for ``lock_timeout_s``: the block must then not use the cache.
        Where ``flock`` is missing or fails, yields True without a lock (entries are written whole and checked)."""
        if fcntl is None:
            yield True
            return
        with contextlib.ExitStack() as stack:
            try:
                lock = stack.enter_context(open(self.folder / CACHE_LOCK, "a"))
                held = self._wait_for(lock)
            except OSError as error:  # the folder went away, or a file system without flock
                log.warning("cannot lock the openvino compile cache %s (%s); compiling without the lock",
                            self.folder, error)
                lock = None
            if lock is None:
                yield True
                return
            try:
                yield held
            finally:
                if held:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _wait_for(self, lock) -> bool:
        """Take ``lock``'s flock, waiting up to ``lock_timeout_s`` for another process to let go of it."""
        deadline = None
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.lock_timeout_s
                log.warning("waiting up to %g s (%s) for another process compiling into %s to let go of %s",
                            self.lock_timeout_s, LOCK_TIMEOUT_ENV, self.folder, CACHE_LOCK)
            if now >= deadline:
                log.warning("another process still holds %s after %g s (%s); compiling without the cache",
                            self.folder / CACHE_LOCK, self.lock_timeout_s, LOCK_TIMEOUT_ENV)
                return False
            time.sleep(min(LOCK_POLL_S, deadline - now))
