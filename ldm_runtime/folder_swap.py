"""Replacing a folder with a complete new one in one step, so that its path always names one whole folder.

On Linux one ``renameat2(RENAME_EXCHANGE)`` swaps the two folders atomically. Where that call is missing or the
file system refuses it, the old folder is moved into a locked folder beside it (``ldm_runtime.staging``'s
"replaced" kind) and the new one renamed in; a crash between those two renames leaves the path empty until
``restore_replaced`` (or the next writer's sweep) puts the old folder back.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

from ldm_runtime.staging import REPLACED, remove_dead_temporaries, temporary_folder

_AT_FDCWD = -100
_RENAME_EXCHANGE = 1 << 1
# The file system or kernel cannot exchange: fall back to two renames.
_NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)


def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not glibc >= 2.28 (macOS, musl, Windows)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def exchange(first: Path, second: Path) -> bool:
    """Swap the entries at two existing paths of one file system atomically; False where this system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries, to the device."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def replace_folder(new: Path, target: Path) -> None:
    """Put folder ``new`` (a sibling of ``target``, so on its file system) at ``target`` in one step, and remove
    the folder that was there, if any, once the switch is on the device."""
    if not os.path.lexists(target):
        os.replace(new, target)
        fsync_path(target.parent)
    elif exchange(new, target):
        fsync_path(target.parent)
        shutil.rmtree(new)  # ``new`` now names the old folder
    else:
        with temporary_folder(target, REPLACED) as aside:  # removed on exit; put back by a sweep if we die first
            os.replace(target, aside / target.name)
            os.replace(new, target)
            fsync_path(target.parent)


def restore_replaced(target: Path) -> None:
    """A writer killed between the fallback's two renames left no ``target``: put the old folder back."""
    if not os.path.lexists(target):
        remove_dead_temporaries(target, (REPLACED,))
