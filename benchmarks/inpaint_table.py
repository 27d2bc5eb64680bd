"""Inpainting on held-out shapes images: repaint one object as another, judged by the shipped classifier.

    python benchmarks/inpaint_table.py --model models/shapes-demo --model runs/demo-inpaint \\
        --json benchmarks/results/cpu-inpaint-table.json

Each held-out image (``ShapesDataset.heldout``, one object, layouts never trained on) has its object's bounding box
(of the pixels away from the background colour, grown by ``--grow`` px) masked; the prompt asks for another shape in
another colour (one that stands out from the background) at the same place and size, on the same background. Per
model (a text-to-image model inpaints by latent blending, an inpainting model by its mask input):

- the filled region's adherence: the judge's shape and colour of the image's object against the prompt's;
- the kept region (outside the mask): PSNR against the init image before the pipeline pastes the init image's
  pixels back (what the model and the decoder kept), and after it (exact by construction: checked).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm_runtime.engines import load_engine  # noqa: E402
from ldm_runtime.pipeline import GenerationRequest, Pipeline  # noqa: E402
from ldm_tools.bench.cli import machine_info  # noqa: E402
from ldm_tools.evaluate import load_judge  # noqa: E402
from ldm_train.classifier import classify  # noqa: E402
from ldm_train.data.shapes import (COLORS, MIN_CONTRAST, PALETTE, SHAPES, ShapeObject, ShapesDataset,  # noqa: E402
                                   ShapesLabels, _caption, color_distance)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def object_mask(image: np.ndarray, background: str, grow: int) -> np.ndarray:
    """``(H, W) uint8``, 255 over the bounding box of the pixels that differ from the background colour, grown by
    ``grow`` px on each side (a box, so that any shape fits where the old one was)."""
    distance = np.abs(image.astype(np.int32) - np.array(PALETTE[background])).sum(axis=-1)
    rows, columns = np.nonzero(distance > 60)
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    height, width = mask.shape
    mask[max(rows.min() - grow, 0):min(rows.max() + grow + 1, height),
         max(columns.min() - grow, 0):min(columns.max() + grow + 1, width)] = 255
    return mask


def edits(count: int, size: int, seed: int, grow: int) -> list[tuple[np.ndarray, np.ndarray, str, ShapesLabels]]:
    """(init image, mask, prompt, the prompt's labels) for held-out items 0..count - 1."""
    data = ShapesDataset.heldout(count, size, seed, max_objects=1)
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        labels = data.labels(index)
        old = labels.objects[0]
        colours = [c for c in COLORS if c != old.color
                   and color_distance(PALETTE[c], PALETTE[labels.background]) >= MIN_CONTRAST]
        shapes = [s for s in SHAPES if s != old.shape]
        new = ShapeObject(shapes[int(rng.integers(len(shapes)))], colours[int(rng.integers(len(colours)))],
                          old.size, old.position)
        wanted = ShapesLabels(labels.background, (new,))
        image = data.images_uint8([index])[0]
        out.append((image, object_mask(image, labels.background, grow), _caption(wanted, rng), wanted))
    return out


def run_model(model: str, cases, steps: int, guidance: float, batch: int) -> dict:
    pipeline = Pipeline(load_engine(model, engine="torch", device="cpu"))
    requests = [GenerationRequest(prompt=prompt, seed=index, sampler="ddim", steps=steps, guidance_scale=guidance,
                                  init_image=image, mask=mask, strength=1.0)
                for index, (image, mask, prompt, _) in enumerate(cases)]
    started = time.perf_counter()
    outputs, unpasted = [], []
    for start in range(0, len(requests), batch):
        part = requests[start:start + batch]
        states = pipeline.start(part)
        while not all(state.done for state in states):
            states = pipeline.advance(states)
        outputs += pipeline.decode(states)
        unpasted += pipeline.decode([dataclasses.replace(s, request=dataclasses.replace(s.request, mask=None))
                                     for s in states])
    seconds = time.perf_counter() - started
    kept_before, kept_after = [], []
    for (image, mask, _, _), output, raw in zip(cases, outputs, unpasted):
        kept = mask < 128
        kept_before.append(psnr(np.asarray(raw)[kept], image[kept]))
        kept_after.append(bool(np.array_equal(np.asarray(output)[kept], image[kept])))
    return {"outputs": np.stack([np.asarray(o) for o in outputs]), "seconds": seconds,
            "kept_psnr_before_paste_db": kept_before, "kept_exact_after_paste": kept_after}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--classifier", default=str(REPO / "models" / "shapes-classifier"))
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--grow", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--json", required=True)
    parser.add_argument("--grid", default=None, metavar="PNG",
                        help="also write the first 8 edits: the init images, their masks (shaded), each model's images")
    args = parser.parse_args()
    classifier, _ = load_judge(args.classifier)
    size = load_engine(args.model[0], engine="torch", device="cpu").info.image_size
    cases = edits(args.count, size, args.data_seed, args.grow)
    results, outputs = {}, []
    for model in args.model:
        run = run_model(model, cases, args.steps, args.guidance, args.batch)
        outputs.append(run["outputs"])
        predictions = classify(classifier, run["outputs"])[0]
        wanted = [case[3].objects[0] for case in cases]
        shape = [bool(p.objects) and p.objects[0].shape == w.shape for p, w in zip(predictions, wanted)]
        colour = [bool(p.objects) and p.objects[0].color == w.color for p, w in zip(predictions, wanted)]
        one = [len(p.objects) == 1 for p in predictions]
        before = np.array(run["kept_psnr_before_paste_db"])
        results[model] = {
            "filled_shape": round(float(np.mean(shape)), 4), "filled_colour": round(float(np.mean(colour)), 4),
            "filled_shape_and_colour": round(float(np.mean(np.logical_and(shape, colour))), 4),
            "one_object": round(float(np.mean(one)), 4),
            "kept_psnr_before_paste_db": {"mean": round(float(before.mean()), 2),
                                          "min": round(float(before.min()), 2)},
            "kept_exact_after_paste": all(run["kept_exact_after_paste"]),
            "seconds": round(run["seconds"], 1), "images_per_s": round(args.count / run["seconds"], 3),
        }
        print(model, json.dumps(results[model]), file=sys.stderr)
    mask_share = float(np.mean([np.mean(case[1] >= 128) for case in cases]))
    report = {
        "machine": machine_info(),
        "settings": {**vars(args), "sampler": "ddim", "strength": 1.0, "engine": "torch fp32 cpu",
                     "cases": f"ShapesDataset.heldout({args.count}, {size}, seed={args.data_seed}, max_objects=1)",
                     "masked_share_of_pixels": round(mask_share, 4)},
        "results": results,
    }
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.grid is not None:
        write_grid(Path(args.grid), cases[:8], [images[:8] for images in outputs])
    return 0


def write_grid(path: Path, cases, rows: list[np.ndarray], upscale: int = 4) -> None:
    """Rows of 32 px cells: the init images, the same with the mask shaded, then each model's images."""
    from PIL import Image

    shaded = [np.where((mask >= 128)[..., None], (image * 0.4 + 255 * 0.6).astype(np.uint8), image)
              for image, mask, _, _ in cases]
    grid = [[case[0] for case in cases], shaded, *[list(images) for images in rows]]
    side, gap = cases[0][0].shape[0], 2
    canvas = np.full((len(grid) * (side + gap), len(cases) * (side + gap), 3), 255, dtype=np.uint8)
    for row, cells in enumerate(grid):
        for column, cell in enumerate(cells):
            top, left = row * (side + gap), column * (side + gap)
            canvas[top:top + side, left:left + side] = cell
    image = Image.fromarray(canvas)
    image.resize((image.width * upscale, image.height * upscale), Image.NEAREST).save(path)


if __name__ == "__main__":
    sys.exit(main())
