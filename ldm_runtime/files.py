"""What every artifact folder needs from its files: the JSON file that describes the folder, read with errors a
user can act on; each file's sha256; and writing a file whole or not at all.

A checkpoint dir is described by ``model.json``, an engine dir by ``manifest.json``; each records the sha256 of
its other files. Both are written file by file into a temporary folder beside the target (``ldm_runtime.staging``),
synced and renamed over it, so a crash leaves the old file or the new one, never half of one. Only the standard library is imported.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from ldm_runtime.staging import write_atomic  # in a locked temporary folder that a later writer sweeps if this one dies

SHA256_BLOCK_BYTES = 1 << 20


def read_description(folder: str | Path, name: str, kind: str, error: Callable[[str], Exception],
                     how_to_make: str = "") -> Any:
    """The parsed JSON of ``folder/name``, the file that makes ``folder`` a ``kind`` ("checkpoint dir", "engine
    dir"). A folder that is missing, lacks the file, or holds one that cannot be read or is not JSON raises
    ``error(message)``, the message one sentence naming the folder or the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"{kind} {folder} does not exist or is not a folder")
    path = folder / name
    if not path.is_file():
        article = "an" if kind[0] in "aeiou" else "a"
        raise error(f"{folder} is not {article} {kind}: it has no {name}{f' ({how_to_make})' if how_to_make else ''}")
    try:
        return json.loads(path.read_text())
    except OSError as failure:
        raise error(f"cannot read {path} ({failure.strerror or failure})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as failure:  # RecursionError: nested too deep
        raise error(f"{path} is not valid JSON ({failure})") from None


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
