"""What a distilled model folder's requests default to, checked by sampling one image from it."""

from __future__ import annotations

from pathlib import Path

from ldm_runtime.checkpoint import load_checkpoint
from ldm_runtime.engines.torch_engine import TorchEngine
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from ldm_tools.frontier import RecordingEngine
from tests.ldm_export.tiny_checkpoint import TINY_CONFIG


def defaults_and_rows(folder: Path, rng) -> tuple[tuple[str, int, float], int]:
    """(sampler, steps, guidance) of a request to the model in ``folder`` that names none, and the UNet rows its one
    image ran, after loading the folder as a whole model (every weight file, the text encoder and tokenizer) and
    checking the image's shape."""
    load_checkpoint(folder)
    engine = RecordingEngine(TorchEngine(folder, device="cpu"))
    pipeline = Pipeline(engine)
    request = GenerationRequest(prompt="a red circle", seed=int(rng.integers(2**62)))
    resolved = pipeline.resolve(request)
    [image] = pipeline.generate([request])
    assert image.shape == (TINY_CONFIG.image_size, TINY_CONFIG.image_size, 3)
    return (resolved.sampler, resolved.steps, resolved.guidance_scale), engine.whole_rows
