"""The files of a model from elsewhere, read as if hostile: each must be a regular file (a named pipe or a device
would block or never end); a JSON config is bounded in size and nesting; a .safetensors header (8-byte
little-endian length, then that much JSON) is checked against the file's size before a byte of tensor data is read
(``ldm_runtime.safetensors_header``, which the adapters chosen per request read too). Tensors are then read one at
a time (safetensors' ``safe_open``), floats widened to float32. Anything malformed is an ``ImportRefusedError`` in
one sentence. torch and safetensors are imported only to make or read tensors.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from ldm_export.errors import ImportRefusedError
from ldm_runtime.files import special_file_kind
from ldm_runtime.safetensors_header import DTYPES, EXPECTED, MAX_JSON_DEPTH, parse_json, read_header

MAX_JSON_BYTES = 1 << 20  # a component's config.json is about 1 KB; trained_betas for T = 1000 about 25 KB


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


def parse_json_text(text: str, what: str) -> Any:
    """The JSON value in ``text`` (a string a file holds, such as a safetensors metadata entry; ``what``: where it
    is, for the message), at most ``MAX_JSON_DEPTH`` levels deep."""
    data = parse_json(text.encode("utf-8", "surrogatepass"), what, ImportRefusedError)
    if _depth(data) > MAX_JSON_DEPTH:
        raise ImportRefusedError(f"{what} nests lists or objects more than {MAX_JSON_DEPTH} levels deep")
    return data


def read_json_object(path: Path, expected: str) -> dict[str, Any]:
    """The JSON object in file ``path`` (``expected``: what it should be, for the message)."""
    size = regular_file_size(path, expected)
    if size > MAX_JSON_BYTES:
        raise ImportRefusedError(f"{path} is {size} bytes; expected {expected} of at most {MAX_JSON_BYTES} bytes")
    with open(path, "rb") as handle:
        data = parse_json(handle.read(MAX_JSON_BYTES + 1), str(path), ImportRefusedError)
    if not isinstance(data, dict):
        raise ImportRefusedError(f"{path} holds a JSON {type(data).__name__}; expected {expected} (a JSON object)")
    if _depth(data) > MAX_JSON_DEPTH:
        raise ImportRefusedError(f"{path} nests lists or objects more than {MAX_JSON_DEPTH} levels deep; "
                                 f"expected {expected}")
    return data


# --- safetensors ---------------------------------------------------------------------------------------------

def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype, shape)} of .safetensors file ``path``, read from its header alone after
    checking that the tensors it describes fill the rest of the file exactly, back to back."""
    return read_safetensors_header_and_metadata(path)[0]


def read_safetensors_header_and_metadata(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """``read_safetensors_header``'s tensors and the header's ``__metadata__`` (strings by name)."""
    tensors, metadata = read_header(path, regular_file_size(path, EXPECTED), ImportRefusedError)
    return {name: (dtype, shape) for name, (dtype, shape, _, _) in tensors.items()}, metadata


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
