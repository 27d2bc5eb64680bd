"""The compile cache trusts nothing it reads back: an entry is returned only when its record names the key asked
for and its blob's sha256 matches the record; anything else (a changed blob, swapped or missing files, a record that
is not JSON, a file others can write, a symlink) is logged in one line, dropped and reported as a miss. A folder
others can write to is refused, and a compile lock held too long is waited for, then given up on, in one line each.
"""

import fcntl
import json
import logging
import os

import pytest

from ldm_runtime.engines.compile_cache import CACHE_LOCK, LOCK_TIMEOUT_ENV, CompileCache, cache_key
from ldm_runtime.errors import EngineLoadError
from tests.ldm_runtime.file_damage import flip_middle_bytes, swap_names

LOGGER = "ldm_runtime.engines.compile_cache"


@pytest.fixture
def cache(tmp_path):
    opened = CompileCache.open(tmp_path / "cache")
    assert opened is not None
    return opened


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def test_a_stored_blob_comes_back_byte_for_byte_and_a_key_never_stored_is_a_quiet_miss(cache, rng, caplog):
    blob = rng.bytes(4096)
    key = cache_key("graph", int(rng.integers(1 << 30)))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.load(key) is None
        cache.store(key, blob, graph="unet")
        assert cache.load(key) == blob
    assert warnings_of(caplog) == []
    assert json.loads(cache.paths(key)[1].read_text())["graph"] == "unet"
    assert sorted(path.name for path in cache.folder.iterdir()) == [f"{key}.blob", f"{key}.json"]


def test_the_key_changes_with_every_part_and_not_with_dict_order():
    assert cache_key({"a": 1, "b": 2}, [1, 2]) == cache_key({"b": 2, "a": 1}, [1, 2])
    assert len({cache_key({"a": 1}, [1, 2]), cache_key({"a": 2}, [1, 2]), cache_key({"a": 1}, [2, 1])}) == 3


def damage_blob(cache, keys):
    flip_middle_bytes(cache.paths(keys[0])[0])
    return "its sha256 differs from the one recorded when it was written"


def swap_blobs(cache, keys):
    swap_names(cache.paths(keys[0])[0], cache.paths(keys[1])[0])
    return "its sha256 differs from the one recorded when it was written"


def swap_entries(cache, keys):
    for first, second in zip(cache.paths(keys[0]), cache.paths(keys[1])):
        swap_names(first, second)
    return "its record is for another entry"


def remove_record(cache, keys):
    cache.paths(keys[0])[1].unlink()
    return f"{keys[0]}.json is missing"


def garble_record(cache, keys):
    cache.paths(keys[0])[1].write_text("{not json")
    return "it cannot be read (Expecting property name"


def make_blob_group_writable(cache, keys):
    cache.paths(keys[0])[0].chmod(0o660)
    return f"{keys[0]}.blob: other users can write to it (mode -rw-rw----)"


def symlink_blob(cache, keys):
    blob = cache.paths(keys[0])[0]
    target = cache.folder.parent / "elsewhere.blob"
    blob.rename(target)
    blob.symlink_to(target)
    return f"{keys[0]}.blob cannot be opened"


@pytest.mark.parametrize("damage", [damage_blob, swap_blobs, swap_entries, remove_record, garble_record,
                                    make_blob_group_writable, symlink_blob], ids=lambda damage: damage.__name__)
def test_an_entry_that_is_not_provably_the_one_stored_is_dropped_in_one_line(cache, rng, caplog, damage):
    blobs = [rng.bytes(int(rng.integers(200, 2000))) for _ in range(2)]
    keys = [cache_key("graph", index, int(rng.integers(1 << 30))) for index in range(2)]
    for key, blob in zip(keys, blobs):
        cache.store(key, blob)
    why = damage(cache, keys)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.load(keys[0]) is None
    (line,) = warnings_of(caplog)
    assert line.startswith(f"the openvino compile cache entry {cache.paths(keys[0])[0]} is not used ({why}")
    assert line.endswith("dropped it and compiling again") and "\n" not in line
    assert not any(os.path.lexists(path) for path in cache.paths(keys[0]))  # dropped, so the next compile rewrites it
    cache.store(keys[0], blobs[0])
    assert cache.load(keys[0]) == blobs[0]


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o707], ids=oct)
def test_a_cache_folder_others_can_write_to_is_refused_in_one_line(tmp_path, caplog, mode):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(mode)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert CompileCache.open(folder) is None
    (line,) = warnings_of(caplog)
    assert line.startswith(f"the openvino compile cache {folder} cannot be used (other users can write to it")
    assert "\n" not in line


def test_a_cache_folder_owned_by_another_user_is_refused_in_one_line(tmp_path, caplog, monkeypatch):
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    monkeypatch.setattr(os, "geteuid", lambda: folder.stat().st_uid + 1)  # as seen by another user
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert CompileCache.open(folder) is None
    (line,) = warnings_of(caplog)
    assert f"cannot be used (it is owned by uid {folder.stat().st_uid}, not by this user" in line


def test_a_sticky_shared_folder_is_used_and_a_new_folder_is_made_for_this_user_only(tmp_path):
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # as /tmp: others may add files but not replace ours, and each entry file is checked
    assert CompileCache.open(sticky) is not None
    made = CompileCache.open(tmp_path / "new" / "cache")
    assert made is not None and made.folder.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("text", ["soon", "-1", "inf", "nan"])
def test_a_bad_lock_timeout_is_refused_naming_it(tmp_path, monkeypatch, text):
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, text)
    with pytest.raises(EngineLoadError, match=f"{LOCK_TIMEOUT_ENV} is '{text}'; expected a number of seconds, 0 or"):
        CompileCache.open(tmp_path)


def hold_lock(folder):
    """The compile lock taken as another process would take it (flock locks belong to an open file)."""
    other = open(folder / CACHE_LOCK, "a")
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return other


def test_a_lock_held_past_the_bound_is_waited_for_then_the_cache_is_not_used(cache, caplog):
    cache.lock_timeout_s = 0.0
    with hold_lock(cache.folder), caplog.at_level(logging.WARNING, logger=LOGGER):
        with cache.locked() as usable:
            assert usable is False
    waiting, giving_up = warnings_of(caplog)
    assert waiting.startswith(f"waiting up to 0 s ({LOCK_TIMEOUT_ENV}) for another process compiling into")
    assert giving_up == (f"another process still holds {cache.folder / CACHE_LOCK} after 0 s ({LOCK_TIMEOUT_ENV}); "
                         f"compiling without the cache")


class ReleaseWhenWaiting(logging.Handler):
    """Lets go of a held lock when the cache says it is waiting for it: the other process finishing meanwhile."""

    def __init__(self, held):
        super().__init__()
        self.held, self.released = held, False

    def emit(self, record):
        if record.getMessage().startswith("waiting up to"):
            fcntl.flock(self.held, fcntl.LOCK_UN)
            self.released = True


def test_a_lock_let_go_of_while_waiting_is_taken_and_the_cache_used(cache):
    cache.lock_timeout_s = 600.0  # far longer than the test runs: what ends the wait is the lock let go of
    with hold_lock(cache.folder) as held:
        handler = ReleaseWhenWaiting(held)
        logging.getLogger(LOGGER).addHandler(handler)
        try:
            with cache.locked() as usable:
                assert usable is True and handler.released
                with pytest.raises(BlockingIOError):  # and it is this process that holds it now
                    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            logging.getLogger(LOGGER).removeHandler(handler)
    with hold_lock(cache.folder):  # let go of afterwards
        pass
