"""The engines' array types, numpy arrays and torch tensors, behind the few calls the sampler needs.

torch is never imported here: a tensor can only exist if its caller imported torch, so it is looked up in
``sys.modules``. A runtime that serves an onnxruntime engine therefore runs without torch installed.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np

# (float64 host values, like) -> an array of like's kind, dtype and device; every engine's ``to_array`` is one
ArrayConverter = Callable[[np.ndarray, Any], Any]


def array_module(array: Any) -> Any:
    """``numpy`` for a numpy array, ``torch`` for a torch tensor; torch is looked up, never imported."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(array, torch.Tensor):
        return torch
    if isinstance(array, np.ndarray):
        return np
    raise TypeError(f"arrays of type {type(array).__name__} are not supported; expected a numpy array or torch tensor")


def concatenate(arrays: list[Any]) -> Any:
    """Arrays of one kind (numpy or torch, one device) joined along their first axis."""
    module = array_module(arrays[0])
    return np.concatenate(arrays) if module is np else module.cat(arrays)


def host_to_array_like(values: np.ndarray, like: Any) -> Any:
    """Host values as an array of ``like``'s kind, dtype and device (numpy array or torch tensor)."""
    module = array_module(like)
    if module is np:
        return np.asarray(values, dtype=like.dtype)
    values = np.asarray(values)
    if not values.flags.writeable:
        values = values.copy()  # torch warns on read-only numpy memory (e.g. a shared schedule's arrays)
    return module.as_tensor(values, device=like.device).to(like.dtype)


def take_rows(array: Any, rows: np.ndarray) -> Any:
    """``array``'s rows ``rows`` ((N,) int64 host indices), in that order."""
    module = array_module(array)
    if module is np:
        return array[rows]
    return array.index_select(0, module.as_tensor(rows, device=array.device))
