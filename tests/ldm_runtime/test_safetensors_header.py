"""One reading of a .safetensors header for every reader of a user's file: ``ldm-import`` (checkpoints, and the
adapters it fuses) and the adapters chosen per request (``ldm-sample --lora``, ``ldm-serve --lora``) take or
refuse a file alike, in the same sentence, before any tensor data is read."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from ldm_export.errors import ImportRefusedError
from ldm_export.untrusted_files import read_safetensors_header_and_metadata
from ldm_runtime.adapters import AdapterError, read_arrays, read_header
from ldm_runtime.safetensors_header import MAX_TENSORS


def _file(path: Path, header: dict | str, data: bytes = b"", length: int | None = None) -> Path:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def _entry(dtype: str, shape: list[int], first: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [first, end]}


DOWN = "lora_unet_conv_in.lora_down.weight"
UP = "lora_unet_conv_in.lora_up.weight"
ZERO_SIZED = '"t%d": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}'

# name -> (header, tensor data, part of the sentence both readers must give)
HOSTILE = {
    "repeated-name": ('{"%s": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                      '"%s": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}' % (DOWN, DOWN), bytes(4),
                      f'repeats the key "{DOWN}"'),
    "extra-entry-key": ({DOWN: {**_entry("F32", [1], 0, 4), "offset": 0}}, bytes(4), "expected an object of dtype"),
    "unprintable-name": ({"a\nb": _entry("F32", [1], 0, 4)}, bytes(4), "expected printable names"),
    "too-many-tensors": ("{" + ", ".join(ZERO_SIZED % index for index in range(MAX_TENSORS + 1)) + "}", b"",
                         f"{MAX_TENSORS + 1} tensors"),
    "overlapping": ({DOWN: _entry("F32", [2], 0, 8), UP: _entry("F32", [2], 4, 12)}, bytes(12), "back to back"),
    "truncated": ({DOWN: _entry("F32", [4], 0, 16)}, bytes(12), "is it truncated?"),
    "span-of-wrong-size": ({DOWN: _entry("F32", [4], 0, 12)}, bytes(12), "needs 16 bytes"),
    "shape-not-whole": ({DOWN: _entry("F32", [1.5], 0, 4)}, bytes(4), "has shape [1.5]"),
    "header-past-the-end": ("{}", b"", "give a header of 1000000000000 bytes"),
    "not-json": ("{'a': 1}", b"", "is not valid JSON"),
    "nested": ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", b"", "too deeply"),
    "metadata-not-strings": ({"__metadata__": {"r": 4}}, b"", "expected an object of strings"),
    "unknown-dtype": ({DOWN: _entry("F128", [1], 0, 16)}, bytes(16), 'has dtype "F128"'),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_import_and_adapters_refuse_a_hostile_header_in_the_same_sentence(tmp_path, case):
    header, data, named = HOSTILE[case]
    path = _file(tmp_path / "adapter.safetensors", header, data,
                 length=10**12 if case == "header-past-the-end" else None)
    with pytest.raises(ImportRefusedError) as imported:
        read_safetensors_header_and_metadata(path)
    with pytest.raises(AdapterError) as adapter:
        read_header(path)
    assert str(adapter.value) == str(imported.value), (str(adapter.value), str(imported.value))
    assert named in str(imported.value) and str(path) in str(imported.value), str(imported.value)
    assert len(str(imported.value).splitlines()) == 1


def test_a_good_adapter_file_reads_the_same_both_ways(tmp_path):
    down = np.arange(8, dtype=np.float32).reshape(2, 4)
    up = np.arange(6, dtype=np.float16).reshape(3, 2)
    header = {"__metadata__": {"format": "pt"}, UP: _entry("F16", [3, 2], 32, 44), DOWN: _entry("F32", [2, 4], 0, 32)}
    path = _file(tmp_path / "adapter.safetensors", header, down.tobytes() + up.tobytes())
    imported, imported_metadata = read_safetensors_header_and_metadata(path)
    tensors, metadata = read_header(path)
    assert imported == {DOWN: ("F32", (2, 4)), UP: ("F16", (3, 2))}
    assert {name: entry[:2] for name, entry in tensors.items()} == imported
    assert metadata == imported_metadata == {"format": "pt"}
    arrays = read_arrays(path, tensors, [DOWN, UP])
    np.testing.assert_array_equal(arrays[DOWN], down)
    np.testing.assert_array_equal(arrays[UP], up.astype(np.float32))


def test_an_adapter_of_integers_is_refused_per_request_naming_its_dtype(tmp_path):
    """ldm-import reads integer tensors of a checkpoint; an adapter chosen per request holds float weights only."""
    path = _file(tmp_path / "adapter.safetensors", {DOWN: _entry("I64", [2], 0, 16)}, bytes(16))
    assert read_safetensors_header_and_metadata(path)[0] == {DOWN: ("I64", (2,))}
    with pytest.raises(AdapterError, match=r"has dtype I64; expected floating point data \(F64, F32, F16, BF16\)"):
        read_header(path)


@pytest.mark.parametrize("kind", ["zip archive", "pickle"])
def test_a_pickle_under_a_safetensors_name_is_named_a_pickle_by_both_readers(tmp_path, kind):
    import pickle

    import torch

    path = tmp_path / "renamed.safetensors"
    if kind == "zip archive":
        torch.save({DOWN: torch.zeros(2, 4, 3, 3)}, path)
    else:
        path.write_bytes(pickle.dumps({DOWN: [0.0] * 8}, protocol=4))
    with pytest.raises(ImportRefusedError) as imported:
        read_safetensors_header_and_metadata(path)
    with pytest.raises(AdapterError) as adapter:
        read_header(path)
    assert str(adapter.value) == str(imported.value)
    assert f"{path} holds PyTorch pickle data (torch.save's {kind}), not safetensors" in str(imported.value)


def test_a_header_whose_length_starts_as_a_pickle_does_is_still_read(tmp_path):
    """A header of 640 bytes begins with the bytes 0x80 0x02, as pickle protocol 2 does."""
    padding = 640 - len(json.dumps({"__metadata__": {"pad": ""}, DOWN: _entry("F32", [1], 0, 4)}))
    header = json.dumps({"__metadata__": {"pad": "x" * padding}, DOWN: _entry("F32", [1], 0, 4)})
    assert len(header) == 640
    path = _file(tmp_path / "adapter.safetensors", header, bytes(4))
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert list(read_header(path)[0]) == [DOWN]
