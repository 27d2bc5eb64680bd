"""Training data: the procedural shapes set and users' own image folders, behind one ``build_dataset``.

Every data set yields (image ``(3, H, W) float32`` in [-1, 1], caption ``str``).
"""

from __future__ import annotations

from pathlib import Path

from ldm_train.data.errors import DataError
from ldm_train.data.image_folder import ImageFolderDataset
from ldm_train.data.shapes import ShapesDataset

DEFAULT_SHAPES_LENGTH = 20_000
MANIFEST_SUFFIXES = (".jsonl", ".csv")


MAX_SHAPES_ITEMS = 10**7  # an epoch's order is a permutation of every index, held in memory (8 bytes each)


def build_dataset(spec: str, image_size: int, seed: int, skip_bad: bool = False,
                  length: int | None = None) -> ShapesDataset | ImageFolderDataset:
    """The data set named by ``spec``.

    ``"shapes"``: ``ShapesDataset`` of ``length`` items (default 20000) with ``seed``; ``"shapes:N"``: N items;
    ``"shapes"`` where a folder ``shapes`` exists is refused as ambiguous (``./shapes`` names the folder).
    A folder: its images with ``<stem>.txt`` sidecar captions. A ``.jsonl`` / ``.csv`` file: that manifest,
    with image paths relative to the manifest's folder. ``seed`` and ``length`` apply to shapes only;
    ``skip_bad`` to folders only.
    """
    if not spec:
        raise DataError("dataset '' is empty; expected 'shapes', 'shapes:N', a folder or a .jsonl/.csv manifest")
    name, colon, count = spec.partition(":")
    if name == "shapes":
        default = length if length is not None else DEFAULT_SHAPES_LENGTH
        if not colon and Path(spec).is_dir():
            raise DataError(f"dataset 'shapes' names both the built-in procedural set and the folder "
                            f"{Path(spec).resolve()}; pass './shapes' for the folder or 'shapes:N' (e.g. "
                            f"'shapes:{default}') for the built-in set")
        if not colon:
            return ShapesDataset(default, image_size, seed)
        if not count.isdigit() or not 1 <= int(count) <= MAX_SHAPES_ITEMS:
            raise DataError(f"dataset {spec!r} has a bad item count {count!r}; expected 'shapes:N' with N from 1 to "
                            f"{MAX_SHAPES_ITEMS}")
        return ShapesDataset(int(count), image_size, seed)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ImageFolderDataset(path, image_size, skip_bad=skip_bad)
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        return ImageFolderDataset(path.parent, image_size, captions=path, skip_bad=skip_bad)
    if path.is_file():
        raise DataError(f"dataset file {spec!r} is not a manifest; expected a .jsonl or .csv file, or a folder")
    raise DataError(
        f"dataset {spec!r} is neither 'shapes', 'shapes:N' nor an existing folder or .jsonl/.csv manifest"
    )


__all__ = ["DataError", "ImageFolderDataset", "ShapesDataset", "build_dataset"]
