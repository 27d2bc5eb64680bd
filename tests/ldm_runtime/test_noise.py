"""Per-image seeded noise: a row depends on its own seed (and step index) only, never on the batch."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ldm_runtime.noise import MAX_SEED, initial_noise, step_noise

SHAPE = (4, 8, 8)


@pytest.fixture
def seeds(rng) -> list[int]:
    """Four fresh random seeds across the whole allowed range."""
    drawn = rng.integers(0, MAX_SEED, size=4, dtype=np.int64).tolist()
    print(f"seeds {drawn}")  # shown by pytest when the test fails
    return drawn


def test_initial_noise_of_a_batch_equals_each_seed_drawn_alone(seeds):
    batch = initial_noise(seeds, SHAPE)
    assert batch.shape == (4,) + SHAPE and batch.dtype == np.float32
    for row, seed in enumerate(seeds):
        np.testing.assert_array_equal(batch[row], initial_noise([seed], SHAPE)[0])
    reordered = initial_noise(seeds[::-1], SHAPE)
    np.testing.assert_array_equal(reordered, batch[::-1])


def test_initial_noise_is_numpy_philox_standard_normal_of_the_seed(seeds):
    expected = np.random.Generator(np.random.Philox(seeds[0])).standard_normal(SHAPE, dtype=np.float32)
    np.testing.assert_array_equal(initial_noise(seeds[:1], SHAPE)[0], expected)


def test_initial_noise_is_reproducible_and_differs_between_seeds(seeds):
    first, again = initial_noise(seeds, SHAPE), initial_noise(list(seeds), SHAPE)
    np.testing.assert_array_equal(first, again)
    for row in range(1, 4):
        assert not np.allclose(first[0], first[row])


def test_initial_noise_is_standard_normal(seeds):
    values = initial_noise(seeds, (4, 64, 64)).astype(np.float64)
    # 65,536 draws: the standard error of the mean is 0.004 and of the std about 0.003
    assert abs(values.mean()) < 0.03
    assert abs(values.std() - 1.0) < 0.03


def test_step_noise_of_rows_at_different_steps_equals_each_row_drawn_alone(seeds):
    step_indices = [3, 17, 3, 0]
    batch = step_noise(seeds, step_indices, SHAPE)
    assert batch.shape == (4,) + SHAPE and batch.dtype == np.float32
    for row, (seed, index) in enumerate(zip(seeds, step_indices)):
        np.testing.assert_array_equal(batch[row], step_noise([seed], index, SHAPE)[0])
    np.testing.assert_array_equal(step_noise(seeds, 3, SHAPE)[[0, 2]], batch[[0, 2]])


def test_step_noise_differs_between_steps_and_from_the_initial_noise(seeds):
    start = initial_noise(seeds[:1], SHAPE)[0]
    steps = step_noise(seeds[:1] * 3, [0, 1, 2], SHAPE)
    for index in range(3):
        assert not np.allclose(steps[index], start)
        for other in range(index + 1, 3):
            assert not np.allclose(steps[index], steps[other])


def test_step_noise_is_the_spawned_seed_sequence_child(seeds):
    child = np.random.SeedSequence(seeds[0]).spawn(6)[5]
    expected = np.random.Generator(np.random.Philox(child)).standard_normal(SHAPE, dtype=np.float32)
    np.testing.assert_array_equal(step_noise(seeds[:1], 5, SHAPE)[0], expected)


def test_numpy_integer_seeds_give_the_same_noise_as_python_ints(seeds):
    np.testing.assert_array_equal(initial_noise(np.array(seeds, dtype=np.int64), SHAPE), initial_noise(seeds, SHAPE))


@pytest.mark.parametrize("bad_seed", [-1, 2**63, 1.5, True, np.bool_(False), "7", None])
def test_bad_seed_raises_value_error_naming_it(bad_seed):
    with pytest.raises(ValueError, match=re.escape(f"seed {bad_seed!r} is not valid")):
        initial_noise([3, bad_seed], SHAPE)
    with pytest.raises(ValueError, match=re.escape(f"seed {bad_seed!r} is not valid")):
        step_noise([3, bad_seed], 0, SHAPE)


@pytest.mark.parametrize("bad_seeds", [[], "123", 5])
def test_seeds_must_be_a_non_empty_list(bad_seeds):
    with pytest.raises(ValueError, match="seeds"):
        initial_noise(bad_seeds, SHAPE)


def test_bad_step_indices_and_shapes_are_rejected(seeds):
    with pytest.raises(ValueError, match="step index -1"):
        step_noise(seeds, -1, SHAPE)
    with pytest.raises(ValueError, match="2 entries for 4 seeds"):
        step_noise(seeds, [0, 1], SHAPE)
    with pytest.raises(ValueError, match="noise shape"):
        initial_noise(seeds, (4, 0, 8))
    with pytest.raises(ValueError, match="noise shape"):
        initial_noise(seeds, ())
