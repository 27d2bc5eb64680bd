"""A checkpoint save that runs out of space, at any file or at the switch, or is killed, leaves the last complete
checkpoint resumable and loadable, and leaves nothing half-written behind; ldm-train reports a full disk in one
line."""

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch

import ldm_runtime.files
import ldm_train.checkpoint
import ldm_runtime.folder_swap
from ldm_runtime.checkpoint import load_checkpoint
from ldm_runtime.config import preset
from ldm_runtime.models import Autoencoder, TextEncoder, UNet
from ldm_runtime.staging import REPLACED, temporary_prefix
from ldm_train.checkpoint import load_train_state, save_checkpoint
from ldm_train.cli import main
from tests.ldm_train.test_train_cli import AE_FLAGS, losses

TINY = preset("tiny")  # a scratch text encoder: its weights are one more file of the save
SAVED_FILES = ["model.json", "autoencoder.safetensors", "unet.safetensors", "text_encoder.safetensors",
               "train_state.safetensors", "train_state.json"]


@pytest.fixture(scope="module")
def networks():
    torch.manual_seed(0)
    return Autoencoder(TINY.autoencoder), UNet(TINY.unet), TextEncoder(TINY.text_encoder)


def save_step(folder: Path, networks, step: int, seed: int) -> dict[str, torch.Tensor]:
    """A checkpoint of ``step`` whose UNet weights are fresh random numbers; returns them."""
    autoencoder, unet, text_encoder = networks
    generator = torch.Generator().manual_seed(seed + step)
    unet_weights = {name: torch.randn(value.shape, generator=generator) for name, value in unet.state_dict().items()}
    weights = {"autoencoder": autoencoder.state_dict(), "unet": unet_weights,
               "text_encoder": text_encoder.state_dict()}
    save_checkpoint(folder, TINY, weights, {"ema.step": torch.tensor([step])}, "unet", step, {"seed": seed},
                    save_tokenizer=text_encoder.save_tokenizer)
    return unet_weights


def leftovers(folder: Path) -> list[str]:
    """What saves left beside the checkpoint dir (their new folders, or old ones set aside)."""
    return sorted(name for name in os.listdir(folder.parent) if name.startswith(f".{folder.name}."))


def assert_holds(folder: Path, step: int, unet_weights: dict[str, torch.Tensor]) -> None:
    """``folder`` is the complete checkpoint of ``step``: resumable, and loadable with those UNet weights."""
    assert load_train_state(folder, "unet").step == step
    loaded = load_checkpoint(folder).unet.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in unet_weights.items())
    assert leftovers(folder) == []


def disk_full_at(monkeypatch, file_name: str) -> list[str]:
    """Make the save's writer run out of space halfway through ``file_name``: half its bytes land, then ENOSPC.
    Returns the list of files written before it."""
    written = []
    real_write_atomic = ldm_runtime.files.write_atomic

    def write_atomic(path: Path, write) -> None:
        if path.name == file_name:
            write(path)
            with open(path, "r+b") as handle:
                handle.truncate(path.stat().st_size // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write_atomic(path, write)
        written.append(path.name)

    for module in (ldm_runtime.files, ldm_train.checkpoint):
        monkeypatch.setattr(module, "write_atomic", write_atomic)
    return written


@pytest.mark.parametrize("file_name", SAVED_FILES)
def test_running_out_of_space_at_any_file_of_a_save_keeps_the_last_checkpoint(file_name, networks, tmp_path, seed,
                                                                              monkeypatch):
    folder = tmp_path / "ldm"
    first = save_step(folder, networks, 1, seed)
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    written = disk_full_at(monkeypatch, file_name)
    with pytest.raises(OSError) as failure:
        save_step(folder, networks, 2, seed)
    assert failure.value.errno == errno.ENOSPC
    assert written == SAVED_FILES[:SAVED_FILES.index(file_name)]  # the failure came midway, at this file
    assert_holds(folder, 1, first)
    monkeypatch.undo()
    second = save_step(folder, networks, 2, seed)
    assert_holds(folder, 2, second)
    assert (folder / "metrics.jsonl").read_text() == '{"step": 1}\n'  # what the run wrote besides is carried over


@pytest.mark.parametrize("where", ["carrying over metrics.jsonl", "switching folders"])
def test_running_out_of_space_after_the_files_keeps_the_last_checkpoint(where, networks, tmp_path, seed,
                                                                        monkeypatch):
    folder = tmp_path / "ldm"
    first = save_step(folder, networks, 1, seed)
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')

    def out_of_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "switching folders":
        monkeypatch.setattr(ldm_runtime.folder_swap, "exchange", out_of_space)
    else:
        monkeypatch.setattr(ldm_train.checkpoint.os, "link", out_of_space)
    with pytest.raises(OSError, match="No space left"):
        save_step(folder, networks, 2, seed)
    assert_holds(folder, 1, first)


def test_a_first_save_that_runs_out_of_space_leaves_nothing(networks, tmp_path, seed, monkeypatch):
    folder = tmp_path / "ldm"

    def tokenizer_out_of_space(into: Path) -> None:
        into.mkdir()
        (into / "tokenizer.json").write_text("{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(into / "tokenizer.json"))

    monkeypatch.setattr(networks[2], "save_tokenizer", tokenizer_out_of_space)
    with pytest.raises(OSError, match="No space left"):
        save_step(folder, networks, 1, seed)
    assert not folder.exists() and leftovers(folder) == []


def test_the_next_save_removes_what_a_killed_save_left(networks, tmp_path, seed):
    folder = tmp_path / "ldm"
    save_step(folder, networks, 1, seed)
    killed = tmp_path / f"{temporary_prefix(folder)}killed"  # no live writer holds its lock
    killed.mkdir()
    (killed / "unet.safetensors").write_bytes(b"half a file")
    second = save_step(folder, networks, 2, seed)
    assert_holds(folder, 2, second)


def test_without_an_atomic_exchange_the_save_swaps_with_two_renames(networks, tmp_path, seed, monkeypatch):
    monkeypatch.setattr(ldm_runtime.folder_swap, "_RENAMEAT2", None)
    folder = tmp_path / "ldm"
    save_step(folder, networks, 1, seed)
    second = save_step(folder, networks, 2, seed)
    assert_holds(folder, 2, second)


def test_a_save_killed_between_the_two_renames_is_put_back_on_resume(networks, tmp_path, seed):
    folder = tmp_path / "ldm"
    first = save_step(folder, networks, 1, seed)
    aside = tmp_path / f"{temporary_prefix(folder, REPLACED)}killed"  # as the fallback's first rename leaves it
    aside.mkdir()
    os.replace(folder, aside / folder.name)
    assert_holds(folder, 1, first)


def test_the_save_follows_an_out_that_is_a_symlink(networks, tmp_path, seed):
    real = tmp_path / "disk" / "ldm"
    save_step(real, networks, 1, seed)
    link = tmp_path / "ldm"
    link.symlink_to(real)
    second = save_step(link, networks, 2, seed)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert_holds(real, 2, second)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 8 MiB file system: room for one tiny checkpoint (about 6 MB) but not for a second beside it."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip() or result.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_really_full_disk_keeps_the_last_checkpoint(networks, small_tmpfs, seed):
    folder = small_tmpfs / "ldm"
    first = save_step(folder, networks, 1, seed)
    with pytest.raises(OSError) as failure:
        save_step(folder, networks, 2, seed)
    assert failure.value.errno == errno.ENOSPC
    assert_holds(folder, 1, first)


def test_ldm_train_reports_a_full_disk_in_one_line_and_resumes_from_the_last_checkpoint(tmp_path, capsys,
                                                                                        monkeypatch):
    straight, out = tmp_path / "straight", tmp_path / "ae"
    flags = [*AE_FLAGS, "--disc-start", "1", "--checkpoint-every", "1"]
    assert main(["autoencoder", *flags, "--out", str(straight), "--steps", "2"]) == 0
    real_write_state = ldm_train.checkpoint.write_train_state

    def full_at_step_2(folder, names, stage, step, settings):
        if step == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "train_state.json"))
        real_write_state(folder, names, stage, step, settings)

    monkeypatch.setattr(ldm_train.checkpoint, "write_train_state", full_at_step_2)
    capsys.readouterr()
    assert main(["autoencoder", *flags, "--out", str(out), "--steps", "2"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (f"ldm-train: error: no space left on device writing {out} (its last complete checkpoint is "
                     f"intact: free space, then continue with --resume)")
    assert load_train_state(out, "autoencoder").step == 1
    monkeypatch.undo()
    assert main(["autoencoder", *flags, "--out", str(out), "--steps", "2", "--resume"]) == 0
    assert losses(out) == losses(straight)


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EDQUOT, "disk quota exceeded")])
def test_a_full_disk_before_any_checkpoint_is_one_line(code, words, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("ldm_train.train_autoencoder.train_autoencoder", full)
    monkeypatch.setattr("ldm_train.cli.train_classifier", full)
    out = tmp_path / "ae"
    assert main(["autoencoder", *AE_FLAGS, "--out", str(out), "--steps", "1"]) == 2
    assert capsys.readouterr().err == (f"ldm-train: error: {words} writing {out} (no checkpoint was written: free "
                                       f"space and start again)\n")
    assert main(["classifier", "--out", str(out), "--steps", "1"]) == 2
    assert capsys.readouterr().err == f"ldm-train: error: {words} writing {out} (free space and train it again)\n"


def test_another_os_error_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr("ldm_train.train_autoencoder.train_autoencoder", broken)
    with pytest.raises(OSError, match="Input/output error"):
        main(["autoencoder", *AE_FLAGS, "--out", str(tmp_path / "ae"), "--steps", "1"])
