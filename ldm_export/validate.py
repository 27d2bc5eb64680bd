"""Checking an exported engine against the eager PyTorch model it came from.

Two checks, both on fresh random inputs (the seed is drawn per export and recorded in the manifest):

- per graph: the onnxruntime output against the eager fp32 module's on the same inputs, as the relative
  error ``||onnx - eager|| / ||eager||`` (L2 norms over every output element, in float64), at two shape
  cases: (opt batch, opt size) and (min batch, max height x min width). Limits: 1e-4 for fp32 graphs,
  1e-2 for fp16 ones.
- a full sample: the same requests (prompts, seeds, 25 DDIM steps, guidance; for an inpainting model a random
  image and mask too) through ``Pipeline`` on the onnxruntime engine and on the eager torch engine, compared as
  images: PSNR = 10 log10(255^2 / MSE) over the uint8 pixels of all images. Limits: 40 dB for fp32, 30 dB for fp16.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldm_export.onnx_export import GraphSpec, random_inputs, reference_kernels
from ldm_runtime.checkpoint import CheckpointNetworks
from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
from ldm_runtime.engines.torch_engine import TorchEngine
from ldm_runtime.manifest import TEXT_LENGTH, DimRange
from ldm_runtime.pipeline import DEFAULT_STEPS, GenerationRequest, Pipeline

RELATIVE_ERROR_LIMITS = {"fp32": 1e-4, "fp16": 1e-2}
PSNR_LIMITS_DB = {"fp32": 40.0, "fp16": 30.0}
SAMPLE_STEPS = 25  # DDIM steps of the sample check: a full-length run, where fp16 error has most steps to grow
SAMPLE_PROMPTS = ("a red circle on a white background", "two blue squares in the top left corner")
MAX_PSNR_DB = 100.0  # identical images would otherwise be infinite
RELATIVE_ERROR_DEFINITION = "||onnx - eager|| / ||eager||, L2 over all output elements, eager = PyTorch fp32"


@dataclass
class GraphCheck:
    """One graph's worst relative error over its shape cases, and the limit it had to meet."""

    graph: str
    precision: str
    relative_error: float
    limit: float
    cases: list[dict] = field(default_factory=list)  # [{"sizes": {...}, "relative_error": e}, ...]

    @property
    def passed(self) -> bool:
        return self.relative_error <= self.limit  # False for NaN


@dataclass
class SampleCheck:
    """The full-sample comparison: PSNR of the engine's images against the eager pipeline's."""

    psnr_db: float
    limit_db: float
    steps: int
    seeds: list[int]
    prompts: list[str]
    guidance_scale: float
    image_size: int

    @property
    def passed(self) -> bool:
        return self.psnr_db >= self.limit_db


@dataclass
class ValidationReport:
    seed: int
    graphs: list[GraphCheck]
    sample: SampleCheck | None

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.graphs) and (self.sample is None or self.sample.passed)

    def failures(self) -> list[str]:
        """One phrase per failed check, e.g. "unet relative error 3.1e-03 > 1.0e-04"."""
        failed = [f"{c.graph} relative error {c.relative_error:.1e} > {c.limit:.1e}"
                  for c in self.graphs if not c.passed]
        if self.sample is not None and not self.sample.passed:
            failed.append(f"sample PSNR {self.sample.psnr_db:.1f} dB < {self.sample.limit_db:.0f} dB")
        return failed

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "seed": self.seed,
            "relative_error_definition": RELATIVE_ERROR_DEFINITION,
            "graphs": {c.graph: {**asdict(c), "passed": c.passed} for c in self.graphs},
            "sample": None if self.sample is None else {**asdict(self.sample), "passed": self.sample.passed},
        }

    def table(self) -> str:
        """The report as a fixed-width table a person reads on the terminal."""
        lines = [f"{'graph':<14}{'precision':<11}{'shape cases':<34}{'rel. error':>11}{'limit':>9}  result"]
        for check in self.graphs:
            cases = ", ".join(_describe_sizes(case["sizes"]) for case in check.cases)
            lines.append(f"{check.graph:<14}{check.precision:<11}{cases:<34}{check.relative_error:>11.2e}"
                         f"{check.limit:>9.0e}  {'ok' if check.passed else 'FAIL'}")
        if self.sample is not None:
            s = self.sample
            lines.append(f"sample: {len(s.prompts)} prompts, {s.steps} DDIM steps, guidance {s.guidance_scale:g}, "
                         f"{s.image_size}x{s.image_size} px, seeds {s.seeds}: PSNR {s.psnr_db:.1f} dB against the "
                         f"eager pipeline (limit {s.limit_db:.0f} dB)  {'ok' if s.passed else 'FAIL'}")
        lines.append(f"relative error = {RELATIVE_ERROR_DEFINITION}; inputs drawn with seed {self.seed}")
        return "\n".join(lines)


def _describe_sizes(sizes: dict[str, int]) -> str:
    """"B2 8x8" (batch, then the input's height x width), "B2 L16" (batch and text length) or "B2"."""
    for prefix in ("latent", "image"):
        if f"{prefix}_height" in sizes:
            return f"B{sizes['batch']} {sizes[f'{prefix}_height']}x{sizes[f'{prefix}_width']}"
    return f"B{sizes['batch']}" + (f" L{sizes[TEXT_LENGTH]}" if TEXT_LENGTH in sizes else "")


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| (L2 over all elements, float64); inf when expected is all zeros."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    reference = np.linalg.norm(expected)
    difference = np.linalg.norm(actual - expected)
    return float(difference / reference) if reference > 0 else math.inf


def psnr_db(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """PSNR of uint8 images against uint8 references, 10 log10(255^2 / MSE) over all pixels, capped at 100 dB."""
    a = np.stack(actual).astype(np.float64)
    b = np.stack(expected).astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return MAX_PSNR_DB if mse == 0 else min(MAX_PSNR_DB, 10 * math.log10(255.0**2 / mse))


def shape_cases(dims: dict[str, DimRange]) -> list[dict[str, int]]:
    """The axis sizes each graph is checked at: (opt batch, opt sizes) and (min batch, max height x min width, the
    shortest text length)."""
    opt = {name: allowed.opt for name, allowed in dims.items()}
    edge = {name: allowed.min for name, allowed in dims.items()}
    edge["latent_height"], edge["image_height"] = dims["latent_height"].max, dims["image_height"].max
    return [opt] if edge == opt else [opt, edge]


def _used_sizes(spec: GraphSpec, sizes: dict[str, int]) -> dict[str, int]:
    """The sizes of the axes ``spec``'s inputs name."""
    axes = {axis for tensor in spec.inputs for axis in tensor.shape if isinstance(axis, str)}
    return {name: size for name, size in sizes.items() if name in axes}


@torch.no_grad()
def check_graphs(engine: OnnxRuntimeEngine, specs: dict[str, GraphSpec], modules: CheckpointNetworks,
                 dims: dict[str, DimRange], precision_of: dict[str, str], seed: int) -> list[GraphCheck]:
    """Every graph of ``engine`` against its eager module at each of ``shape_cases(dims)``."""
    generator = torch.Generator().manual_seed(seed)
    checks = []
    for name, spec in specs.items():
        precision = precision_of[name]
        check = GraphCheck(name, precision, 0.0, RELATIVE_ERROR_LIMITS[precision])
        for sizes in shape_cases(dims):
            inputs = random_inputs(spec, modules, sizes, generator)
            with reference_kernels():
                expected = spec.module(*inputs.values())
            expected = expected if isinstance(expected, tuple) else (expected,)
            actual = engine.run(name, {key: value.numpy() for key, value in inputs.items()})
            assert len(actual) == len(expected), (name, len(actual), len(expected))
            output_errors = [relative_error(out, reference.numpy()) for out, reference in zip(actual, expected)]
            error = math.nan if any(math.isnan(e) for e in output_errors) else max(output_errors)
            check.cases.append({"sizes": _used_sizes(spec, sizes), "relative_error": error})
        errors = [case["relative_error"] for case in check.cases]
        check.relative_error = math.nan if any(math.isnan(e) for e in errors) else max(errors)
        checks.append(check)
    return checks


def check_sample(engine: OnnxRuntimeEngine, modules: CheckpointNetworks, precision: str, seed: int) -> SampleCheck:
    """The same 25-step DDIM requests (at the model's default guidance) through ``Pipeline`` on ``engine`` and on the
    eager torch engine over ``modules`` (the networks the export loaded: no second copy of the weights, which at SD
    1.5's size would not fit beside the first and the new graphs' sessions on a 24 GiB machine)."""
    count = max(1, min(len(SAMPLE_PROMPTS), engine.info.max_images))
    requests = [GenerationRequest(prompt=prompt, seed=seed + index, sampler="ddim", steps=SAMPLE_STEPS,
                                  **(_inpainting_fields(engine.info.image_size, seed + index)
                                     if engine.info.inpainting else {}))
                for index, prompt in enumerate(SAMPLE_PROMPTS[:count])]
    eager = TorchEngine(modules, device="cpu", unet_chunk_size=None)  # one UNet call per step, unpadded
    with reference_kernels():
        expected = Pipeline(eager).generate(requests, batch_size=count)
    pipeline = Pipeline(engine)
    actual = pipeline.generate(requests, batch_size=count)
    return SampleCheck(psnr_db=psnr_db(actual, expected), limit_db=PSNR_LIMITS_DB[precision], steps=SAMPLE_STEPS,
                       seeds=[r.seed for r in requests], prompts=[r.prompt for r in requests],
                       guidance_scale=pipeline.resolve(requests[0]).guidance_scale, image_size=engine.info.image_size)


def _inpainting_fields(size: int, seed: int) -> dict[str, np.ndarray]:
    """An inpainting model's sample request needs an image and a mask: random pixels drawn from ``seed``, and a
    mask that repaints all but a random rectangle a quarter of each side (the image keeps the init image's pixels
    there on every engine, so the PSNR is mostly of repainted pixels)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.ones((size, size), dtype=bool)
    side = max(1, size // 4)
    top, left = rng.integers(0, size - side + 1, 2)
    mask[top:top + side, left:left + side] = False
    return {"init_image": image, "mask": mask}


def validate_engine(engine_dir: Path, specs: dict[str, GraphSpec], modules: CheckpointNetworks,
                    dims: dict[str, DimRange], precision_of: dict[str, str], precision: str,
                    seed: int) -> ValidationReport:
    """Both checks on the engine written to ``engine_dir`` (which need not be in place yet)."""
    engine = OnnxRuntimeEngine(engine_dir, device="cpu")
    graphs = check_graphs(engine, specs, modules, dims, precision_of, seed)
    sample = check_sample(engine, modules, precision, seed)
    return ValidationReport(seed=seed, graphs=graphs, sample=sample)
