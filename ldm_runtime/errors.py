"""The errors a user can cause, under one base class: ``UserError``.

Every command catches ``UserError`` and only it, and prints its message as one line ``PROG: error: ...``
with exit status 2; any other exception is a bug and keeps its traceback. A message is one sentence that
names the bad value and says what was expected. The library's areas each have a subclass; the stages and
commands add their own (``ldm_export.errors.ExportError``, ``ldm_train.data.DataError``, ``ldm-serve``'s ServeError...).

Some subclasses are also ``ValueError``, so code that catches ``ValueError`` around a library call catches them.
"""

from __future__ import annotations

import errno
import os


MAX_REASON_CHARS = 160  # of a library's error message quoted in a one-line refusal


def one_line(reason: object, limit: int = MAX_REASON_CHARS) -> str:
    """``reason`` (a library's error message, perhaps of several lines) as one line of at most ``limit``
    characters, cut at a word with "..." where it is longer."""
    text = " ".join(str(reason).split())
    if len(text) <= limit:
        return text
    return text[:limit - 3].rsplit(" ", 1)[0].rstrip(" ,;:") + "..."


class UserError(Exception):
    """Something the user can fix: a flag, a file or folder, a request. The message is one sentence."""


class UsageError(UserError):
    """A command line that does not parse (an unknown flag, a missing argument, a bad choice)."""


class ConfigError(UserError, ValueError):
    """A model configuration value (``model.json``, a preset, a training flag) is invalid."""


class CheckpointError(UserError, ValueError):
    """A checkpoint dir or file a user pointed at is missing, unreadable, or not what was expected."""


class DiskFullError(UserError):
    """Writing a folder the user named ran out of space (ENOSPC) or of disk quota (EDQUOT)."""

    ERRNOS = (errno.ENOSPC, errno.EDQUOT)

    @classmethod
    def from_os_error(cls, error: OSError, folder: object, outcome: str) -> DiskFullError | None:
        """``error`` as one sentence, "no space left on device writing FOLDER (OUTCOME)", when it is a full disk or
        quota; None for any other OSError, which stays a bug with its traceback."""
        if error.errno not in cls.ERRNOS:
            return None
        return cls(f"{os.strerror(error.errno).lower()} writing {folder} ({outcome})")


class EngineDirError(UserError, ValueError):
    """An engine dir a user pointed at is missing, incomplete, or does not match its manifest."""


class EngineLoadError(UserError, ValueError):
    """A model folder, engine name or device a user gave cannot be opened or used on this machine."""


class OutOfRangeError(UserError, ValueError):
    """A batch size or image size outside the range an engine was exported for."""


class RequestError(UserError, ValueError):
    """A generation request is invalid. ``field`` names the request field at fault (``"steps"``, ``"seed"``...),
    so that an HTTP answer can carry it as data."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
