"""``ldm-sheet``: ldm-sample folders side by side, each image enlarged by nearest neighbour under its column's
title, captioned with the prompt and seed its PNG records, with the PSNR of each against the first column; bad
columns are one line and exit 2."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm_runtime.images import png_bytes
from ldm_tools import sheet

PROMPTS = ["a large red circle on the left, on a blue background", "a small yellow star in the center"]


def write_run(folder, images, prompts=PROMPTS, seeds=(0, 1)):
    folder.mkdir(parents=True)
    for index, (image, prompt, seed) in enumerate(zip(images, prompts, seeds)):
        (folder / f"{index:03d}-seed{seed}.png").write_bytes(png_bytes(image, {"prompt": prompt, "seed": seed}))
    return folder


@pytest.fixture
def runs(tmp_path, rng):
    eager = [rng.integers(0, 256, (8, 12, 3), dtype=np.uint8) for _ in PROMPTS]
    engine = [image.copy() for image in eager]
    engine[1][0, 0] = 255 - engine[1][0, 0]  # one pixel differs in the second image
    return eager, engine, write_run(tmp_path / "eager", eager), write_run(tmp_path / "engine", engine)


def test_the_sheet_shows_every_image_enlarged_pixel_for_pixel_with_its_caption(runs, tmp_path, capsys):
    eager, engine, eager_dir, engine_dir = runs
    out = tmp_path / "sheet" / "compare.png"
    assert sheet.main([f"eager={eager_dir}", f"engine={engine_dir}", "--out", str(out), "--scale", "5"]) == 0
    assert f"wrote {out} (2 prompts, 2 columns)" in capsys.readouterr().err
    picture = np.asarray(Image.open(out).convert("RGB"))
    for column, images in enumerate((eager, engine)):
        for row, image in enumerate(images):
            enlarged = np.repeat(np.repeat(image, 5, axis=0), 5, axis=1)
            left = sheet.MARGIN + sheet.CAPTION_WIDTH + column * (12 * 5 + sheet.MARGIN)
            top = sheet.MARGIN + 2 * sheet.FONT_SIZE + 8 + row * (8 * 5 + sheet.FONT_SIZE + 6 + sheet.MARGIN)
            assert np.array_equal(picture[top:top + 40, left:left + 60], enlarged), (column, row)
            caption = picture[top:top + 40, sheet.MARGIN:sheet.MARGIN + sheet.CAPTION_WIDTH]
            assert (caption < 128).any(), f"no caption drawn for row {row}"


def test_psnr_is_infinite_for_identical_images_and_follows_its_definition():
    image = np.zeros((4, 4, 3), np.uint8)
    other = image.copy()
    other[0, 0, 0] = 48  # mean squared error 48**2 / 48 = 48
    assert sheet.psnr(image, image) == float("inf")
    assert sheet.psnr(other, image) == pytest.approx(10 * np.log10(255 ** 2 / 48))


@pytest.mark.parametrize("case, fragment", [
    ("missing", "is not a folder; expected the --out folder of an ldm-sample run"),
    ("empty", "holds no images named like 000-seed0.png"),
    ("other prompts", "holds other prompts or seeds than 'eager'"),
    ("no title", "is not TITLE=FOLDER"),
    ("not png", "--out is"),
    ("scale", "--scale is 0; expected an integer from 1 to 64"),
])
def test_columns_that_do_not_match_are_one_line_and_exit_2(runs, tmp_path, capsys, case, fragment, rng):
    _, _, eager_dir, engine_dir = runs
    out, scale = str(tmp_path / "compare.png"), "4"
    second = f"engine={engine_dir}"
    if case == "missing":
        second = f"engine={tmp_path / 'nowhere'}"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        second = f"engine={tmp_path / 'empty'}"
    elif case == "other prompts":
        images = [rng.integers(0, 256, (8, 12, 3), dtype=np.uint8) for _ in PROMPTS]
        second = f"engine={write_run(tmp_path / 'other', images, seeds=(0, 7))}"
    elif case == "no title":
        second = str(engine_dir)
    elif case == "not png":
        out = str(tmp_path / "compare.jpg")
    elif case == "scale":
        scale = "0"
    assert sheet.main([f"eager={eager_dir}", second, "--out", out, "--scale", scale]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm-sheet: error: ") and err.count("\n") == 1 and fragment in err, err


@pytest.mark.parametrize("text, shown", [("[1,2]", "[1, 2]"), ('"x"', '"x"'), ("7", "7"), ("null", "null")])
def test_a_parameters_chunk_that_is_json_but_not_an_object_is_one_line_naming_the_file(tmp_path, capsys, text,
                                                                                        shown):
    from PIL import PngImagePlugin

    folder = tmp_path / "run"
    folder.mkdir()
    chunk = PngImagePlugin.PngInfo()
    chunk.add_text("parameters", text)
    Image.new("RGB", (4, 4)).save(folder / "000-seed0.png", pnginfo=chunk)
    assert sheet.main([f"run={folder}", "--out", str(tmp_path / "compare.png")]) == 2
    err = capsys.readouterr().err
    assert err == (f"ldm-sheet: error: {folder / '000-seed0.png'} has a 'parameters' text chunk of {shown}; expected "
                   f"the JSON object ldm-sample writes\n"), err
