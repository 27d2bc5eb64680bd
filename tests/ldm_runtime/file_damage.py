"""Files damaged as a failing disk or a careless hand would damage them, for tests of what reads them back."""

import json
import shutil
from pathlib import Path


def edit_manifest(folder: Path, edit) -> None:
    """``folder``'s manifest.json changed in place by ``edit`` (a function of its parsed JSON)."""
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))


def copy_with_manifest_edited(engine_dir: Path, folder: Path, edit) -> Path:
    """A copy of ``engine_dir`` at ``folder`` whose manifest.json ``edit`` changed."""
    shutil.copytree(engine_dir, folder)
    edit_manifest(folder, edit)
    return folder


def flip_middle_bytes(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of ``path``, keeping its size."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(byte ^ 0xFF for byte in data[middle:middle + count])
    path.write_bytes(bytes(data))


def swap_names(first: Path, second: Path) -> None:
    """Give each of two files the other's name."""
    aside = first.with_name(f".{first.name}.aside")
    first.rename(aside)
    second.rename(first)
    aside.rename(second)


def deny_reading(monkeypatch, path: Path) -> None:
    """Refuse this process what a user without read permission on ``path`` is refused, even as root (whom chmod
    does not bind): opening the file, or, for a folder, looking at or opening anything inside it, raises
    ``PermissionError`` as the operating system would."""
    import builtins
    import errno
    import os

    target = os.path.abspath(path)
    inside = os.path.isdir(target)

    def denied(name) -> bool:
        if isinstance(name, int):  # a file descriptor
            return False
        name = os.path.abspath(os.fsdecode(name))
        return name.startswith(target + os.sep) if inside else name == target

    def refuse(name):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(name))

    real_open, real_stat, real_lstat = builtins.open, os.stat, os.lstat

    def guarded_open(file, *args, **kwargs):
        return refuse(file) if denied(file) else real_open(file, *args, **kwargs)

    def guarded_stat(name, *args, **kwargs):
        return refuse(name) if inside and denied(name) else real_stat(name, *args, **kwargs)

    def guarded_lstat(name, *args, **kwargs):
        return refuse(name) if inside and denied(name) else real_lstat(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "stat", guarded_stat)
    monkeypatch.setattr(os, "lstat", guarded_lstat)


def huge_sparse_file(path: Path, size: int) -> None:
    """Replace ``path`` with a file of ``size`` bytes that takes no space on disk (a hole, read as zeros)."""
    path.unlink()
    with open(path, "wb") as handle:
        handle.truncate(size)


def _retype_timesteps(manifest: dict) -> None:
    manifest["graphs"]["unet"]["inputs"][1]["dtype"] = "int32"


def _drop_an_axis_of_the_context(manifest: dict) -> None:
    manifest["graphs"]["unet"]["inputs"][2]["shape"].pop()


def _reverse_the_unet_outputs(manifest: dict) -> None:
    manifest["graphs"]["unet"]["outputs"].reverse()


def _point_the_unet_at_the_decoder(manifest: dict) -> None:  # with the decoder's own sha256: the digests all match
    unet, decoder = manifest["graphs"]["unet"], manifest["graphs"]["vae_decoder"]
    unet["file"], unet["files"] = decoder["file"], dict(decoder["files"])
    if "sizes" in decoder:
        unet["sizes"] = dict(decoder["sizes"])


def _swap_the_decoder_and_encoder(manifest: dict) -> None:
    graphs = manifest["graphs"]
    graphs["vae_decoder"], graphs["vae_encoder"] = graphs["vae_encoder"], graphs["vae_decoder"]


# Manifest entries edited by hand so that every sha256 still matches but an entry no longer describes the graph it
# names, or names a graph the runtime does not read as it would: (id, edit of the parsed manifest, the refusal).
MISMATCHED_GRAPH_ENTRIES = [
    ("a unet input retyped", _retype_timesteps,
     r"unet.onnx does not match the unet graph of its manifest.json: input timesteps is int64 in the file but int32 "
     r"in the manifest; expected the graph and manifest ldm-export wrote together \(re-export the engine\)"),
    ("an axis dropped", _drop_an_axis_of_the_context,
     r"unet.onnx does not match the unet graph of its manifest.json: input context has rank 3 in the file but 2 in "
     r"the manifest"),
    ("the unet outputs reversed", _reverse_the_unet_outputs,
     r"graphs.unet lists outputs \['deep_features', 'noise_pred'\]; expected \['noise_pred', 'deep_features'\], in "
     r"that order, the outputs the runtime reads from the unet graph"),
    ("the unet pointed at the decoder", _point_the_unet_at_the_decoder,
     r"vae_decoder.onnx does not match the unet graph of its manifest.json: the file's inputs are \['latents'\] but "
     r"the manifest lists \['latents', 'timesteps', 'context', 'context_mask'\]"),
    ("the decoder and encoder swapped", _swap_the_decoder_and_encoder,
     r"graphs.vae_decoder lists inputs \['images'\]; expected \['latents'\], the inputs the runtime gives the "
     r"vae_decoder graph"),
]
