"""A procedural captioned data set: one or two coloured shapes on a plain background.

Item ``i`` of ``ShapesDataset(seed=S)`` is generated only from ``(S, i)`` through
``np.random.default_rng([S, i])``, so any index renders to identical bytes in any order and in any
process (DataLoader workers included).

Every item carries its attribute labels (``ShapesLabels``): the background colour and, per object,
its shape, colour, size and position. The module-level tuples ``SHAPES``, ``COLORS``, ``SIZES``,
``POSITIONS`` and ``BACKGROUNDS`` fix the integer class id of every label, for the evaluation
classifier that checks what a trained model draws.

Held-out convention: training uses seed ``S`` (below ``HELDOUT_SEED_OFFSET``); evaluation uses the
disjoint seed ``S + HELDOUT_SEED_OFFSET``, built with ``ShapesDataset.heldout(length, image_size)``.
The attribute combinations are shared (the evaluation measures whether a model draws what a caption
says), but the exact images, jitter and caption wordings come from seeds training never saw.

Images are drawn with PIL at 4x and box-downsampled, so edges are anti-aliased. Objects lie fully
inside the image with a margin, never overlap (two objects live in opposite halves), and their
positions are true in pixels: a 'left' object's centre lies in the left third of the image (the
left part of it for a pair), a 'center' object's centre within 6% of the middle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from ldm_train.data.errors import DataError

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("black", "gray", "white", "blue", "green", "red", "yellow", "purple")

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 215, 40),
    "purple": (140, 50, 190),
    "orange": (245, 130, 25),
    "white": (245, 245, 245),
    "cyan": (40, 205, 215),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}

HELDOUT_SEED_OFFSET = 1_000_000
SUPERSAMPLE = 4  # draw at 4x, then box-downsample: anti-aliased edges
MIN_CONTRAST = 200.0  # "redmean" RGB distance below which an object would blur into its background

# Object diameter as a fraction of the image side; the ranges stay apart so the size word stays true.
DIAMETER_RANGE = {"small": (0.27, 0.31), "large": (0.40, 0.44)}
BORDER_MARGIN = 0.04  # keeps every object off the outermost pixel ring
PAIR_GAP = 0.02  # empty band between the two halves that hold a pair


def _star_outline(points: int = 5, inner_radius: float = 0.24) -> tuple[tuple[float, float], ...]:
    """A star with its first point up, outer radius 0.5; a fat inner radius keeps it readable at 9 px."""
    corners = []
    for k in range(2 * points):
        angle, radius = k * np.pi / points, (0.5 if k % 2 == 0 else inner_radius)
        corners.append((float(radius * np.sin(angle)), float(-radius * np.cos(angle))))
    return tuple(corners)


_ARM = 0.17  # half the width of a cross's arms
# Shape outlines in units of the object's diameter, centred on the object's pixel centroid.
_OUTLINES: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((-0.42, -0.42), (0.42, -0.42), (0.42, 0.42), (-0.42, 0.42)),
    # Equilateral, height 0.75, apex up; its centroid (one third up from the base) sits at the origin.
    "triangle": ((0.0, -0.5), (0.433, 0.25), (-0.433, 0.25)),
    "diamond": ((0.0, -0.5), (0.36, 0.0), (0.0, 0.5), (-0.36, 0.0)),
    "cross": ((-_ARM, -0.5), (_ARM, -0.5), (_ARM, -_ARM), (0.5, -_ARM), (0.5, _ARM), (_ARM, _ARM),
              (_ARM, 0.5), (-_ARM, 0.5), (-_ARM, _ARM), (-0.5, _ARM), (-0.5, -_ARM), (-_ARM, -_ARM)),
    "star": _star_outline(),
}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object; every field is a member of the module tuple of the same name."""

    shape: str
    color: str
    size: str
    position: str

    def class_ids(self) -> tuple[int, int, int, int]:
        """(shape, color, size, position) as indices into SHAPES, COLORS, SIZES, POSITIONS."""
        return (SHAPES.index(self.shape), COLORS.index(self.color), SIZES.index(self.size),
                POSITIONS.index(self.position))


@dataclass(frozen=True)
class ShapesLabels:
    """What an item shows: the background colour and its one or two objects, in caption order."""

    background: str
    objects: tuple[ShapeObject, ...]

    def background_id(self) -> int:
        return BACKGROUNDS.index(self.background)


def color_distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """The "redmean" approximation of perceived RGB distance (0 for equal colours, 765 for pure black vs white)."""
    mean_red = (a[0] + b[0]) / 2
    dr, dg, db = (a[0] - b[0]), (a[1] - b[1]), (a[2] - b[2])
    return float(np.sqrt((2 + mean_red / 256) * dr * dr + 4 * dg * dg + (2 + (255 - mean_red) / 256) * db * db))


class ShapesDataset(torch.utils.data.Dataset):
    """``length`` captioned images of ``image_size`` px with 1..``max_objects`` shapes, deterministic in ``seed``.

    ``dataset[i]`` -> (image ``(3, H, W) float32`` in [-1, 1], caption ``str``).
    """

    def __init__(self, length: int, image_size: int = 32, seed: int = 0, max_objects: int = 2):
        if length <= 0:
            raise DataError(f"shapes length {length} is not positive; expected at least 1 item")
        if image_size < 16:
            raise DataError(f"shapes image_size {image_size} is too small; expected at least 16 px")
        if max_objects not in (1, 2):
            raise DataError(f"shapes max_objects {max_objects} is not supported; expected 1 or 2")
        self.length = length
        self.image_size = image_size
        self.seed = seed
        self.max_objects = max_objects
        self._images: np.ndarray | None = None  # (N, H, W, 3) uint8 once materialize() ran

    @classmethod
    def heldout(cls, length: int, image_size: int = 32, seed: int = 0, max_objects: int = 2) -> "ShapesDataset":
        """The evaluation split: same generator, seed ``seed + HELDOUT_SEED_OFFSET``, disjoint from training."""
        return cls(length, image_size, seed + HELDOUT_SEED_OFFSET, max_objects)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        """(image ``(3, H, W) float32`` in [-1, 1], caption)."""
        if self._images is not None:
            pixels = self._images[self._check_index(index)]
            caption = self._describe(index)[0]
        else:
            pixels, caption, _ = self.render(index)
        image = torch.from_numpy(pixels).permute(2, 0, 1).float()
        return image / 127.5 - 1.0, caption

    def labels(self, index: int) -> ShapesLabels:
        """The attributes of item ``index``."""
        return self._describe(index)[1]

    def caption(self, index: int) -> str:
        """The caption of item ``index`` (no rendering)."""
        return self._describe(index)[0]

    def render(self, index: int) -> tuple[np.ndarray, str, ShapesLabels]:
        """(image ``(H, W, 3) uint8``, caption, labels) of item ``index``."""
        caption, labels, placements = self._describe(index)
        return self._draw(labels, placements), caption, labels

    def images_uint8(self, indices) -> np.ndarray:
        """Items ``indices`` as one ``(N, H, W, 3) uint8`` array (from the cache once materialized)."""
        indices = [self._check_index(int(i)) for i in indices]
        if self._images is not None:
            return self._images[indices]
        out = np.empty((len(indices), self.image_size, self.image_size, 3), dtype=np.uint8)
        for row, index in enumerate(indices):
            out[row] = self.render(index)[0]
        return out

    def materialize(self) -> np.ndarray:
        """Render every item once into ``(N, H, W, 3) uint8`` and serve ``__getitem__`` from it afterwards."""
        if self._images is None:
            images = np.empty((self.length, self.image_size, self.image_size, 3), dtype=np.uint8)
            for index in tqdm(range(self.length), desc="rendering shapes", unit="img",
                              disable=self.length <= 2000):
                images[index] = self.render(index)[0]
            self._images = images
        return self._images

    def _check_index(self, index: int) -> int:
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"shapes index {index} is out of range for {self.length} items")
        return index

    def _describe(self, index: int) -> tuple[str, ShapesLabels, list[tuple[float, float, float]]]:
        """Caption, labels and per-object (centre x, centre y, diameter) as fractions of the image side."""
        index = self._check_index(index)
        rng = np.random.default_rng([self.seed, index])
        count = int(rng.integers(1, self.max_objects + 1))
        if count == 1:
            positions = [POSITIONS[int(rng.integers(len(POSITIONS)))]]
        else:
            pair = ("left", "right") if rng.random() < 0.5 else ("top", "bottom")
            positions = list(pair) if rng.random() < 0.5 else list(reversed(pair))
        colors = [COLORS[int(i)] for i in rng.choice(len(COLORS), size=count, replace=False)]
        objects, placements = [], []
        for position, color in zip(positions, colors):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            size = SIZES[int(rng.integers(len(SIZES)))]
            low, high = DIAMETER_RANGE[size]
            diameter = float(rng.uniform(low, high))
            centre = _place(position, diameter / 2, paired=count == 2, rng=rng)
            objects.append(ShapeObject(shape, color, size, position))
            placements.append((centre[0], centre[1], diameter))
        backgrounds = [name for name in BACKGROUNDS if name not in colors and all(
            color_distance(PALETTE[name], PALETTE[color]) >= MIN_CONTRAST for color in colors)]
        assert backgrounds, f"no background contrasts with {colors}"
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        labels = ShapesLabels(background, tuple(objects))
        return _caption(labels, rng), labels, placements

    def _draw(self, labels: ShapesLabels, placements: list[tuple[float, float, float]]) -> np.ndarray:
        side = self.image_size * SUPERSAMPLE
        canvas = Image.new("RGB", (side, side), PALETTE[labels.background])
        draw = ImageDraw.Draw(canvas)
        for obj, (centre_x, centre_y, diameter) in zip(labels.objects, placements):
            fill = PALETTE[obj.color]
            cx, cy, d = centre_x * side, centre_y * side, diameter * side
            if obj.shape == "circle":
                draw.ellipse((cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2), fill=fill)
            else:
                draw.polygon([(cx + x * d, cy + y * d) for x, y in _OUTLINES[obj.shape]], fill=fill)
        return np.array(canvas.reduce(SUPERSAMPLE))  # a writable copy: torch.from_numpy warns on read-only arrays


def _place(position: str, radius: float, paired: bool, rng: np.random.Generator) -> tuple[float, float]:
    """Centre (x, y) as fractions of the image side for an object of ``radius`` at ``position``."""
    near = radius + BORDER_MARGIN  # the closest a centre may come to the image edge
    if paired:
        # Each object of a pair owns one half, minus a gap: no overlap whatever the sizes.
        along = (near, 0.5 - PAIR_GAP / 2 - radius)
        across = (0.36, 0.64)
    else:
        along = (near, 0.31)  # centre in the outer third
        across = (0.42, 0.58)
    assert along[0] <= along[1], f"object of radius {radius} does not fit at {position}"
    if position == "center":
        return float(rng.uniform(0.44, 0.56)), float(rng.uniform(0.44, 0.56))
    offset, cross = float(rng.uniform(*along)), float(rng.uniform(*across))
    return {
        "left": (offset, cross),
        "right": (1.0 - offset, cross),
        "top": (cross, offset),
        "bottom": (cross, 1.0 - offset),
    }[position]


# Position phrases: each names the position word itself, so the caption always states it.
_POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "at the top of the image"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
    "center": ("in the center", "at the center", "in the center of the image"),
}
_POSITION_SHORT = {"left": "left side", "right": "right side", "top": "top", "bottom": "bottom",
                   "center": "center"}

# {objects}: the objects joined with "and"; {background}: the background colour name.
_TEMPLATES = (
    ("{objects}, on a {background} background", True),
    ("a {background} background with {objects}", True),
    ("{objects}, {background} background", True),
    ("{objects}", True),
    ("a picture of {objects}", True),
    ("{short}, {background} backdrop", False),
    ("{short}", False),
)


def _caption(labels: ShapesLabels, rng: np.random.Generator) -> str:
    """A caption naming every object's shape, colour and position; size and background are sometimes left out."""
    template, full_sentence = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    with_size = [bool(rng.random() < 0.75) for _ in labels.objects]
    if full_sentence:
        phrases = []
        for obj, sized in zip(labels.objects, with_size):
            words = f"{obj.size} {obj.color} {obj.shape}" if sized else f"{obj.color} {obj.shape}"
            where = _POSITION_PHRASES[obj.position][int(rng.integers(3))]
            phrases.append(f"{_article(words)} {words} {where}")
        return template.format(objects=" and ".join(phrases), background=labels.background)
    parts = []
    for obj, sized in zip(labels.objects, with_size):
        words = f"{obj.size} {obj.color} {obj.shape}" if sized else f"{obj.color} {obj.shape}"
        parts.append(f"{words}, {_POSITION_SHORT[obj.position]}")
    return template.format(short=", ".join(parts), background=labels.background)


def _article(words: str) -> str:
    return "an" if words[0] in "aeiou" else "a"
