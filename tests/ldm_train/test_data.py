"""The shapes data set (determinism, captions, labels true in pixels) and users' image folders."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_train.data import DataError, ImageFolderDataset, ShapesDataset, build_dataset
from ldm_train.data.shapes import (
    BACKGROUNDS,
    COLORS,
    DIAMETER_RANGE,
    HELDOUT_SEED_OFFSET,
    MIN_CONTRAST,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    color_distance,
)


@pytest.fixture
def seed(seed) -> int:
    """This test's seed (tests/conftest.py), within the training split's range."""
    return seed % HELDOUT_SEED_OFFSET


# --- shapes: determinism ----------------------------------------------------------------------------

def test_shapes_item_bytes_do_not_depend_on_order_or_instance(seed):
    indices = [int(i) for i in np.random.default_rng(seed).choice(500, size=10, replace=False)]
    in_order = ShapesDataset(500, seed=seed)
    forward = {i: in_order.render(i) for i in indices}
    reversed_dataset = ShapesDataset(500, seed=seed)
    backward = {i: reversed_dataset.render(i) for i in reversed(indices)}
    for i in indices:
        alone = ShapesDataset(500, seed=seed).render(i)
        for other in (backward[i], alone):
            assert forward[i][0].tobytes() == other[0].tobytes(), f"seed {seed} item {i}"
            assert forward[i][1:] == other[1:], f"seed {seed} item {i}"


def test_shapes_different_seeds_give_different_images(seed):
    first = ShapesDataset(16, seed=seed).images_uint8(range(16))
    second = ShapesDataset(16, seed=seed + 1).images_uint8(range(16))
    differs = [not np.array_equal(a, b) for a, b in zip(first, second)]
    assert all(differs), f"seeds {seed} and {seed + 1} render identical items {np.flatnonzero(~np.array(differs))}"


def test_shapes_heldout_split_uses_the_offset_seed_and_differs_from_training(seed):
    heldout = ShapesDataset.heldout(8, image_size=32, seed=seed)
    assert heldout.seed == seed + HELDOUT_SEED_OFFSET
    training = ShapesDataset(8, seed=seed)
    assert not np.array_equal(heldout.images_uint8(range(8)), training.images_uint8(range(8)))


# --- shapes: labels and captions --------------------------------------------------------------------

def _words(vocabulary, caption):
    return {word for word in vocabulary if re.search(rf"\b{word}\b", caption)}


def test_shapes_caption_states_each_objects_shape_colour_and_position_and_nothing_else(seed):
    dataset = ShapesDataset(400, seed=seed)
    for index in range(len(dataset)):
        caption, labels = dataset.caption(index), dataset.labels(index)
        objects = labels.objects
        starts = []
        for obj in objects:
            match = re.search(rf"\b(?:(?:{'|'.join(SIZES)}) )?{obj.color} {obj.shape}\b", caption)
            assert match, f"seed {seed} item {index}: {caption!r} lacks {obj}"
            starts.append(match.start())
        # Each object's position word follows its own noun phrase, before the next object's phrase.
        for obj, start in zip(objects, starts):
            end = min([other for other in starts if other > start], default=len(caption))
            segment = caption[start:end]
            assert _words(POSITIONS, segment) == {obj.position}, f"seed {seed} item {index}: {caption!r}"
            size_words = _words(SIZES, segment)
            assert size_words <= {obj.size}, f"seed {seed} item {index}: {caption!r}"
        assert _words(SHAPES, caption) == {obj.shape for obj in objects}, caption
        assert _words(set(COLORS) | set(BACKGROUNDS), caption) <= {o.color for o in objects} | {labels.background}


def test_shapes_labels_cover_every_class_and_map_to_ids(seed):
    dataset = ShapesDataset(3000, seed=seed)
    seen = {"shape": set(), "color": set(), "size": set(), "position": set(), "background": set(), "count": set()}
    for index in range(len(dataset)):
        labels = dataset.labels(index)
        seen["background"].add(BACKGROUNDS[labels.background_id()])
        seen["count"].add(len(labels.objects))
        for obj in labels.objects:
            shape_id, color_id, size_id, position_id = obj.class_ids()
            assert (SHAPES[shape_id], COLORS[color_id], SIZES[size_id], POSITIONS[position_id]) == (
                obj.shape, obj.color, obj.size, obj.position)
            for field in ("shape", "color", "size", "position"):
                seen[field].add(getattr(obj, field))
    assert seen == {"shape": set(SHAPES), "color": set(COLORS), "size": set(SIZES), "position": set(POSITIONS),
                    "background": set(BACKGROUNDS), "count": {1, 2}}
    assert len(SHAPES) >= 5 and len(COLORS) >= 6


def test_shapes_background_never_shares_or_nears_an_object_colour(seed):
    dataset = ShapesDataset(300, seed=seed)
    for index in range(len(dataset)):
        image, _, labels = dataset.render(index)
        colors = [obj.color for obj in labels.objects]
        assert labels.background not in colors and len(set(colors)) == len(colors), f"seed {seed} item {index}"
        for color in colors:
            assert color_distance(PALETTE[labels.background], PALETTE[color]) >= MIN_CONTRAST
        assert tuple(image[0, 0]) == PALETTE[labels.background], f"seed {seed} item {index}"


def _pure_pixel_mask(image: np.ndarray, color: str) -> np.ndarray:
    """(H, W) bool: pixels within 40 of ``color`` (anti-aliased edges blend into other colours)."""
    return np.linalg.norm(image.astype(np.float64) - PALETTE[color], axis=-1) < 40


def _covered_pixel_mask(image: np.ndarray, obj, background: str, paired: bool) -> np.ndarray:
    """(H, W) bool: pixels nearer to ``obj``'s colour than to the background, i.e. at least half covered by it
    (a star's thin point is never a pure pixel, but it is covered), within the object's half of a pair."""
    pixels = image.astype(np.float64)
    mask = (np.linalg.norm(pixels - PALETTE[obj.color], axis=-1)
            < np.linalg.norm(pixels - PALETTE[background], axis=-1))
    if paired:
        half = image.shape[0] // 2
        keep = {"left": np.s_[:, :half], "right": np.s_[:, half:], "top": np.s_[:half, :], "bottom": np.s_[half:, :]}
        own = np.zeros_like(mask)
        own[keep[obj.position]] = True
        mask &= own
    return mask


@pytest.mark.parametrize("image_size", [32, 48])
def test_shapes_positions_and_sizes_are_true_in_pixels(seed, image_size):
    dataset = ShapesDataset(150, image_size=image_size, seed=seed)
    side = float(image_size)
    for index in range(len(dataset)):
        image, caption, labels = dataset.render(index)
        where = f"seed {seed} item {index} ({caption!r})"
        background = _pure_pixel_mask(image, labels.background)
        ring = np.ones_like(background)
        ring[1:-1, 1:-1] = False
        assert background[ring].all(), f"{where}: an object touches the image border"
        paired = len(labels.objects) == 2
        for obj in labels.objects:
            mask = _pure_pixel_mask(image, obj.color)
            rows, cols = np.nonzero(mask)
            covered_rows, covered_cols = np.nonzero(_covered_pixel_mask(image, obj, labels.background, paired))
            assert len(rows) >= 8, f"{where}: {obj} barely visible"
            cx, cy = (cols.mean() + 0.5) / side, (rows.mean() + 0.5) / side
            outer = 0.5 if paired else 1 / 3  # a pair splits the image in halves; one object sits in a third
            if obj.position == "center":
                assert abs(cx - 0.5) < 0.08 and abs(cy - 0.5) < 0.08, f"{where}: centroid {cx:.2f}, {cy:.2f}"
            else:
                along, across = (cx, cy) if obj.position in ("left", "right") else (cy, cx)
                if obj.position in ("right", "bottom"):
                    along = 1 - along
                assert along < outer and abs(across - 0.5) < 0.17, f"{where}: {obj} at {cx:.2f}, {cy:.2f}"
                if paired:  # the whole object stays in its half: the pair cannot overlap
                    coordinate = (cols if obj.position in ("left", "right") else rows) + 0.5
                    if obj.position in ("right", "bottom"):
                        coordinate = side - coordinate
                    assert coordinate.max() < side / 2, f"{where}: {obj} crosses the middle"
            extent = max(np.ptp(covered_cols), np.ptp(covered_rows)) + 1
            low, high = DIAMETER_RANGE[obj.size]
            assert 0.8 * low * side - 1.5 <= extent <= high * side + 1.5, f"{where}: {obj} spans {extent} px"


def test_shapes_items_are_float32_tensors_in_unit_range_matching_the_render(seed):
    dataset = ShapesDataset(12, image_size=32, seed=seed)
    index = int(np.random.default_rng(seed).integers(12))
    image, caption = dataset[index]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and image.max() - image.min() > 0.5
    pixels, render_caption, _ = dataset.render(index)
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    assert caption == render_caption
    assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1)

    batch = dataset.images_uint8([index, 0])
    assert batch.dtype == np.uint8 and batch.shape == (2, 32, 32, 3)
    cache = dataset.materialize()
    assert np.array_equal(cache[[index, 0]], batch)
    cached_image, cached_caption = dataset[index]
    assert torch.equal(cached_image, image) and cached_caption == caption


def test_shapes_rejects_a_length_of_zero():
    with pytest.raises(DataError, match="length 0"):
        ShapesDataset(0)


# --- image folders ----------------------------------------------------------------------------------

def _solid_image(path, color, size=(24, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _random_color(rng):
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def test_image_folder_reads_sidecar_captions_recursively_and_skips_hidden_files(tmp_path, rng):
    colors = {"a.png": _random_color(rng), "sub/b.JPG": _random_color(rng), "sub/deeper/c.webp": _random_color(rng)}
    for name, color in colors.items():
        _solid_image(tmp_path / name, color)
        (tmp_path / name).with_suffix(".txt").write_text(f"  caption of {name}\n")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05macOS resource fork")  # would be unreadable if scanned
    dataset = ImageFolderDataset(tmp_path, image_size=16)
    assert len(dataset) == 3
    for index, name in enumerate(sorted(colors, key=lambda n: str(tmp_path / n))):
        image, caption = dataset[index]
        assert caption == f"caption of {name}"
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        expected = torch.tensor(colors[name], dtype=torch.float32) / 127.5 - 1
        tolerance = 0.1 if name.endswith(("JPG", "webp")) else 1e-6  # lossy formats shift colours slightly
        assert torch.allclose(image[:, 8, 8], expected, atol=tolerance), name


def test_image_folder_resizes_the_short_side_and_crops_the_centre(tmp_path):
    # 60x20 in three vertical bands: a centre crop keeps the middle band whole and slivers of the outer two.
    bands = np.zeros((20, 60, 3), dtype=np.uint8)
    bands[:, :20] = (255, 0, 0)
    bands[:, 20:40] = (0, 255, 0)
    bands[:, 40:] = (0, 0, 255)
    Image.fromarray(bands).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("bands")
    image, _ = ImageFolderDataset(tmp_path, image_size=10)[0]
    assert image.shape == (3, 10, 10)
    green = torch.tensor([-1.0, 1.0, -1.0])
    assert torch.allclose(image[:, :, 2:8].permute(1, 2, 0), green, atol=0.05)  # stretched, it would be 1/3


def test_image_folder_reads_jsonl_manifest_with_either_key_names_and_repeated_images(tmp_path):
    _solid_image(tmp_path / "cat.png", (200, 10, 10))
    _solid_image(tmp_path / "pics" / "dog.jpeg", (10, 200, 10))
    rows = [{"file": "cat.png", "caption": "a cat"}, {"image": "pics/dog.jpeg", "text": "a dog"},
            {"file": "cat.png", "text": "the cat again"}]
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    dataset = ImageFolderDataset(tmp_path, image_size=8, captions=manifest)
    assert dataset.captions == ["a cat", "a dog", "the cat again"]
    assert dataset[1][0][1].mean() > 0.5  # the dog image is green


def test_build_dataset_reads_a_csv_manifest_relative_to_its_folder(tmp_path):
    _solid_image(tmp_path / "data" / "one.png", (1, 2, 3))
    _solid_image(tmp_path / "data" / "two.bmp", (4, 5, 6))
    manifest = tmp_path / "data" / "train.CSV"
    manifest.write_text('image,text\none.png,"red, round thing"\ntwo.bmp,plain\n')
    dataset = build_dataset(str(manifest), image_size=8, seed=0)
    assert isinstance(dataset, ImageFolderDataset)
    assert dataset.captions == ["red, round thing", "plain"]


def test_corrupt_image_raises_data_error_naming_the_file(tmp_path, rng):
    _solid_image(tmp_path / "good.png", (9, 9, 9))
    (tmp_path / "good.txt").write_text("good")
    (tmp_path / "x.png").write_bytes(rng.bytes(300))
    (tmp_path / "x.txt").write_text("garbage")
    with pytest.raises(DataError, match=r"cannot read image .*x\.png: .*--skip-bad-images"):
        ImageFolderDataset(tmp_path, image_size=8)


def test_truncated_jpeg_is_caught_at_construction(tmp_path, rng):
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "cut.jpg", quality=95)
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.txt").write_text("half a photo")
    with pytest.raises(DataError, match=r"cut\.jpg"):
        ImageFolderDataset(tmp_path, image_size=8)


def test_skip_bad_leaves_the_corrupt_image_out_and_warns(tmp_path, caplog):
    for name in ("a", "b"):
        _solid_image(tmp_path / f"{name}.png", (50, 60, 70))
        (tmp_path / f"{name}.txt").write_text(name)
    (tmp_path / "x.png").write_bytes(b"not an image at all")
    (tmp_path / "x.txt").write_text("garbage")
    with caplog.at_level(logging.WARNING, logger="ldm_train.data.image_folder"):
        dataset = build_dataset(str(tmp_path), image_size=8, seed=0, skip_bad=True)
    assert dataset.captions == ["a", "b"]
    assert [path.name for path, _ in dataset.skipped] == ["x.png"]
    assert "x.png" in caplog.text and "skipped 1 unreadable image" in caplog.text


def test_image_without_sidecar_caption_raises_naming_it(tmp_path):
    _solid_image(tmp_path / "a.png", (1, 1, 1))
    (tmp_path / "a.txt").write_text("a")
    _solid_image(tmp_path / "lonely.png", (1, 1, 1))
    with pytest.raises(DataError, match=r"lonely\.png has no caption"):
        ImageFolderDataset(tmp_path, image_size=8)


def test_image_missing_from_manifest_raises_naming_it(tmp_path):
    _solid_image(tmp_path / "a.png", (1, 1, 1))
    _solid_image(tmp_path / "unlisted.png", (1, 1, 1))
    (tmp_path / "m.jsonl").write_text(json.dumps({"file": "a.png", "caption": "a"}) + "\n")
    with pytest.raises(DataError, match=r"unlisted\.png has no caption"):
        ImageFolderDataset(tmp_path, image_size=8, captions=tmp_path / "m.jsonl")


def test_manifest_row_naming_a_missing_file_raises_with_its_line(tmp_path):
    _solid_image(tmp_path / "a.png", (1, 1, 1))
    (tmp_path / "m.csv").write_text("file,caption\na.png,a\nghost.png,boo\n")
    with pytest.raises(DataError, match=r"line 3 names 'ghost\.png'"):
        ImageFolderDataset(tmp_path, image_size=8, captions=tmp_path / "m.csv")


@pytest.mark.parametrize("name, text, message", [
    ("m.jsonl", '{"file": "a.png", "caption": "a"}\n{"file": "a.png", "caption": \n', r"line 2 is not valid JSON"),
    ("m.jsonl", '{"file": "a.png", "caption": "a"}\n["a.png", "a"]\n', r"line 2 is a JSON list"),
    ("m.jsonl", '{"path": "a.png", "caption": "a"}\n', r"line 1 has no string 'file' or 'image'"),
    ("m.csv", "file,caption\na.png,a\na.png\n", r"line 3 does not have the header's 2 fields"),
    ("m.csv", "path,caption\na.png,a\n", r"header \['path', 'caption'\] lacks"),
])
def test_malformed_manifest_raises_naming_the_line(tmp_path, name, text, message):
    _solid_image(tmp_path / "a.png", (1, 1, 1))
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        ImageFolderDataset(tmp_path, image_size=8, captions=tmp_path / name)


def test_missing_file_and_empty_folders_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere", image_size=8)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="is not a folder"):
        ImageFolderDataset(tmp_path / "file.png", image_size=8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images"):
        ImageFolderDataset(tmp_path / "empty", image_size=8)


def test_16_bit_grayscale_png_keeps_its_gradient(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (64, 1))
    Image.fromarray(gradient).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    (tmp_path / "deep.txt").write_text("a grey ramp")
    image, _ = ImageFolderDataset(tmp_path, image_size=64)[0]
    expected = torch.from_numpy(np.rint(gradient / 257)).float() / 127.5 - 1
    for channel in image:
        assert torch.allclose(channel, expected, atol=1.5 / 127.5)


def test_float_pixels_are_refused_in_one_line(tmp_path):
    Image.new("F", (24, 24), 0.5).save(tmp_path / "float.png", format="TIFF")  # the content decides, not the name
    (tmp_path / "float.txt").write_text("floats")
    with pytest.raises(DataError, match=r"float\.png: its pixels are 32-bit floats \(Pillow mode F\)"):
        ImageFolderDataset(tmp_path, image_size=8)


def test_files_of_other_image_types_are_left_out_with_one_warning(tmp_path, caplog):
    _solid_image(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "a.json").write_text("{}")  # per-image metadata beside an accepted image: no warning
    Image.new("RGB", (8, 8)).save(tmp_path / "b.gif")
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "c.tif")
    (tmp_path / "d.heic").write_bytes(b"heic")
    (tmp_path / "e.jp").write_bytes(b"?")
    (tmp_path / "e.txt").write_text("e")
    (tmp_path / "notes.md").write_text("no caption beside it: not an image")
    with caplog.at_level(logging.WARNING, logger="ldm_train.data.image_folder"):
        dataset = ImageFolderDataset(tmp_path, image_size=8)
    assert dataset.captions == ["a"]
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1, warnings
    assert re.fullmatch(r"left out 4 file\(s\) in .* that are not \.png/.*/\.bmp images: b\.gif, d\.heic, e\.jp "
                        r"and 1 more", warnings[0]), warnings[0]


def test_folder_symlinks_are_followed_and_each_real_folder_is_read_once(tmp_path):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    _solid_image(root / "a.png", (1, 2, 3))
    (root / "a.txt").write_text("a")
    _solid_image(elsewhere / "b.png", (4, 5, 6))
    (elsewhere / "b.txt").write_text("b")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    (elsewhere / "back").symlink_to(root, target_is_directory=True)
    dataset = ImageFolderDataset(root, image_size=8)
    assert sorted(dataset.captions) == ["a", "b"]


def test_a_dangling_image_symlink_is_one_line_or_skipped_with_skip_bad(tmp_path, caplog):
    _solid_image(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "gone.png").symlink_to(tmp_path / "moved" / "gone.png")
    (tmp_path / "gone.txt").write_text("gone")
    with pytest.raises(DataError, match=r"gone\.png: it is a symbolic link to .*moved/gone\.png, which does not "
                                        r"exist; pass --skip-bad-images"):
        ImageFolderDataset(tmp_path, image_size=8)
    with caplog.at_level(logging.WARNING, logger="ldm_train.data.image_folder"):
        dataset = ImageFolderDataset(tmp_path, image_size=8, skip_bad=True)
    assert dataset.captions == ["a"] and "gone.png" in caplog.text


def _unlistable(monkeypatch, folder: Path, error: OSError):
    """``os.scandir`` of ``folder`` raises ``error``, as for a folder without read permission (root reads any)."""
    scandir = os.scandir

    def failing(path="."):
        if os.fspath(path) == str(folder):
            raise error
        return scandir(path)

    monkeypatch.setattr(os, "scandir", failing)


@pytest.mark.parametrize("error, reason", [
    (PermissionError(13, "Permission denied"), "Permission denied"),
    (FileNotFoundError(2, "No such file or directory"), "it vanished during the scan"),
])
def test_a_subfolder_that_cannot_be_listed_is_one_line_or_skipped_with_skip_bad(tmp_path, monkeypatch, caplog,
                                                                                 error, reason):
    _solid_image(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "a.txt").write_text("a")
    _solid_image(tmp_path / "locked" / "b.png", (1, 2, 3))
    (tmp_path / "locked" / "b.txt").write_text("b")
    error.filename = str(tmp_path / "locked")
    _unlistable(monkeypatch, tmp_path / "locked", error)
    with pytest.raises(DataError, match=rf"cannot read folder .*locked: {reason}; pass --skip-bad-images"):
        build_dataset(str(tmp_path), image_size=8, seed=0)
    with caplog.at_level(logging.WARNING, logger="ldm_train.data.image_folder"):
        dataset = build_dataset(str(tmp_path), image_size=8, seed=0, skip_bad=True)
    assert dataset.captions == ["a"] and f"skipping unreadable folder {tmp_path / 'locked'}: {reason}" in caplog.text


def test_unreadable_caption_file_and_manifest_are_one_line_naming_them(tmp_path, monkeypatch):
    _solid_image(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "m.jsonl").write_text(json.dumps({"file": "a.png", "caption": "a"}) + "\n")
    read_text, open_file = Path.read_text, Path.open

    def locked(original):
        def read(self, *args, **kwargs):
            if self.name in ("a.txt", "m.jsonl"):
                raise PermissionError(13, "Permission denied", str(self))
            return original(self, *args, **kwargs)
        return read

    monkeypatch.setattr(Path, "read_text", locked(read_text))
    monkeypatch.setattr(Path, "open", locked(open_file))
    with pytest.raises(DataError, match=r"^cannot read caption file .*a\.txt: Permission denied$"):
        ImageFolderDataset(tmp_path, image_size=8)
    with pytest.raises(DataError, match=r"^cannot read caption manifest .*m\.jsonl: Permission denied$"):
        ImageFolderDataset(tmp_path, image_size=8, captions=tmp_path / "m.jsonl")


def test_hugging_face_imagefolder_metadata_with_file_name_is_a_manifest(tmp_path):
    _solid_image(tmp_path / "train" / "0001.png", (1, 2, 3))
    metadata = tmp_path / "train" / "metadata.jsonl"
    metadata.write_text(json.dumps({"file_name": "0001.png", "text": "a dark square"}) + "\n")
    assert build_dataset(str(metadata), image_size=8, seed=0).captions == ["a dark square"]


def test_a_missing_sidecar_names_the_spellings_looked_for_and_a_metadata_manifest_beside_it(tmp_path):
    _solid_image(tmp_path / "train" / "0001.png", (1, 2, 3))
    (tmp_path / "train" / "metadata.csv").write_text("file_name,text\n0001.png,a dark square\n")
    with pytest.raises(DataError, match=r"neither 0001\.txt nor 0001\.TXT exists beside it; expected a <stem>\.txt "
                                        r"caption file per image, or a \.jsonl/\.csv manifest such as "
                                        r".*train/metadata\.csv \(pass it as --data\)$"):
        build_dataset(str(tmp_path / "train"), image_size=8, seed=0)


def test_an_upper_case_image_name_finds_its_upper_case_caption(tmp_path):
    _solid_image(tmp_path / "B.PNG", (1, 2, 3))
    (tmp_path / "B.TXT").write_text("shouted")
    assert ImageFolderDataset(tmp_path, image_size=8).captions == ["shouted"]


def test_an_os_error_reads_as_one_tidy_clause(tmp_path, monkeypatch):
    _solid_image(tmp_path / "x.png", (1, 2, 3))
    (tmp_path / "x.txt").write_text("x")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(DataError, match=r"x\.png: Permission denied; pass --skip-bad-images to skip such files$"):
        ImageFolderDataset(tmp_path, image_size=8)


def test_an_image_past_pillows_pixel_limit_says_so_with_its_size(tmp_path, monkeypatch):
    _solid_image(tmp_path / "x.png", (1, 2, 3))
    (tmp_path / "x.txt").write_text("x")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=r"x\.png: it has 576 pixels, more than Pillow's limit of 200 \(2 x "
                                        r"PIL\.Image\.MAX_IMAGE_PIXELS, a guard against decompression bombs\); pass"):
        ImageFolderDataset(tmp_path, image_size=8)


# --- build_dataset ----------------------------------------------------------------------------------

def test_build_dataset_shapes_specs_set_length_and_seed(seed):
    default = build_dataset("shapes", image_size=32, seed=seed)
    assert isinstance(default, ShapesDataset) and len(default) == 20_000 and default.seed == seed
    assert len(build_dataset("shapes", image_size=32, seed=seed, length=123)) == 123
    counted = build_dataset("shapes:7", image_size=48, seed=seed)
    assert len(counted) == 7 and counted.image_size == 48
    assert counted.render(3)[0].tobytes() == ShapesDataset(7, 48, seed).render(3)[0].tobytes()


@pytest.mark.parametrize("spec", ["shapes:", "shapes:zero", "shapes:0", "shapes:-3"])
def test_build_dataset_rejects_a_bad_shapes_count(spec):
    with pytest.raises(DataError, match=re.escape(repr(spec))):
        build_dataset(spec, image_size=32, seed=0)


def test_build_dataset_rejects_a_spec_that_is_neither_shapes_nor_a_path(tmp_path):
    missing = str(tmp_path / "no_such_data")
    with pytest.raises(DataError, match=r"no_such_data.*neither 'shapes', 'shapes:N' nor an existing folder"):
        build_dataset(missing, image_size=32, seed=0)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt.*expected a \.jsonl or \.csv"):
        build_dataset(str(tmp_path / "notes.txt"), image_size=32, seed=0)


def test_a_shapes_count_past_what_an_epoch_order_holds_is_one_line():
    from ldm_train.classifier import ClassifierTrainSettings
    from ldm_train.data import MAX_SHAPES_ITEMS

    for spec in (f"shapes:{MAX_SHAPES_ITEMS + 1}", "shapes:99999999999999999999999"):
        with pytest.raises(DataError, match=f"expected 'shapes:N' with N from 1 to {MAX_SHAPES_ITEMS}"):
            build_dataset(spec, 16, 0)
    assert len(build_dataset(f"shapes:{MAX_SHAPES_ITEMS}", 16, 0)) == MAX_SHAPES_ITEMS
    with pytest.raises(Exception, match="--image-size is 100000; expected 16 to 256 pixels"):
        ClassifierTrainSettings(out="x", image_size=100000).validate()


def test_shapes_where_a_shapes_folder_exists_is_refused_as_ambiguous(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _solid_image(tmp_path / "shapes" / "a.png", (1, 2, 3))
    (tmp_path / "shapes" / "a.txt").write_text("mine")
    with pytest.raises(DataError, match=r"names both the built-in procedural set and the folder .*shapes; pass "
                                        r"'\./shapes' for the folder or 'shapes:N' \(e\.g\. 'shapes:20000'\) for"):
        build_dataset("shapes", image_size=16, seed=0)
    assert build_dataset("./shapes", image_size=16, seed=0).captions == ["mine"]
    assert isinstance(build_dataset("shapes:3", image_size=16, seed=0), ShapesDataset)


def test_an_empty_spec_is_refused_rather_than_read_as_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _solid_image(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(DataError, match=r"^dataset '' is empty; expected 'shapes', 'shapes:N', a folder or"):
        build_dataset("", image_size=8, seed=0)
