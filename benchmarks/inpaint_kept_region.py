"""How much of an inpainted image's kept region (outside the mask) survives the decoder, on the demo model.

    python benchmarks/inpaint_kept_region.py [--model models/shapes-demo]

Inpainting by latent blending keeps the original's latents outside the mask exactly; the decoder then spreads the
repainted region's change over the whole image (its mid-block attention and GroupNorm statistics), which is why the
pipeline pastes the original pixels back outside the mask. This measures the kept region's PSNR against the init
image before that paste (all of it, the pixels within 4 px of the mask, the ones farther away), beside the
autoencoder's own reconstruction (strength 0), and checks that the pasted output keeps those pixels exactly.
Init images are the model's own (8 of them, default sampler); the centre half of each side is repainted at strength 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCENES = ["a large red circle on the left, on a blue background", "two green squares on a white background",
          "a small yellow star in the top right corner, on a black background", "a blue triangle at the bottom"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/shapes-demo")
    args = parser.parse_args()

    from ldm_runtime.engines import load_engine
    from ldm_runtime.pipeline import GenerationRequest, Pipeline

    pipeline = Pipeline(load_engine(args.model, engine="torch", device="cpu"))
    inits = pipeline.generate([GenerationRequest(prompt=p, seed=s) for s, p in enumerate(SCENES * 2)])
    size = inits[0].shape[0]
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    kept = mask < 128
    near = np.zeros_like(kept)
    near[size // 4 - 4: 3 * size // 4 + 4, size // 4 - 4: 3 * size // 4 + 4] = True
    near &= kept
    requests = [GenerationRequest(prompt="a small yellow star in the center", seed=100 + i, init_image=init,
                                  mask=mask) for i, init in enumerate(inits)]
    outputs = pipeline.generate(requests)
    rows = []
    for request, init, output in zip(requests, inits, outputs):
        states = pipeline.start([request])
        while not states[0].done:
            states = pipeline.advance(states)
        unpasted = pipeline.decode([dataclasses.replace(states[0], request=dataclasses.replace(request, mask=None))])[0]
        reconstruction = pipeline.generate([dataclasses.replace(request, mask=None, strength=0.0)])[0]
        assert np.array_equal(output[kept], init[kept]), "the output lost kept pixels"
        rows.append((psnr(init[kept], unpasted[kept]), psnr(init[near], unpasted[near]),
                     psnr(init[kept & ~near], unpasted[kept & ~near]), psnr(init, reconstruction)))
    print(f"{len(rows)} images of {size}x{size}; output keeps every pixel outside the mask exactly")
    for name, column in zip(["decoded kept region, before the paste", "  within 4 px of the mask", "  farther",
                             "strength 0 reconstruction (whole image)"], np.array(rows).T):
        print(f"{name:40s} PSNR mean {column.mean():5.1f} dB  min {column.min():5.1f}  max {column.max():5.1f}")


if __name__ == "__main__":
    main()
