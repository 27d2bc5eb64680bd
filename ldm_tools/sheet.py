"""A picture a person can read: the same prompts' images from several ``ldm-sample`` runs side by side, enlarged,
with their captions.

    python -m ldm_tools.sheet --out runs/main/compare.png "eager PyTorch=runs/main/torch" \\
        "fp16 engine, onnxruntime=runs/main/onnxruntime"

Each ``TITLE=FOLDER`` is one column: the folder's images in ``ldm-sample``'s order (``000-seed0.png``,
``001-seed1.png``, ...). Every row is one prompt, captioned with the prompt and the seed its PNG records (the
"parameters" text chunk ``ldm-sample`` writes); the columns must hold the same prompts and seeds. Images are
enlarged by nearest neighbour (``--scale``), so every generated pixel stays a sharp square. From the second column
on, each image is labelled with its PSNR against the first column's.

Only numpy and Pillow: it runs where the engine dir's runtime runs, without torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ldm_runtime.command_line import OneLineArgumentParser, report_user_error
from ldm_runtime.errors import UserError
from ldm_runtime.files import describe
from ldm_runtime.images import PARAMETERS_KEY
from ldm_runtime.sample import IMAGE_NAME_GLOB

PROG = "ldm-sheet"
DEFAULT_SCALE = 6
MARGIN = 12  # px around and between everything
CAPTION_WIDTH = 300  # px of the caption column
FONT_SIZE = 15
INK = (20, 20, 20)
FAINT = (110, 110, 110)
PAPER = (255, 255, 255)


class SheetError(UserError):
    """A column that cannot be read or does not match the first."""


@dataclass
class Column:
    title: str
    images: list[np.ndarray]  # (H, W, 3) uint8
    captions: list[str]  # "prompt (seed N)"


def read_column(title: str, folder: Path) -> Column:
    """The images of ``folder`` in ``ldm-sample``'s order, with the prompt and seed each PNG records."""
    if not folder.is_dir():
        raise SheetError(f"{folder} is not a folder; expected the --out folder of an ldm-sample run")
    paths = sorted(folder.glob(IMAGE_NAME_GLOB))
    if not paths:
        raise SheetError(f"{folder} holds no images named like 000-seed0.png; expected the --out folder of an "
                         f"ldm-sample run")
    images, captions = [], []
    for path in paths:
        try:
            with Image.open(path) as picture:
                parameters = json.loads(picture.text.get(PARAMETERS_KEY, "{}"))
                images.append(np.asarray(picture.convert("RGB")))
        except (OSError, ValueError) as error:
            raise SheetError(f"{path} cannot be read as an ldm-sample PNG ({error})") from None
        if not isinstance(parameters, dict):
            raise SheetError(f"{path} has a {PARAMETERS_KEY!r} text chunk of {describe(parameters)}; expected the JSON "
                             f"object ldm-sample writes")
        prompt, seed = parameters.get("prompt"), parameters.get("seed")
        captions.append(f"{prompt} (seed {seed})" if prompt is not None else path.stem)
    return Column(title, images, captions)


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB; infinity when they are identical."""
    error = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255.0 ** 2 / error))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's own scalable font, where FreeType is there
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def comparison_sheet(columns: list[Column], scale: int = DEFAULT_SCALE) -> Image.Image:
    """Rows of prompts, a caption column, then one column of images per ``Column``, each enlarged ``scale`` times
    by nearest neighbour under its title; from the second column on each image carries its PSNR against the
    first column's."""
    font, small = _font(FONT_SIZE), _font(FONT_SIZE - 3)
    height, width = columns[0].images[0].shape[:2]
    tile_h, tile_w = height * scale, width * scale
    label_h = FONT_SIZE + 6
    title_h = 2 * FONT_SIZE + 8
    rows = len(columns[0].images)
    sheet_w = MARGIN + CAPTION_WIDTH + len(columns) * (tile_w + MARGIN)
    sheet_h = MARGIN + title_h + rows * (tile_h + label_h + MARGIN)
    sheet = Image.new("RGB", (sheet_w, sheet_h), PAPER)
    draw = ImageDraw.Draw(sheet)
    wrap = max(12, CAPTION_WIDTH // (FONT_SIZE * 55 // 100))  # characters per caption line
    for index, column in enumerate(columns):
        left = MARGIN + CAPTION_WIDTH + index * (tile_w + MARGIN)
        draw.multiline_text((left, MARGIN), "\n".join(textwrap.wrap(column.title, tile_w // (FONT_SIZE // 2))[:2]),
                            fill=INK, font=font)
    for row in range(rows):
        top = MARGIN + title_h + row * (tile_h + label_h + MARGIN)
        caption = "\n".join(textwrap.wrap(columns[0].captions[row], wrap))
        draw.multiline_text((MARGIN, top), caption, fill=INK, font=font, spacing=4)
        for index, column in enumerate(columns):
            left = MARGIN + CAPTION_WIDTH + index * (tile_w + MARGIN)
            tile = Image.fromarray(column.images[row]).resize((tile_w, tile_h), Image.Resampling.NEAREST)
            sheet.paste(tile, (left, top))
            label = f"{width}x{height} px, shown x{scale}"
            if index:
                value = psnr(column.images[row], columns[0].images[row])
                label = "identical to the first" if value == float("inf") else f"PSNR {value:.1f} dB vs the first"
            draw.text((left, top + tile_h + 3), label, fill=FAINT, font=small)
    return sheet


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description="The same prompts' images from several ldm-sample runs "
                                                          "side by side, enlarged, with their captions.")
    parser.add_argument("columns", nargs="+", metavar="TITLE=FOLDER",
                        help="one column per ldm-sample --out folder, under TITLE; the first is the reference")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="the picture to write")
    parser.add_argument("--scale", type=int, default=DEFAULT_SCALE,
                        help="how many screen pixels per image pixel (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not 1 <= args.scale <= 64:
            raise SheetError(f"--scale is {args.scale}; expected an integer from 1 to 64")
        if not args.out.lower().endswith(".png"):
            raise SheetError(f"--out is {args.out}; expected a .png file")
        columns = []
        for spec in args.columns:
            title, separator, folder = spec.rpartition("=")
            if not separator or not title or not folder:
                raise SheetError(f"{spec!r} is not TITLE=FOLDER; expected a column title, '=' and an ldm-sample "
                                 f"--out folder")
            columns.append(read_column(title, Path(folder)))
        first = columns[0]
        for column in columns[1:]:
            if column.captions != first.captions:
                raise SheetError(f"the column {column.title!r} holds other prompts or seeds than {first.title!r} "
                                 f"({len(column.captions)} against {len(first.captions)} images); expected runs of "
                                 f"the same prompts and seeds")
            if {image.shape for image in column.images} != {image.shape for image in first.images}:
                raise SheetError(f"the column {column.title!r} holds images of another size than {first.title!r}")
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            comparison_sheet(columns, args.scale).save(out)
        except OSError as error:
            raise SheetError(f"--out {out} cannot be written ({error.strerror or error})") from None
    except UserError as error:
        return report_user_error(PROG, error)
    print(f"{PROG}: wrote {out} ({len(first.images)} prompts, {len(columns)} columns)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
