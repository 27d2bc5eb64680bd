"""The shapes attribute classifier: the judge that reads what a trained model drew.

It predicts, from a shapes image, the same ``ShapesLabels`` the data set generates: the background
colour and, per object, its shape, colour, size and position. The formulation follows how
``ldm_train/data/shapes.py`` places objects: a single object sits at one of the five POSITIONS, and a pair
is always left + right or top + bottom. So an image has one of seven *layouts* (five singles, two
pairs), and a layout fixes both the number of objects and their positions. The network predicts

- the layout (7 classes, mutually exclusive: every prediction is a layout the data can hold),
- the background colour (8 classes),
- per position slot p in POSITIONS: the shape, colour and size of the object at p (5 x (6 + 8 + 2)
  logits; a slot's heads are trained only on images with an object there and read only when the
  predicted layout holds p).

All heads read one pooled feature vector (``feature_dim``, 128 by default), which is also what the
Fréchet distance of ``ldm-eval`` is computed on. The trunk is four conv blocks (two 3x3 convs with
BatchNorm and ReLU each, 2x2 max pooling between blocks), then an adaptive average pool to a 3x3 grid
(the data's positions are thirds of the image) and a linear layer to the feature vector.

Training (``ldm-train classifier``): AdamW with a warmup and cosine decay on the shapes set of the
training seed, half the images Gaussian-blurred (sigma up to 1.2 px) and all with a little pixel noise,
so that the judge reads a generator's soft edges and grain the way a person would. It is measured on the
held-out split (seed + HELDOUT_SEED_OFFSET), clean and blurred by 1 px.

A classifier dir holds ``classifier.json`` (the architecture, the vocabularies, the held-out accuracies
it measured, how it was trained) and ``classifier.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ldm_runtime.checkpoint import CheckpointError, load_tensors
from ldm_runtime.config import ConfigError
from ldm_runtime.files import write_text_atomic
from ldm_runtime.noise import MAX_TRAIN_SEED
from ldm_train.checkpoint import save_tensors_atomic
from ldm_train.data import DataError, ShapesDataset, build_dataset
from ldm_train.data.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, ShapeObject, ShapesLabels
from ldm_train.progress import TrainingProgress
from ldm_train.run import start_process

CLASSIFIER_JSON = "classifier.json"
CLASSIFIER_TENSORS = "classifier.safetensors"
FORMAT_VERSION = 1

# Every arrangement the shapes set draws: five single objects and the two pairs.
LAYOUTS: tuple[tuple[str, ...], ...] = (
    ("left",), ("right",), ("top",), ("bottom",), ("center",), ("left", "right"), ("top", "bottom"),
)
ATTRIBUTES = ("shape", "color", "size", "position", "background", "count")
VOCABULARIES = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS,
                "layout": LAYOUTS}
IGNORE = -100  # the target of a slot with no object: cross_entropy skips it


@dataclass(frozen=True)
class ClassifierConfig:
    """The architecture; serialised into ``classifier.json``."""

    image_size: int = 32
    widths: tuple[int, ...] = (16, 32, 64, 96)  # channels of the four conv blocks
    feature_dim: int = 128
    pooled_side: int = 3  # the trunk's output is average-pooled to pooled_side x pooled_side

    def validate(self) -> None:
        if self.image_size < 16:
            raise ConfigError(f"classifier image_size {self.image_size} is too small; expected at least 16 px")
        if not self.widths or any(width <= 0 for width in self.widths):
            raise ConfigError(f"classifier widths {self.widths} are not positive channel counts")
        if self.feature_dim <= 0 or self.pooled_side <= 0:
            raise ConfigError(
                f"classifier feature_dim {self.feature_dim} / pooled_side {self.pooled_side}: expected positive values"
            )


class ShapesClassifier(nn.Module):
    """Images ``(B, 3, H, W) float32`` in [-1, 1] -> layout, background and per-slot attribute logits."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        config.validate()
        self.config = config
        blocks, channels = [], 3
        for index, width in enumerate(config.widths):
            blocks += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            ]
            if index < len(config.widths) - 1:
                blocks.append(nn.MaxPool2d(2))
            channels = width
        self.trunk = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(config.pooled_side)
        self.embed = nn.Linear(channels * config.pooled_side ** 2, config.feature_dim)
        slots = len(POSITIONS)
        self.layout_head = nn.Linear(config.feature_dim, len(LAYOUTS))
        self.background_head = nn.Linear(config.feature_dim, len(BACKGROUNDS))
        self.shape_head = nn.Linear(config.feature_dim, slots * len(SHAPES))
        self.color_head = nn.Linear(config.feature_dim, slots * len(COLORS))
        self.size_head = nn.Linear(config.feature_dim, slots * len(SIZES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 in [-1, 1] -> the penultimate features (B, feature_dim) float32 (after ReLU)."""
        pooled = self.pool(self.trunk(images)).flatten(1)
        return F.relu(self.embed(pooled))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits: layout (B, 7), background (B, 8), shape (B, 5, 6), color (B, 5, 8), size (B, 5, 2)."""
        return self.heads(self.features(images))

    def heads(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The logits of ``forward`` from features (B, feature_dim)."""
        batch, slots = features.shape[0], len(POSITIONS)
        return {
            "layout": self.layout_head(features),
            "background": self.background_head(features),
            "shape": self.shape_head(features).view(batch, slots, len(SHAPES)),
            "color": self.color_head(features).view(batch, slots, len(COLORS)),
            "size": self.size_head(features).view(batch, slots, len(SIZES)),
        }


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def labels_to_targets(labels: list[ShapesLabels]) -> dict[str, torch.Tensor]:
    """Class ids: layout (B,), background (B,), shape / color / size (B, 5) int64 with IGNORE at empty slots."""
    slots = len(POSITIONS)
    layout = torch.empty(len(labels), dtype=torch.int64)
    background = torch.empty(len(labels), dtype=torch.int64)
    per_slot = {name: torch.full((len(labels), slots), IGNORE, dtype=torch.int64)
                for name in ("shape", "color", "size")}
    for row, item in enumerate(labels):
        layout[row] = LAYOUTS.index(tuple(sorted((obj.position for obj in item.objects), key=POSITIONS.index)))
        background[row] = item.background_id()
        for obj in item.objects:
            shape, color, size, position = obj.class_ids()
            per_slot["shape"][row, position] = shape
            per_slot["color"][row, position] = color
            per_slot["size"][row, position] = size
    return {"layout": layout, "background": background, **per_slot}


def classifier_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the cross-entropies of the five heads (the slot heads averaged over occupied slots only)."""
    loss = F.cross_entropy(logits["layout"], targets["layout"])
    loss = loss + F.cross_entropy(logits["background"], targets["background"])
    for name in ("shape", "color", "size"):
        loss = loss + F.cross_entropy(logits[name].flatten(0, 1), targets[name].flatten(), ignore_index=IGNORE)
    return loss


def decode_predictions(logits: dict[str, torch.Tensor]) -> list[ShapesLabels]:
    """The most likely labels of each image: its layout, then the attributes of the slots that layout holds."""
    layouts = logits["layout"].argmax(-1).tolist()
    backgrounds = logits["background"].argmax(-1).tolist()
    shapes, colors, sizes = (logits[name].argmax(-1).tolist() for name in ("shape", "color", "size"))
    predictions = []
    for row, layout in enumerate(layouts):
        objects = []
        for position in LAYOUTS[layout]:
            slot = POSITIONS.index(position)
            objects.append(ShapeObject(SHAPES[shapes[row][slot]], COLORS[colors[row][slot]],
                                       SIZES[sizes[row][slot]], position))
        predictions.append(ShapesLabels(BACKGROUNDS[backgrounds[row]], tuple(objects)))
    return predictions


def uint8_to_model_input(images: np.ndarray, image_size: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, image_size, image_size) float32 in [-1, 1]; other sizes are resized (bicubic)."""
    assert images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8, images.shape
    if images.shape[1:3] != (image_size, image_size):
        images = np.stack([np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BICUBIC))
                           for image in images])
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# Augmentation, so that the judge reads a generator's soft edges and grain as a person would.
NOISE_STD_MAX = 0.08  # per-image Gaussian pixel noise, std uniform in [0, this) ([-1, 1] units)
BLUR_PROBABILITY = 0.5
BLUR_SIGMA_MAX = 1.2  # px; a blurred image's sigma is uniform in [0, this)
ROBUSTNESS_BLUR_SIGMA = 1.0  # the blur of the second held-out accuracy classifier.json records

def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Blur each image of (B, 3, H, W) with its own Gaussian of std ``sigmas`` (B,) px (0: unchanged), 5x5 taps."""
    offsets = torch.arange(-2, 3, dtype=images.dtype, device=images.device)
    safe = sigmas.to(images.dtype).clamp(min=1e-3).view(-1, 1)
    taps = torch.exp(-0.5 * (offsets / safe) ** 2)
    taps = taps / taps.sum(-1, keepdim=True)  # (B, 5); sigma 1e-3 gives the identity [0, 0, 1, 0, 0]
    batch, channels, height, width = images.shape
    kernels = (taps[:, :, None] * taps[:, None, :]).repeat_interleave(channels, 0).unsqueeze(1)  # (B*3, 1, 5, 5)
    padded = F.pad(images.reshape(1, batch * channels, height, width), (2, 2, 2, 2), mode="replicate")
    return F.conv2d(padded, kernels, groups=batch * channels).view(batch, channels, height, width)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training images (B, 3, H, W) in [-1, 1], half of them blurred, all with some pixel noise."""
    count = images.shape[0]
    blurred = torch.rand(count, generator=generator) < BLUR_PROBABILITY
    sigmas = torch.rand(count, generator=generator) * BLUR_SIGMA_MAX * blurred
    noise_std = torch.rand(count, 1, 1, 1, generator=generator) * NOISE_STD_MAX
    return gaussian_blur(images, sigmas) + noise_std * torch.randn(images.shape, generator=generator)


@torch.no_grad()
def classify(model: ShapesClassifier, images: np.ndarray,
             batch_size: int = 256) -> tuple[list[ShapesLabels], np.ndarray]:
    """(N, H, W, 3) uint8 -> (predicted labels per image, features (N, feature_dim) float64)."""
    model.eval()
    device = next(model.parameters()).device
    predictions, features = [], []
    for start in range(0, len(images), batch_size):
        batch = uint8_to_model_input(images[start:start + batch_size], model.config.image_size).to(device)
        batch_features = model.features(batch)
        predictions += decode_predictions(model.heads(batch_features))
        features.append(batch_features.double().cpu().numpy())
    return predictions, np.concatenate(features)


def _pair_objects(predicted: tuple[ShapeObject, ...], truth: tuple[ShapeObject, ...]):
    """Predicted objects in the order of ``truth``'s, or None when the counts differ.

    A pair is matched by position when the positions agree (so swapped attributes count as wrong);
    otherwise by whichever of the two pairings agrees on more of shape, colour and size.
    """
    if len(predicted) != len(truth):
        return None
    if len(truth) == 1:
        return list(predicted)
    by_position = {obj.position: obj for obj in predicted}
    if set(by_position) == {obj.position for obj in truth}:
        return [by_position[obj.position] for obj in truth]

    def agreements(order):
        return sum((p.shape == t.shape) + (p.color == t.color) + (p.size == t.size) for p, t in zip(order, truth))
    straight, swapped = list(predicted), list(reversed(predicted))
    return straight if agreements(straight) >= agreements(swapped) else swapped


def attribute_agreement(predicted: ShapesLabels, truth: ShapesLabels, sizes_stated: tuple[bool, ...] | None = None,
                        background_stated: bool = True) -> dict[str, bool | None]:
    """Whether ``predicted`` agrees with ``truth`` on each of ATTRIBUTES (all objects must agree).

    ``position``: the same set of positions; ``count``: the same number of objects; ``shape`` / ``color`` /
    ``size``: every object of ``truth`` has its paired predicted object agree (a missing object fails).
    ``sizes_stated`` (one flag per truth object) limits ``size`` to the objects whose size is stated, and
    ``background_stated=False`` skips the background: a skipped attribute is None.
    """
    if sizes_stated is None:
        sizes_stated = (True,) * len(truth.objects)
    assert len(sizes_stated) == len(truth.objects)
    pairs = _pair_objects(predicted.objects, truth.objects)
    result: dict[str, bool | None] = {
        "count": len(predicted.objects) == len(truth.objects),
        "position": sorted(o.position for o in predicted.objects) == sorted(o.position for o in truth.objects),
        "background": predicted.background == truth.background if background_stated else None,
    }
    for name in ("shape", "color"):
        result[name] = pairs is not None and all(getattr(p, name) == getattr(t, name)
                                                 for p, t in zip(pairs, truth.objects))
    if not any(sizes_stated):
        result["size"] = None
    else:
        result["size"] = pairs is not None and all(p.size == t.size for p, t, stated
                                                   in zip(pairs, truth.objects, sizes_stated) if stated)
    return {name: result[name] for name in ATTRIBUTES}


def heldout_accuracy(model: ShapesClassifier, dataset: ShapesDataset, batch_size: int = 256,
                     blur_sigma: float = 0.0) -> dict[str, float]:
    """Per-attribute accuracy over the images of ``dataset`` (an image counts only if every object is right),
    plus ``all``: every attribute right. ``blur_sigma`` > 0 blurs the images first (px)."""
    images = dataset.images_uint8(range(len(dataset)))
    if blur_sigma > 0:
        blurred = gaussian_blur(uint8_to_model_input(images, dataset.image_size),
                                torch.full((len(images),), float(blur_sigma)))
        images = ((blurred.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    predictions, _ = classify(model, images, batch_size)
    agreements = [attribute_agreement(pred, dataset.labels(i)) for i, pred in enumerate(predictions)]
    accuracy = {name: float(np.mean([a[name] for a in agreements])) for name in ATTRIBUTES}
    accuracy["all"] = float(np.mean([all(a.values()) for a in agreements]))
    return accuracy


@dataclass(frozen=True)
class ClassifierTrainSettings:
    """Flags of ``ldm-train classifier``; one source of truth for their defaults."""

    out: str
    data: str = "shapes:30000"
    image_size: int = 32
    steps: int = 4000
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    heldout_images: int = 2000
    device: str = "auto"

    def validate(self) -> None:
        for name in ("steps", "batch_size", "heldout_images"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} is {getattr(self, name)}; expected a positive integer")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"--learning-rate is {self.learning_rate}; expected a positive number")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"--weight-decay is {self.weight_decay}; expected a finite number >= 0")
        if not 0 <= self.seed <= MAX_TRAIN_SEED:
            raise ConfigError(f"--seed is {self.seed}; expected an integer from 0 to 2**32 - 1")
        if not 16 <= self.image_size <= MAX_CLASSIFIER_IMAGE_SIZE:  # the training images are held in memory
            raise ConfigError(f"--image-size is {self.image_size}; expected 16 to {MAX_CLASSIFIER_IMAGE_SIZE} pixels")


MAX_CLASSIFIER_IMAGE_SIZE = 256
WARMUP_STEPS = 100


def train_classifier(settings: ClassifierTrainSettings, config: ClassifierConfig | None = None) -> Path:
    """Train on the shapes set (seed ``settings.seed``), measure accuracy on its held-out split, write the dir."""
    settings.validate()
    config = config or ClassifierConfig(image_size=settings.image_size)
    dataset = build_dataset(settings.data, settings.image_size, settings.seed)
    if not isinstance(dataset, ShapesDataset):
        raise DataError(f"--data {settings.data!r} has no attribute labels; the classifier trains on 'shapes[:N]'")
    if len(dataset) < settings.batch_size:
        raise ConfigError(f"--data {settings.data!r} has {len(dataset)} items, fewer than --batch-size "
                          f"{settings.batch_size}")
    device = start_process(settings.device).device
    started, cpu_started = time.perf_counter(), time.process_time()
    torch.manual_seed(settings.seed)
    model = ShapesClassifier(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS) * 0.5 * (
        1 + math.cos(math.pi * min(step, settings.steps) / settings.steps)))
    images = uint8_to_model_input(dataset.materialize(), config.image_size)
    targets = labels_to_targets([dataset.labels(i) for i in range(len(dataset))])
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(dataset), generator=generator)
    position = 0
    progress = TrainingProgress(settings.steps, 0, "classifier", enabled=True)
    model.train()
    for _ in range(settings.steps):
        if position + settings.batch_size > len(order):
            order, position = torch.randperm(len(dataset), generator=generator), 0
        chosen = order[position:position + settings.batch_size]
        position += settings.batch_size
        batch = augment(images[chosen], generator).to(device)
        loss = classifier_loss(model(batch), {name: value[chosen].to(device) for name, value in targets.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.update(loss=loss.item())
    progress.close()
    train_seconds = time.perf_counter() - started
    heldout = ShapesDataset.heldout(settings.heldout_images, config.image_size, settings.seed)
    accuracy = heldout_accuracy(model, heldout)
    blurred_accuracy = heldout_accuracy(model, heldout, blur_sigma=ROBUSTNESS_BLUR_SIGMA)
    training = {**dataclasses.asdict(settings), "train_seconds": round(train_seconds, 1),
                "train_cpu_seconds": round(time.process_time() - cpu_started, 1),
                "parameters": count_parameters(model), "final_loss": round(loss.item(), 5)}
    out = Path(settings.out)
    save_classifier(out, model.cpu(), accuracy, training, blurred_accuracy)
    return out


def save_classifier(folder: Path, model: ShapesClassifier, accuracy: dict[str, float], training: dict[str, Any],
                    blurred_accuracy: dict[str, float] | None = None) -> None:
    """Write ``classifier.safetensors`` then ``classifier.json`` (last: its presence marks a complete dir).

    ``accuracy``: on clean held-out images; ``blurred_accuracy``: on the same images blurred by
    ROBUSTNESS_BLUR_SIGMA px, how much a generator's soft edges can cost the judge."""
    save_tensors_atomic(folder / CLASSIFIER_TENSORS, model.state_dict())
    description = {
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(model.config),
        "vocabularies": VOCABULARIES,
        "heldout_accuracy": {name: round(value, 4) for name, value in accuracy.items()},
        "heldout_accuracy_blurred": {name: round(value, 4) for name, value in (blurred_accuracy or {}).items()},
        "blur_sigma_px": ROBUSTNESS_BLUR_SIGMA,
        "heldout_images": training["heldout_images"],
        "training": training,
    }
    write_text_atomic(folder / CLASSIFIER_JSON, json.dumps(description, indent=2) + "\n")


def load_classifier(folder: str | Path, device: str | torch.device = "cpu") -> tuple[ShapesClassifier, dict[str, Any]]:
    """(the classifier in eval mode, the ``classifier.json`` description); CheckpointError naming what is wrong."""
    folder = Path(folder)
    path = folder / CLASSIFIER_JSON
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a classifier dir: it has no {CLASSIFIER_JSON}")
    try:
        description = json.loads(path.read_text())
        config = ClassifierConfig(**{**description["config"], "widths": tuple(description["config"]["widths"])})
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is not a valid classifier description ({error})")
    if description.get("vocabularies") != json.loads(json.dumps(VOCABULARIES)):
        raise CheckpointError(f"{path} was trained on other attribute vocabularies than this shapes set has")
    model = ShapesClassifier(config)
    tensors = load_tensors(folder / CLASSIFIER_TENSORS)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:
        raise CheckpointError(f"{folder / CLASSIFIER_TENSORS} does not fit {path}: {error}")
    return model.to(device).eval(), description
