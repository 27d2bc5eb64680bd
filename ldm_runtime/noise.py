"""Seeded Gaussian noise, one stream per image, so an image never depends on the batch it was drawn in.

Row i of every array here is a function of ``seeds[i]`` (and the step index) only: four prompts with four
seeds in one batch get the same noise as four separate runs, and a server may regroup requests freely.

Generator: numpy's Philox (a counter-based generator, the family cuRAND and torch's CUDA generator use),
seeded through ``np.random.SeedSequence``. The initial latents of seed s come from
``np.random.Generator(np.random.Philox(s))``; the noise a stochastic sampler adds on step k (DDIM with eta > 0,
euler-a, DPM-Solver++ SDE, LCM) comes from the child stream
``SeedSequence(s, spawn_key=(k,))``, which is what ``SeedSequence(s).spawn`` would hand out as child k:
independent of the initial stream and of every other step. Values are drawn directly as float32
(``standard_normal(dtype=np.float32)``), on the host, independent of the engine and its device.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

MAX_SEED = 2**63  # exclusive: seeds travel through JSON and int64 columns
# ldm-train's --seed (inclusive): every seed a training step derives from it, (seed * 1_000_003 + step) * 4099
# + rank, must fit the 64 bits torch.Generator takes. ldm-eval's --data-seed names a training seed.
MAX_TRAIN_SEED = 2**32 - 1


def initial_noise(seeds: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The starting latents x_T: ``(B, *shape) float32`` (shape is ``(C, h, w)``), row i drawn from seeds[i] only."""
    _check_seeds(seeds)
    shape = _check_shape(shape)
    return np.stack([_standard_normal(np.random.SeedSequence(int(seed)), shape) for seed in seeds])


def step_noise(seeds: Sequence[int], step_indices: int | Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The noise a stochastic sampler adds at step index k (0 = the first step): ``(B, *shape) float32``.

    ``step_indices`` is one index for all rows or one per row (rows of one batch may be at different steps);
    row i depends on (seeds[i], step_indices[i]) only.
    """
    _check_seeds(seeds)
    shape = _check_shape(shape)
    indices = [step_indices] * len(seeds) if _is_integer(step_indices) else list(step_indices)
    if len(indices) != len(seeds):
        raise ValueError(f"step_indices has {len(indices)} entries for {len(seeds)} seeds; expected one per seed")
    for index in indices:
        if not _is_integer(index) or index < 0:
            raise ValueError(f"step index {index!r} is not valid; expected a non-negative integer")
    return np.stack([
        _standard_normal(np.random.SeedSequence(int(seed), spawn_key=(int(index),)), shape)
        for seed, index in zip(seeds, indices)
    ])


def _standard_normal(seed_sequence: np.random.SeedSequence, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.Generator(np.random.Philox(seed_sequence)).standard_normal(shape, dtype=np.float32)


def _check_seeds(seeds: Sequence[int]) -> None:
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__") or len(seeds) == 0:
        raise ValueError(f"seeds is {seeds!r}; expected a non-empty list of integers")
    for seed in seeds:
        if not _is_integer(seed) or not 0 <= seed < MAX_SEED:
            raise ValueError(f"seed {seed!r} is not valid; expected an integer from 0 to 2**63 - 1")


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    if not shape or not all(_is_integer(size) and size > 0 for size in shape):
        raise ValueError(f"noise shape {shape} is not valid; expected positive integers such as (4, 64, 64)")
    return tuple(int(size) for size in shape)


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
