"""Users' own data: a folder of images with captions, checked once before training starts.

Captions come from a ``<image stem>.txt`` (or ``.TXT``) sidecar beside each image, or from a manifest:
JSONL (one object per line) or CSV (a header row), with the image under ``"file"``, ``"image"`` or
``"file_name"`` (Hugging Face's imagefolder ``metadata.jsonl``) and the caption under ``"caption"`` or
``"text"``; image paths are relative to the folder. A manifest may list an image more than once (several
captions), but every image in the folder needs a caption. Folder symlinks are followed, each real folder once.

Every image is decoded once at construction, so a corrupt file stops the run before the first step,
never in the middle of an epoch; ``skip_bad=True`` leaves such files out with a warning instead.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from ldm_train.data.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FILE_KEYS = ("file", "image", "file_name")
CAPTION_KEYS = ("caption", "text")
SIDECAR_SUFFIXES = (".txt", ".TXT")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")  # Hugging Face imagefolder's caption manifests
# Image types a folder scan leaves out (with a warning): not decoded, or decoded with surprises (an animation's
# first frame, a TIFF's first page or float pixels).
OTHER_IMAGE_SUFFIXES = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".ico", ".tga",
                        ".psd", ".svg", ".exr", ".hdr", ".dng", ".raw", ".cr2", ".nef", ".arw")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's modes of 16-bit grayscale (PNG, PGM)
SKIP_BAD_FLAG = "--skip-bad-images"

logger = logging.getLogger(__name__)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images under ``root`` (recursive) with captions; ``dataset[i]`` -> (``(3, S, S) float32`` in [-1, 1], caption).

    ``captions``: None for ``<stem>.txt`` sidecars, or the path of a ``.jsonl`` / ``.csv`` manifest.
    Each image is resized on its short side to ``image_size`` (bicubic) and centre-cropped to a square.
    ``skipped`` lists the (path, reason) of unreadable images left out under ``skip_bad``.
    """

    def __init__(self, root: str | Path, image_size: int, captions: str | Path | None = None,
                 skip_bad: bool = False):
        root = Path(root).expanduser()
        if not root.exists():
            raise DataError(f"image folder {root} does not exist; expected a folder of images")
        if not root.is_dir():
            raise DataError(f"image folder {root} is not a folder; expected a folder of images")
        if image_size <= 0:
            raise DataError(f"image_size {image_size} is not positive; expected a size in pixels")
        self.root = root
        self.image_size = image_size

        images = find_images(root, skip_bad=skip_bad, report_others=captions is None)
        if captions is None:
            if not images:
                raise DataError(
                    f"image folder {root} holds no images; expected {'/'.join(IMAGE_SUFFIXES)} files"
                )
            metadata = next((root / name for name in METADATA_NAMES if (root / name).is_file()), None)
            items = [(path, read_sidecar_caption(path, metadata)) for path in images]
        else:
            manifest = Path(captions).expanduser()
            items = read_manifest(manifest, root)
            listed = {path.resolve() for path, _ in items}
            for path in images:
                if path.resolve() not in listed:
                    raise DataError(
                        f"image {path} has no caption: manifest {manifest} does not list it; "
                        f"expected a row for every image in {root}"
                    )

        unique_paths = list(dict.fromkeys(path for path, _ in items))
        problems = find_unreadable_images(unique_paths, image_size)
        if problems and not skip_bad:
            path, reason = problems[0]
            raise DataError(f"cannot read image {path}: {reason}; pass {SKIP_BAD_FLAG} to skip such files")
        for path, reason in problems:
            logger.warning("skipping unreadable image %s: %s", path, reason)
        if problems:
            logger.warning("skipped %d unreadable image(s) of %d in %s", len(problems), len(unique_paths), root)
        bad = {path for path, _ in problems}
        self.skipped: list[tuple[Path, str]] = problems
        self.items: list[tuple[Path, str]] = [(path, caption) for path, caption in items if path not in bad]
        if not self.items:
            raise DataError(f"every image in {root} is unreadable; expected at least one readable image")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def captions(self) -> list[str]:
        return [caption for _, caption in self.items]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        """(image ``(3, image_size, image_size) float32`` in [-1, 1], caption)."""
        path, caption = self.items[index]
        try:
            pixels = load_square_rgb(path, self.image_size)
        except OSError as error:  # the file changed after the check at construction
            raise DataError(f"cannot read image {path}: {_reason(error, path)}") from error
        image = torch.from_numpy(pixels).permute(2, 0, 1).float()
        return image / 127.5 - 1.0, caption


def find_images(root: Path, skip_bad: bool = False, report_others: bool = True) -> list[Path]:
    """Image files under ``root``, recursive through folder symlinks (each real folder once, so a loop ends),
    sorted; hidden files and folders (e.g. macOS ``._x.png``) left out, dangling image symlinks kept (the image
    check reports them). A subfolder that cannot be listed is a ``DataError``, or is left out with a warning under
    ``skip_bad``. ``report_others``: warn once about files of other image types, or with a caption, left out."""
    found: list[Path] = []
    others: list[Path] = []
    scanned: set[str] = set()

    def unlisted(error: OSError) -> None:
        folder = Path(error.filename) if error.filename else root
        reason = _reason(error, folder)
        if isinstance(error, FileNotFoundError):
            reason = "it vanished during the scan"
        if folder == root:
            raise DataError(f"cannot read image folder {root}: {reason}; expected a readable folder of images")
        if not skip_bad:
            raise DataError(f"cannot read folder {folder}: {reason}; pass {SKIP_BAD_FLAG} to skip such folders")
        logger.warning("skipping unreadable folder %s: %s", folder, reason)

    for folder, subfolders, files in os.walk(root, onerror=unlisted, followlinks=True):
        real = os.path.realpath(folder)
        if real in scanned:  # a symlink to a folder scanned already: a loop, or a second way into it
            subfolders.clear()
            continue
        scanned.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        captioned = {os.path.splitext(name)[0] for name in files if name.endswith(SIDECAR_SUFFIXES)}
        captioned -= {os.path.splitext(name)[0] for name in files if name.lower().endswith(IMAGE_SUFFIXES)}
        for name in files:
            if name.startswith("."):
                continue
            path = Path(folder, name)
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                if path.is_file() or (path.is_symlink() and not path.exists()):
                    found.append(path)
            elif suffix in OTHER_IMAGE_SUFFIXES or (path.stem in captioned and suffix not in (".txt", ".jsonl")):
                others.append(path)  # a caption beside it and no image of that stem: it was meant as one
    if others and report_others:
        names = ", ".join(str(path.relative_to(root)) for path in sorted(others)[:3])
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        logger.warning("left out %d file(s) in %s that are not %s images: %s%s", len(others), root,
                       "/".join(IMAGE_SUFFIXES), names, more)
    return sorted(found)


def read_sidecar_caption(image: Path, metadata: Path | None = None) -> str:
    """The stripped text of ``<stem>.txt`` (else ``<stem>.TXT``) beside ``image``; ``metadata``: a manifest in the
    folder that the error for a missing caption names."""
    candidates = list(dict.fromkeys(image.with_suffix(suffix) for suffix in SIDECAR_SUFFIXES))
    sidecar = next((candidate for candidate in candidates if candidate.is_file()), None)
    if sidecar is None:
        names = " nor ".join(candidate.name for candidate in candidates)
        such_as = f" such as {metadata} (pass it as --data)" if metadata is not None else ""
        raise DataError(
            f"image {image} has no caption: neither {names} exists beside it; expected a <stem>.txt caption "
            f"file per image, or a .jsonl/.csv manifest{such_as}"
        )
    try:
        caption = sidecar.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as error:
        raise DataError(f"caption file {sidecar} is not UTF-8 text ({error.reason})") from error
    except OSError as error:
        raise DataError(f"cannot read caption file {sidecar}: {_reason(error, sidecar)}") from error
    if not caption:
        raise DataError(f"caption file {sidecar} is empty; expected the caption of {image.name}")
    return caption


def read_manifest(manifest: Path, root: Path) -> list[tuple[Path, str]]:
    """(image path, caption) per row of a ``.jsonl`` / ``.csv`` manifest; image paths are relative to ``root``."""
    if not manifest.is_file():
        raise DataError(f"caption manifest {manifest} does not exist; expected a .jsonl or .csv file")
    suffix = manifest.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise DataError(f"caption manifest {manifest} has suffix {suffix!r}; expected .jsonl or .csv")
    try:
        rows = list(_jsonl_rows(manifest) if suffix == ".jsonl" else _csv_rows(manifest))
    except UnicodeDecodeError as error:
        raise DataError(f"caption manifest {manifest} is not UTF-8 text ({error.reason})") from error
    except OSError as error:
        raise DataError(f"cannot read caption manifest {manifest}: {_reason(error, manifest)}") from error
    if not rows:
        raise DataError(f"caption manifest {manifest} lists no images; expected one row per image")

    items = []
    for line_number, row in rows:
        file = next((row[key] for key in FILE_KEYS if row.get(key) is not None), None)
        caption = next((row[key] for key in CAPTION_KEYS if row.get(key) is not None), None)
        if not isinstance(file, str) or not isinstance(caption, str):
            raise DataError(
                f"manifest {manifest} line {line_number} has no string {' or '.join(map(repr, FILE_KEYS))} "
                f"and {' or '.join(map(repr, CAPTION_KEYS))}; got keys {sorted(map(str, row))}"
            )
        path = root / file
        if not path.is_file():
            raise DataError(f"manifest {manifest} line {line_number} names {file!r}, but {path} does not exist")
        if not caption.strip():
            raise DataError(f"manifest {manifest} line {line_number} has an empty caption for {file!r}")
        items.append((path, caption.strip()))
    return items


def _jsonl_rows(manifest: Path):
    """(line number, object) per non-blank line."""
    with manifest.open(encoding="utf-8-sig") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"manifest {manifest} line {line_number} is not valid JSON ({error.msg}); expected one "
                    f"object per line"
                ) from error
            if not isinstance(row, dict):
                raise DataError(
                    f"manifest {manifest} line {line_number} is a JSON {type(row).__name__}; expected an object"
                )
            yield line_number, row


def _csv_rows(manifest: Path):
    """(line number, row dict) per data row, after a header naming the file and caption columns."""
    with manifest.open(encoding="utf-8-sig", newline="") as text:  # utf-8-sig: spreadsheets write a BOM
        reader = csv.DictReader(text)
        try:
            header = reader.fieldnames or []
            if not set(header) & set(FILE_KEYS) or not set(header) & set(CAPTION_KEYS):
                raise DataError(
                    f"manifest {manifest} header {header} lacks a {' or '.join(map(repr, FILE_KEYS))} column "
                    f"or a {' or '.join(map(repr, CAPTION_KEYS))} column"
                )
            for row in reader:
                if None in row or None in row.values():  # DictReader's marks for too many / too few fields
                    raise DataError(
                        f"manifest {manifest} line {reader.line_num} does not have the header's "
                        f"{len(header)} fields; expected one value per column"
                    )
                yield reader.line_num, row
        except csv.Error as error:
            raise DataError(f"manifest {manifest} line {reader.line_num} is not valid CSV ({error})") from error


def find_unreadable_images(paths: list[Path], image_size: int) -> list[tuple[Path, str]]:
    """(path, reason) for each file PIL cannot open, verify and decode, in the order of ``paths``."""
    workers = min(8, os.cpu_count() or 1)  # decoding releases the GIL, so threads overlap the work
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(tqdm(pool.map(lambda path: _why_unreadable(path, image_size), paths),
                            total=len(paths), desc="checking images", unit="img", disable=len(paths) < 500))
    return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]


def _why_unreadable(path: Path, image_size: int) -> str | None:
    try:
        with Image.open(path) as image:
            image.verify()
        load_square_rgb(path, image_size)  # verify() alone misses truncated JPEGs
    except Exception as error:  # any failure to decode makes the file unusable; the message says which
        if path.is_symlink() and not path.exists():
            return f"it is a symbolic link to {os.readlink(path)}, which does not exist"
        return _reason(error, path)
    return None


def _reason(error: Exception, path: Path) -> str:
    """``error``'s message without ``path`` or trailing punctuation, to follow "cannot read ... {path}: "."""
    if isinstance(error, Image.DecompressionBombError):
        counts = re.findall(r"\d+", str(error))
        if len(counts) >= 2:
            return (f"it has {int(counts[0]):,} pixels, more than Pillow's limit of {int(counts[1]):,} "
                    f"(2 x PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs)")
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
    else:
        text = str(error).replace(f" {str(path)!r}", "").replace(str(path), "")
    return text.strip().rstrip(" .,:;") or type(error).__name__


def load_square_rgb(path: Path, image_size: int) -> np.ndarray:
    """The image at ``path`` as ``(image_size, image_size, 3) uint8``: short side resized, centre-cropped."""
    with Image.open(path) as image:
        image.draft("RGB", (image_size, image_size))  # JPEG: decode at the smallest scale still >= image_size
        image = ImageOps.exif_transpose(image)
        if image.mode == "F":
            raise ValueError("its pixels are 32-bit floats (Pillow mode F); expected 8- or 16-bit integer pixels")
        if image.mode in SIXTEEN_BIT_MODES:  # convert("L") would clip every value above 255 to white
            values = np.asarray(image, dtype=np.float64) / 257
            image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
        if "A" in image.getbands() or "transparency" in image.info:
            # Composite onto white: dropping alpha would show whatever colour hides under transparent pixels.
            image = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
        image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    square = image.resize((image_size, image_size), Image.Resampling.BICUBIC,
                          box=(left, top, left + side, top + side))
    return np.asarray(square, dtype=np.uint8).copy()
