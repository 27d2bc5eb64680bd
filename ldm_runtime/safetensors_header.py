"""The header of a .safetensors file read as if hostile: an 8-byte little-endian length, then that much JSON, every
entry's name, dtype, shape and data offsets checked, and the tensors it describes checked to fill the rest of the
file exactly, back to back, before a byte of tensor data is read.

``ldm-import`` (``ldm_export.untrusted_files``: checkpoints and adapters it fuses) and the adapters chosen per
request (``ldm_runtime.adapters``: ``ldm-sample --lora``, ``ldm-serve --lora``) read headers here, so a file is
taken or refused alike by both, each refusal one sentence raised as the caller's ``error(message)``. Only the
standard library is imported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from ldm_runtime.files import describe

MAX_JSON_DEPTH = 16  # diffusers and transformers write objects of lists (depth 2)
MAX_HEADER_BYTES = 16 << 20  # SD 1.x with its EMA copy: about 1,900 tensors in 200 KB of header
MAX_TENSORS = 20_000  # SDXL with an EMA copy: about 5,000
MAX_NAME_CHARS = 256  # the longest SD key is under 100 characters
MAX_RANK = 8
# safetensors dtype -> (bytes per element, torch dtype name: how ldm-import reads it)
DTYPES = {"F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
          "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"), "I64": (8, "int64"), "I32": (4, "int32"),
          "I16": (2, "int16"), "I8": (1, "int8"), "U8": (1, "uint8"), "BOOL": (1, "bool")}
EXPECTED = "a complete safetensors file"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")  # refused by name, never opened: unpickling runs code

Refusal = Callable[[str], Exception]
Entry = tuple[str, tuple[int, ...], int, int]  # (dtype, shape, first byte, end byte of its data)


class _RepeatedKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _RepeatedKey(key)
        data[key] = value
    return data


def parse_json(data: bytes, what: str, error: Refusal) -> Any:
    """The JSON value of ``data`` (UTF-8; ``what``: where it is, for the message), each object's keys once."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _RepeatedKey as repeated:
        raise error(f"{what} repeats the key {describe(repeated.args[0])}; expected each key once") from None
    except RecursionError:
        raise error(f"{what} nests lists or objects too deeply; expected at most {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as failure:  # ValueError: also an integer of more than 4,300 digits
        raise error(f"{what} is not valid JSON ({' '.join(str(failure).split())[:120]})") from None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_entry(path: Path, name: Any, entry: Any, error: Refusal) -> Entry:
    """(dtype, shape, first byte, end byte) of one header entry, each checked."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise error(f"{path} names a tensor {describe(name)}; expected printable names of 1 to {MAX_NAME_CHARS} "
                    f"characters")
    if not isinstance(entry, dict) or sorted(entry) != ["data_offsets", "dtype", "shape"]:
        raise error(f"{path}: tensor {name!r} is described by {describe(entry)}; expected an object of dtype, shape "
                    f"and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise error(f"{path}: tensor {name!r} has dtype {describe(dtype)}; expected one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_count(side) for side in shape):
        raise error(f"{path}: tensor {name!r} has shape {describe(shape)}; expected a list of at most {MAX_RANK} "
                    f"whole numbers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(offset) for offset in offsets)
            and offsets[0] <= offsets[1]):
        raise error(f"{path}: tensor {name!r} has data_offsets {describe(offsets)}; expected [first byte, end byte]")
    size = math.prod(shape) * DTYPES[dtype][0]
    if offsets[1] - offsets[0] != size:
        raise error(f"{path}: tensor {name!r} of shape {shape} ({dtype}) needs {size} bytes but its data_offsets "
                    f"{offsets} span {offsets[1] - offsets[0]}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _refuse_pickle(path: Path, first: bytes, error: Refusal) -> None:
    """A file that is no safetensors and starts as torch.save writes (a zip archive, or pickle protocol 2 to 5) is
    named for what it is: a pickle under a .safetensors name."""
    if first.startswith(b"PK\x03\x04") or (first[:1] == b"\x80" and first[1:2] in (b"\x02", b"\x03", b"\x04",
                                                                                    b"\x05")):
        raise error(f"{path} holds PyTorch pickle data (torch.save's {'zip archive' if first[:1] == b'P' else 'pickle'}"
                    f"), not safetensors, whatever its name; pickles are never loaded (loading one can run any code): "
                    f"expected {EXPECTED}")


def read_header(path: Path, size: int, error: Refusal) -> tuple[dict[str, Entry], dict[str, str]]:
    """({tensor name: (dtype, shape, first byte, end byte)}, the header's ``__metadata__``) of the .safetensors
    file ``path`` of ``size`` bytes (the caller has checked it is a regular file of that size)."""
    with open(path, "rb") as handle:
        first = handle.read(8)
        length = int.from_bytes(first, "little")
        if size < 8:
            raise error(f"{path} is {size} bytes, fewer than the 8 that give a safetensors header's length; expected "
                        f"{EXPECTED}")
        if length > min(MAX_HEADER_BYTES, size - 8):
            _refuse_pickle(path, first, error)
            raise error(f"{path} is {size} bytes and its first 8 give a header of {length} bytes; expected "
                        f"{EXPECTED} with a header of at most {MAX_HEADER_BYTES} bytes")
        text = handle.read(length)
        if not text.lstrip().startswith(b"{"):
            _refuse_pickle(path, first, error)
        header = parse_json(text, f"the header of {path}", error)
    if not isinstance(header, dict):
        raise error(f"the header of {path} is a JSON {type(header).__name__}; expected an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise error(f"the __metadata__ of {path} is {describe(metadata)}; expected an object of strings")
    if len(header) > MAX_TENSORS:
        raise error(f"{path} lists {len(header)} tensors; expected at most {MAX_TENSORS}")
    tensors = {name: _checked_entry(path, name, entry, error) for name, entry in header.items()}
    position = 0
    for name, (_, _, first, end) in sorted(tensors.items(), key=lambda item: (item[1][2], item[1][3], item[0])):
        if first != position:
            raise error(f"{path}: tensor {name!r} starts at data byte {first} but the tensor before it ends at "
                        f"{position}; expected tensors packed back to back")
        position = end
    if position != size - 8 - length:
        raise error(f"{path} holds {size - 8 - length} bytes of tensor data but its header describes {position}; "
                    f"expected {EXPECTED} (is it truncated?)")
    return tensors, metadata
