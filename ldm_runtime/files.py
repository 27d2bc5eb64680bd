"""What every artifact folder needs from its files: the JSON file that describes the folder, read with errors a
user can act on; each file's sha256; and writing a file whole or not at all.

A checkpoint dir is described by ``model.json``, an engine dir by ``manifest.json``; each records the sha256 of
its other files. Both are written file by file into a temporary folder beside the target (``ldm_runtime.staging``),
synced and renamed over it, so a crash leaves the old file or the new one, never half of one. A description is
read only from a regular file of at most ``MAX_DESCRIPTION_BYTES``: a named pipe or a device (a read that could
block forever) or a file of gigabytes is refused in one sentence before any of it is read. Only the standard
library is imported.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable

from ldm_runtime.staging import write_atomic  # in a locked temporary folder that a later writer sweeps if this one dies

SHA256_BLOCK_BYTES = 1 << 20
MAX_DESCRIPTION_BYTES = 4 << 20  # model.json and manifest.json are a few KB, SD's included
SPECIAL_FILES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a device"),
                 (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def special_file_kind(mode: int) -> str:
    """What a file of ``stat`` mode ``mode`` that is not a regular file is, for a message ("a named pipe")."""
    return next((what for test, what in SPECIAL_FILES if test(mode)), "a special file")


def read_description(folder: str | Path, name: str, kind: str, error: Callable[[str], Exception],
                     how_to_make: str = "") -> Any:
    """The parsed JSON of ``folder/name``, the file that makes ``folder`` a ``kind`` ("checkpoint dir", "engine
    dir"). A folder that is missing, lacks the file, or holds one that is not a regular file, is larger than
    ``MAX_DESCRIPTION_BYTES``, cannot be read or is not JSON raises ``error(message)``, the message one sentence
    naming the folder or the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"{kind} {folder} does not exist or is not a folder")
    path = folder / name
    try:
        status = path.stat()
    except FileNotFoundError:
        article = "an" if kind[0] in "aeiou" else "a"
        raise error(f"{folder} is not {article} {kind}: it has no {name}{f' ({how_to_make})' if how_to_make else ''}"
                    ) from None
    except OSError as failure:
        raise error(f"cannot read {path} ({failure.strerror or failure})") from None
    if not stat.S_ISREG(status.st_mode):
        raise error(f"{path} is {special_file_kind(status.st_mode)}, not a regular file; expected the {kind}'s "
                    f"{name}")
    if status.st_size > MAX_DESCRIPTION_BYTES:
        raise error(f"{path} is {status.st_size} bytes; expected a {name} of at most {MAX_DESCRIPTION_BYTES} bytes")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_DESCRIPTION_BYTES + 1)
    except OSError as failure:
        raise error(f"cannot read {path} ({failure.strerror or failure})") from None
    if len(data) > MAX_DESCRIPTION_BYTES:  # it grew since stat
        raise error(f"{path} is more than {MAX_DESCRIPTION_BYTES} bytes; expected a {name} of at most "
                    f"{MAX_DESCRIPTION_BYTES} bytes")
    try:
        return json.loads(data.decode("utf-8-sig"))  # a byte order mark, as some editors save UTF-8, is skipped
    except (ValueError, RecursionError) as failure:  # JSON, UTF-8, a 5,000-digit integer; RecursionError: too deep
        raise error(f"{path} is not valid JSON ({' '.join(str(failure).split())[:200]})") from None


def describe(value: Any) -> str:
    """``value`` (parsed JSON) written short enough for a one-line message: itself when short, else its kind."""
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return f"a list of {len(value)} values"
    if isinstance(value, dict) and len(value) > 3:
        return f"an object of {len(value)} keys"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    if len(text) <= 60:
        return text
    if isinstance(value, str):
        return f'{json.dumps(value[:40])[:-1]}..." ({len(value)} characters)'
    return f"a value of {len(text)} characters"


def shown(value: Any) -> str:
    """``value`` for a one-line message: its ``repr`` where that is short (``'fp16'``, ``True``, ``2.5``), else
    ``describe``'s short form (an integer of thousands of digits is named by its length)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        try:
            return f"an integer of {len(str(abs(value)))} digits"
        except ValueError:  # past the digits Python converts to text
            return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = ""
    return text if text and len(text) <= 60 else describe(value)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(SHA256_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` into ``path``, written whole or not at all (``write_atomic``)."""
    write_atomic(path, lambda temporary: temporary.write_text(text))


def safetensors_os_error(error: Exception, path: Path) -> OSError | None:
    """The ``OSError`` a safetensors write failed with in the operating system (a full disk: safetensors' own error
    then ends in "(os error N)"), naming ``path``, so that a command reports it as any other write; None for any
    other failure."""
    code = re.search(r"\(os error (\d+)\)", str(error))
    return None if code is None else OSError(int(code[1]), os.strerror(int(code[1])), str(path))
