"""What the commands share at their edge: a parser whose errors are one line, the one line itself, number flags
that refuse NaN and infinity, and the check that an output folder can be written before any work starts.

Every command (``ldm-sample``, ``ldm-serve``, ``ldm-bench``, ``ldm-eval``, ``ldm-train``, ``ldm-export``,
``ldm-import``) catches ``UserError`` and only it, and reports it with ``report_user_error``: ``PROG: error: ...``
on stderr, exit status 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import random
import signal
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

from ldm_runtime.errors import UsageError, UserError

USER_ERROR_STATUS = 2  # argparse's status for a bad command line, used for every error a user can fix


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad command line raises ``UsageError`` (one line) instead of printing the usage
    block and exiting; ``--help`` still prints and exits 0."""

    def error(self, message: str) -> None:
        raise UsageError(message)


def report_user_error(prog: str, error: UserError) -> int:
    """Print ``error``'s first line as ``PROG: error: ...`` on stderr; returns the exit status, 2."""
    text = str(error).strip()
    print(f"{prog}: error: {text.splitlines()[0] if text else type(error).__name__}", file=sys.stderr, flush=True)
    return USER_ERROR_STATUS


def sigterm_as_ctrl_c(main):
    """``main`` with SIGTERM (what systemd, ``docker stop`` and ``timeout`` send) taken as Ctrl-C while it runs, so
    that the command's own ``KeyboardInterrupt`` handling cleans up and says so in one line; the previous handler
    is put back when it returns. Off the main thread, which receives no signals, ``main`` runs as it is."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return main(*args, **kwargs)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return main(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapped


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def finite_float(text: str) -> float:
    """argparse type for a number flag: a float, but never NaN or infinity (float() reads "nan" and "inf")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def noise_interval(text: str) -> tuple[float, float]:
    """argparse type for a noise-level interval "LOW,HIGH": two finite numbers with 0 <= LOW < HIGH."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not two numbers LOW,HIGH")
    low, high = (finite_float(part.strip()) for part in parts)
    if not 0 <= low < high:
        raise argparse.ArgumentTypeError(f"{text!r} is not an interval with 0 <= LOW < HIGH")
    return low, high


def check_writable_folder(flag: str, folder: Path) -> None:
    """``UsageError`` naming ``flag`` unless ``folder`` is, or can be created as, a folder this process can write
    into. Proven by doing it (missing folders are created, a file is written in the deepest, then the folders this
    call created are removed again), since permission bits do not tell the whole story (root, read-only mounts,
    /proc).

    Processes started together with the same ``--out`` (the ranks of one ``torchrun`` job) run this check at the
    same time: a folder another process creates first is not this call's to remove, and one another process
    removes under this call is created again, a bounded number of times, after a random wait that doubles with each
    attempt so that processes which collided once do not collide again in step."""
    for attempt in range(_PROBE_ATTEMPTS):
        try:
            _probe_folder(flag, folder)
            return
        except FileNotFoundError as error:
            if attempt == _PROBE_ATTEMPTS - 1:
                raise UsageError(f"{flag} {folder} cannot be written ({error.strerror or error}); expected a "
                                 f"folder this user can create and write") from None
            time.sleep(random.uniform(0, _PROBE_FIRST_WAIT_S * 2**attempt))


def check_replaceable_folder(flag: str, folder: Path) -> None:
    """``UsageError`` naming ``flag`` unless ``folder`` can be replaced whole, as a checkpoint or engine dir is (a
    complete new folder is written beside it and the two are swapped: ``ldm_runtime.folder_swap``): not a mount
    point, which no rename moves, and not the working directory or a folder holding it, which the swap would leave
    this process in after removing it."""
    resolved = Path(os.path.realpath(folder))
    working = Path(os.path.realpath(os.getcwd()))
    if resolved == working or resolved in working.parents:
        raise UsageError(f"{flag} {str(folder) or repr('')} is the working directory or holds it; expected a folder "
                         f"elsewhere (a save replaces {flag} whole, and this process would be left in a removed "
                         f"folder), such as {flag} runs/NAME")
    if _is_mount_point(resolved):
        raise UsageError(f"{flag} {folder} is a mount point, which a save cannot replace whole (it writes a new "
                         f"folder beside it and swaps the two); expected a folder inside it, such as "
                         f"{flag} {folder / 'run'}")


def _is_mount_point(path: Path) -> bool:
    """Whether a file system (a bind mount included, which ``os.path.ismount`` misses) is mounted at ``path``."""
    if os.path.ismount(path):
        return True
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mounts:
            points = {line.split()[4] for line in mounts if len(line.split()) > 4}
    except OSError:  # not Linux
        return False
    # mountinfo escapes space, tab, newline and backslash as octal
    unescaped = {point.encode("latin-1", "surrogateescape").decode("unicode_escape") for point in points}
    return str(path) in unescaped


_PROBE_ATTEMPTS = 10
_PROBE_FIRST_WAIT_S = 0.001  # the longest first wait; the ninth is at most 0.256 s, all of them together 0.511 s


def _kind(path: Path) -> str | None:
    """"folder", "other" or None (nothing there, or a file on the way), from one ``stat`` so that another process
    cannot change the answer between two questions."""
    try:
        return "folder" if stat.S_ISDIR(os.stat(path).st_mode) else "other"
    except (FileNotFoundError, NotADirectoryError):
        return None


def _probe_folder(flag: str, folder: Path) -> None:
    """One attempt of ``check_writable_folder``; ``FileNotFoundError`` when a folder it relied on vanished."""
    created: list[Path] = []
    try:
        missing = folder
        while _kind(missing) is None and missing != missing.parent:
            created.append(missing)
            missing = missing.parent
        if _kind(folder) == "other":
            raise UsageError(f"{flag} {folder} exists and is not a folder; expected a folder to write into")
        for path in reversed(list(created)):
            try:
                path.mkdir()
            except FileExistsError:
                kind = _kind(path)
                if kind is None:  # made and removed again by another process meanwhile
                    raise FileNotFoundError(2, os.strerror(2), str(path)) from None
                if kind == "other":
                    raise
                created.remove(path)  # another process made it first; it is theirs to keep or remove
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise UsageError(f"{flag} {folder} cannot be written ({error.strerror or error}); expected a folder this "
                         f"user can create and write") from None
    finally:
        for path in created:
            try:
                path.rmdir()
            except OSError:
                pass
