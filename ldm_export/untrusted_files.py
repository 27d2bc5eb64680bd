"""The files of a model from elsewhere, read as if hostile: each must be a regular file (a named pipe or a device
would block or never end); a JSON config is bounded in size and nesting; a .safetensors header (8-byte
little-endian length, then that much JSON) is parsed here and its names, dtypes, shapes, offsets and counts are
checked against the file's size before a byte of tensor data is read. Tensors are then read one at a time
(safetensors' ``safe_open``), floats widened to float32. Anything malformed is an ``ImportRefusedError`` in one
sentence. torch and safetensors are imported only to make or read tensors.
"""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path
from typing import Any

from ldm_export.errors import ImportRefusedError
from ldm_runtime.files import describe, special_file_kind

MAX_JSON_BYTES = 1 << 20  # a component's config.json is about 1 KB; trained_betas for T = 1000 about 25 KB
MAX_JSON_DEPTH = 16  # diffusers and transformers write objects of lists (depth 2)
MAX_HEADER_BYTES = 16 << 20  # SD 1.x with its EMA copy: about 1,900 tensors in 200 KB of header
MAX_TENSORS = 20_000  # SDXL with an EMA copy: about 5,000
MAX_NAME_CHARS = 256  # the longest SD key is under 100 characters
MAX_RANK = 8
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")  # refused by name, never opened: unpickling runs code
# safetensors dtype -> (bytes per element, torch dtype name)
DTYPES = {"F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
          "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"), "I64": (8, "int64"), "I32": (4, "int32"),
          "I16": (2, "int16"), "I8": (1, "int8"), "U8": (1, "uint8"), "BOOL": (1, "bool")}


def regular_file_size(path: Path, expected: str) -> int:
    """The size in bytes of ``path``, which must be a regular file (a symlink to one counts); ``expected`` says
    what it should be, for the message."""
    try:
        status = path.stat()
    except FileNotFoundError:
        raise ImportRefusedError(f"{path} does not exist; expected {expected}") from None
    except OSError as error:
        raise ImportRefusedError(f"cannot read {path} ({error.strerror or error}); expected {expected}") from None
    if not stat.S_ISREG(status.st_mode):
        raise ImportRefusedError(f"{path} is {special_file_kind(status.st_mode)}, not a regular file; expected "
                                 f"{expected}")
    return status.st_size


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (a scalar: 0), without recursing."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth < MAX_JSON_DEPTH:
            children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, (dict, list)):
            deepest = depth + 1
    return deepest


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_refuse_repeated_keys)
    except ImportRefusedError as error:
        raise ImportRefusedError(f"{what} {error}") from None
    except RecursionError:
        raise ImportRefusedError(f"{what} nests lists or objects too deeply; expected at most {MAX_JSON_DEPTH} "
                                 f"levels") from None
    except (UnicodeDecodeError, ValueError) as error:  # ValueError: also an integer of more than 4,300 digits
        raise ImportRefusedError(f"{what} is not valid JSON ({' '.join(str(error).split())[:120]})") from None


def _refuse_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = {}
    for key, value in pairs:
        if key in data:
            raise ImportRefusedError(f"repeats the key {describe(key)}; expected each key once")
        data[key] = value
    return data


def parse_json_text(text: str, what: str) -> Any:
    """The JSON value in ``text`` (a string a file holds, such as a safetensors metadata entry; ``what``: where it
    is, for the message), at most ``MAX_JSON_DEPTH`` levels deep."""
    data = _parse_json(text.encode("utf-8", "surrogatepass"), what)
    if _depth(data) > MAX_JSON_DEPTH:
        raise ImportRefusedError(f"{what} nests lists or objects more than {MAX_JSON_DEPTH} levels deep")
    return data


def read_json_object(path: Path, expected: str) -> dict[str, Any]:
    """The JSON object in file ``path`` (``expected``: what it should be, for the message)."""
    size = regular_file_size(path, expected)
    if size > MAX_JSON_BYTES:
        raise ImportRefusedError(f"{path} is {size} bytes; expected {expected} of at most {MAX_JSON_BYTES} bytes")
    with open(path, "rb") as handle:
        data = _parse_json(handle.read(MAX_JSON_BYTES + 1), str(path))
    if not isinstance(data, dict):
        raise ImportRefusedError(f"{path} holds a JSON {type(data).__name__}; expected {expected} (a JSON object)")
    if _depth(data) > MAX_JSON_DEPTH:
        raise ImportRefusedError(f"{path} nests lists or objects more than {MAX_JSON_DEPTH} levels deep; "
                                 f"expected {expected}")
    return data


# --- safetensors ---------------------------------------------------------------------------------------------

def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_entry(path: Path, name: Any, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, first byte, end byte) of one header entry, each checked."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise ImportRefusedError(f"{path} names a tensor {describe(name)}; expected printable names of 1 to "
                                 f"{MAX_NAME_CHARS} characters")
    if not isinstance(entry, dict) or sorted(entry) != ["data_offsets", "dtype", "shape"]:
        raise ImportRefusedError(f"{path}: tensor {name!r} is described by {describe(entry)}; expected an object "
                                 f"of dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise ImportRefusedError(f"{path}: tensor {name!r} has dtype {describe(dtype)}; expected one of "
                                 f"{', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_count(side) for side in shape):
        raise ImportRefusedError(f"{path}: tensor {name!r} has shape {describe(shape)}; expected a list of at most "
                                 f"{MAX_RANK} whole numbers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(offset) for offset in offsets)
            and offsets[0] <= offsets[1]):
        raise ImportRefusedError(f"{path}: tensor {name!r} has data_offsets {describe(offsets)}; expected [first "
                                 f"byte, end byte]")
    size = math.prod(shape) * DTYPES[dtype][0]
    if offsets[1] - offsets[0] != size:
        raise ImportRefusedError(f"{path}: tensor {name!r} of shape {shape} ({dtype}) needs {size} bytes but its "
                                 f"data_offsets {offsets} span {offsets[1] - offsets[0]}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype, shape)} of .safetensors file ``path``, read from its header alone after
    checking that the tensors it describes fill the rest of the file exactly, back to back."""
    return read_safetensors_header_and_metadata(path)[0]


def read_safetensors_header_and_metadata(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """``read_safetensors_header``'s tensors and the header's ``__metadata__`` (strings by name)."""
    expected = "a complete safetensors file"
    size = regular_file_size(path, expected)
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length > min(MAX_HEADER_BYTES, size - 8):
            raise ImportRefusedError(f"{path} is {size} bytes and its first 8 give a header of {length} bytes; "
                                     f"expected {expected} with a header of at most {MAX_HEADER_BYTES} bytes")
        header = _parse_json(handle.read(length), f"the header of {path}")
    if not isinstance(header, dict):
        raise ImportRefusedError(f"the header of {path} is a JSON {type(header).__name__}; expected an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise ImportRefusedError(f"the __metadata__ of {path} is {describe(metadata)}; expected an object of "
                                 f"strings")
    if len(header) > MAX_TENSORS:
        raise ImportRefusedError(f"{path} lists {len(header)} tensors; expected at most {MAX_TENSORS}")
    tensors, spans = {}, []
    for name, entry in header.items():
        dtype, shape, first, end = _checked_entry(path, name, entry)
        tensors[name] = (dtype, shape)
        spans.append((first, end, name))
    position = 0
    for first, end, name in sorted(spans):
        if first != position:
            raise ImportRefusedError(f"{path}: tensor {name!r} starts at data byte {first} but the tensor before "
                                     f"it ends at {position}; expected tensors packed back to back")
        position = end
    if position != size - 8 - length:
        raise ImportRefusedError(f"{path} holds {size - 8 - length} bytes of tensor data but its header describes "
                                 f"{position}; expected {expected} (is it truncated?)")
    return tensors, metadata


def _torch_dtype(dtype: str):
    import torch

    return getattr(torch, DTYPES[dtype][1])


def shape_only(header: dict[str, tuple[str, tuple[int, ...]]], names=None) -> dict[str, Any]:
    """Tensors on the meta device (no data) of the header's shapes, floats as float32 as ``load_tensors`` reads
    them: the weights can be checked against a network before any is read. ``names``: only these."""
    import torch

    result = {}
    for name in header if names is None else names:
        dtype = _torch_dtype(header[name][0])
        result[name] = torch.empty(header[name][1], dtype=torch.float32 if dtype.is_floating_point else dtype,
                                   device="meta")
    return result


def load_tensors(path: Path, names) -> dict[str, Any]:
    """The tensors ``names`` of ``path`` (a file ``read_safetensors_header`` took), read one at a time, floats
    widened to float32 (models run at full precision)."""
    import torch
    from safetensors import SafetensorError, safe_open

    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for name in names:
                tensor = handle.get_tensor(name)
                tensors[name] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
    except (SafetensorError, OSError) as error:  # the file changed since its header was read
        raise ImportRefusedError(f"cannot read {path} ({error}); expected a complete safetensors file") from None
    return tensors
