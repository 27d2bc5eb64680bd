"""``ldm-eval``: how well a trained shapes model draws what its prompts say.

    ldm-eval --model runs/ldm --json runs/ldm/eval.json --grid runs/ldm/eval.png
    ldm-eval --model engines/ldm-fp16 --engine onnxruntime --json eval.json --num-prompts 500
    ldm-eval frontier --model runs/ldm --configs torch/fp32/ddim:25 torch/fp32/euler:6 --json frontier.json

The prompts are the captions of the shapes set's held-out split (``ShapesDataset.heldout``, items the
model never trained on); each caption's labels are the truth. One image is generated per prompt
(seed ``--seed + i`` for prompt i), the attribute classifier (``ldm-train classifier``, shipped in
``models/shapes-classifier``) reads what it shows, and the report says:

- ``adherence.<attribute>``: the fraction of images that agree with their prompt on shape, color,
  size, position, background, count (and ``all`` of them). A two-object prompt counts only if both
  objects agree. Captions leave out some sizes and backgrounds: those are judged only where stated
  (``judged`` holds how many prompts each fraction is over).
- ``fid_in_domain``: the Fréchet distance between the classifier features of the generated images and
  of as many other real held-out images; ``fid_real_floor`` is the same between two disjoint real
  sets of that size, the value a perfect generator would score at this sample count.
- ``recon_psnr_db``: the autoencoder alone, mean PSNR of decode(encode(x)) over the prompts' real images.
- ``classifier_accuracy``: the judge's own accuracy on real held-out images (from classifier.json), and
  ``classifier_accuracy_blurred`` on the same images blurred by 1 px, a guide to how much soft edges cost it.

``ldm-eval frontier`` judges a list of sampling configurations (engine, precision, sampler, steps, cache and
guidance intervals) at once, images per second beside quality: ``ldm_tools.frontier``.

The classifier and the held-out prompts come from the training package (``ldm_train.classifier``,
``ldm_train.data.shapes``): this is a tool above the stages, which may import any of them. Torch and the training
package are imported inside the functions that need them, so loading this module imports neither.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ldm_runtime.command_line import OneLineArgumentParser, finite_float, noise_interval, report_user_error
from ldm_runtime.config import (CACHE_SCHEDULES, DEFAULT_GUIDANCE_SCALE, ETA_SAMPLERS, MAX_GUIDANCE_SCALE,
                                is_guidance_scale)
from ldm_runtime.engines import AUTO_ENGINE_HELP, CHECKPOINT_MARKER, ENGINE_DIR_MARKER, ENGINE_NAMES, load_engine
from ldm_runtime.errors import RequestError, UserError
from ldm_runtime.files import write_text_atomic
from ldm_runtime.images import image_grid
from ldm_runtime.noise import MAX_SEED, MAX_TRAIN_SEED
from ldm_runtime.pipeline import DEFAULT_SAMPLER, DEFAULT_STEPS, GenerationRequest, Pipeline
from ldm_runtime.schedulers import SAMPLER_NAMES

PROG = "ldm-eval"
# The classifier shipped with the repository, found from this file so a fresh clone works from any folder.
DEFAULT_CLASSIFIER = Path(__file__).resolve().parents[1] / "models" / "shapes-classifier"
GRID_SAMPLES = 32
GRID_COLUMNS = 8
GRID_TILE = 128  # px: samples are nearest-upscaled to this side
MAX_PSNR_DB = 100.0  # a bit-exact reconstruction would otherwise be infinite
REQUEST_DEFAULTS = {field.name: field.default for field in fields(GenerationRequest)}


class EvalError(UserError, ValueError):
    """A flag of ``ldm-eval`` names something unusable; the message is one sentence for the CLI."""


@dataclass(frozen=True)
class EvalSettings:
    """Flags of ``ldm-eval``; one source of truth for their defaults."""

    model: str
    json: str
    classifier: str = str(DEFAULT_CLASSIFIER)
    num_prompts: int = 200
    sampler: str | None = None  # None: the model's default (Pipeline.resolve)
    steps: int | None = None
    guidance: float | None = None  # None: the model's default (Pipeline.resolve)
    guidance_interval: tuple[float, float] | None = None  # noise levels (low, high] where guidance applies
    cache_interval: int | None = None  # None: the model's default (Pipeline.resolve), else 1: no feature caching
    cache_schedule: str | None = None
    eta: float = REQUEST_DEFAULTS["eta"]
    seed: int = 0  # prompt i is sampled with seed + i
    data_seed: int = 0  # the training data's seed: prompts come from its held-out split
    engine: str = "auto"
    device: str = "auto"
    batch_size: int = 16
    grid: str | None = None

    def validate(self) -> None:
        for name in ("num_prompts", "steps", "batch_size", "cache_interval"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise EvalError(f"--{name.replace('_', '-')} is {getattr(self, name)}; expected a positive integer")
        if self.guidance is not None and not is_guidance_scale(self.guidance):
            raise EvalError(f"--guidance is {self.guidance:g}; expected a number from 0 to {MAX_GUIDANCE_SCALE:g}")
        if not 0.0 <= self.eta <= 1.0:
            raise EvalError(f"--eta is {self.eta}; expected a value in [0, 1]")
        if self.sampler is not None and self.sampler not in SAMPLER_NAMES:
            raise EvalError(f"--sampler is {self.sampler!r}; expected one of {', '.join(SAMPLER_NAMES)}")
        if self.sampler is not None and self.sampler not in ETA_SAMPLERS and self.eta != 0:
            raise EvalError(f"--eta is {self.eta} with --sampler {self.sampler}; expected 0 (eta applies to "
                            f"{' and '.join(ETA_SAMPLERS)} only)")
        last_seed = MAX_SEED - self.num_prompts  # prompt i is sampled with seed + i, below MAX_SEED
        if not 0 <= self.seed <= last_seed:
            raise EvalError(f"--seed is {self.seed}; expected an integer from 0 to {last_seed} (2**63 - "
                            f"--num-prompts: prompt i uses seed + i)")
        if not 0 <= self.data_seed <= MAX_TRAIN_SEED:
            raise EvalError(f"--data-seed is {self.data_seed}; expected an integer from 0 to 2**32 - 1 (a training "
                            f"--seed)")
        model = Path(self.model)
        if not model.is_dir() or not ((model / CHECKPOINT_MARKER).is_file() or (model / ENGINE_DIR_MARKER).is_file()):
            raise EvalError(f"--model {self.model} is neither a checkpoint dir ({CHECKPOINT_MARKER}) nor an engine "
                            f"dir ({ENGINE_DIR_MARKER})")
        check_writable_file("--json", Path(self.json))
        if self.grid is not None:
            check_writable_file("--grid", Path(self.grid))


def check_writable_file(flag: str, path: Path) -> None:
    """Create ``path``'s folder and a probe file in it, before any work: the report must not be lost at the end."""
    if path.is_dir():
        raise EvalError(f"{flag} {path} is a folder; expected a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise EvalError(f"{flag} {path} cannot be written ({error.strerror or error})")


# --- judging: which attributes a caption states, and how often the images agree ---------------------------


def stated_sizes(caption: str, labels) -> tuple[bool, ...]:
    """Per object of ``labels`` (ShapesLabels): whether ``caption`` names its size ("large red circle")."""
    return tuple(f"{obj.size} {obj.color} {obj.shape}" in caption for obj in labels.objects)


def background_stated(caption: str, labels) -> bool:
    """Whether ``caption`` names the background ("on a gray background", "gray backdrop")."""
    return re.search(rf"\b{labels.background} (background|backdrop)\b", caption) is not None


def adherence(predictions: list, truths: list, captions: list[str]) -> tuple[dict[str, float], dict[str, int],
                                                                          list[bool]]:
    """(fraction agreeing per attribute and ``all``, prompts judged per attribute, per-image all-agree flags).

    ``predictions`` / ``truths``: ShapesLabels per image; an attribute a caption does not state is not judged.
    """
    from ldm_train.classifier import ATTRIBUTES, attribute_agreement

    assert len(predictions) == len(truths) == len(captions)
    agreements = [attribute_agreement(pred, truth, stated_sizes(caption, truth), background_stated(caption, truth))
                  for pred, truth, caption in zip(predictions, truths, captions)]
    fractions, judged = {}, {}
    for name in ATTRIBUTES:
        values = [a[name] for a in agreements if a[name] is not None]
        judged[name] = len(values)
        fractions[name] = float(np.mean(values)) if values else float("nan")
    per_image = [all(value for value in a.values() if value is not None) for a in agreements]
    fractions["all"], judged["all"] = float(np.mean(per_image)), len(per_image)
    return fractions, judged, per_image


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to (N, D) and (M, D) feature sets, in float64.

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)). The last trace is computed as the sum of
    the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is symmetric PSD and has the
    same eigenvalues as S_a S_b, so only symmetric eigendecompositions are needed.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    assert a.ndim == b.ndim == 2 and a.shape[1] == b.shape[1] and len(a) > 1 and len(b) > 1, (a.shape, b.shape)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(cov_a)
    sqrt_a = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    product = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    distance = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    return float(max(distance, 0.0))


def score_samples(samples: np.ndarray, truths: list, captions: list[str], reference_images: np.ndarray,
                  floor_images: np.ndarray, classifier) -> dict[str, Any]:
    """Judge generated ``samples`` (N, H, W, 3) uint8 against their prompts' labels and captions.

    ``reference_images`` and ``floor_images``: two disjoint sets of N real held-out images (uint8), for
    ``fid_in_domain`` and ``fid_real_floor``. Returns adherence, judged, fid_in_domain, fid_real_floor and
    ``agrees`` (per-sample all-agree flags).
    """
    from ldm_train.classifier import classify

    predictions, sample_features = classify(classifier, samples)
    _, reference_features = classify(classifier, reference_images)
    _, floor_features = classify(classifier, floor_images)
    fractions, judged, per_image = adherence(predictions, truths, captions)
    return {
        "adherence": fractions,
        "judged": judged,
        "fid_in_domain": frechet_distance(sample_features, reference_features),
        "fid_real_floor": frechet_distance(floor_features, reference_features),
        "agrees": per_image,
        "predictions": predictions,
    }


# --- the model: generation and the autoencoder's reconstruction ---------------------------------------------


def generate_images(engine, captions: list[str], seeds: list[int], steps: int, guidance: float, eta: float,
                    batch_size: int, sampler: str = REQUEST_DEFAULTS["sampler"],
                    guidance_interval: tuple[float, float] | None = None, cache_interval: int | None = None,
                    cache_schedule: str | None = None) -> np.ndarray:
    """One image per caption with ``sampler`` (one of ``SAMPLER_NAMES``): (N, H, W, 3) uint8, sampled ``batch_size``
    at a time (at most what the engine holds). The guidance interval and the cache settings are the request
    fields of the same names (``GenerationRequest``; None: the model's defaults)."""
    pipeline = Pipeline(engine)
    batch_size = max(1, min(batch_size, engine.info.max_images))
    images = []
    with tqdm(total=len(captions), desc="generating", unit="img", dynamic_ncols=True, file=sys.stderr) as bar:
        for start in range(0, len(captions), batch_size):
            requests = [GenerationRequest(prompt=caption, seed=seed, sampler=sampler, steps=steps,
                                          guidance_scale=guidance, guidance_interval=guidance_interval,
                                          cache_interval=cache_interval, cache_schedule=cache_schedule, eta=eta)
                        for caption, seed in zip(captions[start:start + batch_size], seeds[start:start + batch_size])]
            images += [np.asarray(image, dtype=np.uint8) for image in pipeline.generate(requests,
                                                                                        batch_size=batch_size)]
            bar.update(len(requests))
    return np.stack(images)


def reconstruction_psnr(engine, images: np.ndarray, batch_size: int) -> float:
    """Mean per-image PSNR in dB (pixels in [0, 1]) of decode(encode(x)) over (N, H, W, 3) uint8 images, encoded
    ``batch_size`` at a time (at most what the engine holds: an engine dir's autoencoder graphs take as many
    images as one guided UNet call)."""
    batch_size = max(1, min(batch_size, engine.info.max_images))
    psnrs = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
        latents = engine.encode_images(engine.to_array(batch))
        decoded = np.asarray(engine.to_host(engine.decode(latents)), dtype=np.float64)
        reconstructed = (np.clip(decoded, -1.0, 1.0) + 1.0) / 2.0
        original = (batch.astype(np.float64) + 1.0) / 2.0
        mse = np.mean((reconstructed - original) ** 2, axis=(1, 2, 3))
        psnrs.append(np.minimum(10.0 * np.log10(1.0 / np.maximum(mse, 1e-30)), MAX_PSNR_DB))
    return float(np.mean(np.concatenate(psnrs)))


# --- the grid a person looks at --------------------------------------------------------------------------


def write_grid(path: Path, samples: np.ndarray, captions: list[str], agrees: list[bool]) -> None:
    """The first GRID_SAMPLES samples, each over its prompt, framed green (judged to agree) or red."""
    count = min(len(samples), GRID_SAMPLES)
    cells = [_captioned_cell(samples[index], captions[index], agrees[index]) for index in range(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(cells, columns=min(count, GRID_COLUMNS), padding=0).save(path)


def _captioned_cell(sample: np.ndarray, caption: str, agrees: bool) -> np.ndarray:
    """One grid cell ``(h, w, 3) uint8`` on white: the sample upscaled to GRID_TILE in its coloured frame, and
    the caption wrapped below it (six lines at most)."""
    font = ImageFont.load_default()
    line_height, lines, border, margin = 12, 6, 3, 4
    cell = Image.new("RGB", (GRID_TILE + 2 * border + 2 * margin, GRID_TILE + 2 * border + lines * line_height
                             + 2 * margin), (255, 255, 255))
    draw = ImageDraw.Draw(cell)
    frame = (40, 160, 60) if agrees else (210, 40, 40)
    draw.rectangle((margin, margin, margin + GRID_TILE + 2 * border - 1, margin + GRID_TILE + 2 * border - 1),
                   fill=frame)
    cell.paste(Image.fromarray(sample).resize((GRID_TILE, GRID_TILE), Image.NEAREST), (margin + border,
                                                                                        margin + border))
    wrapped = textwrap.wrap(caption, width=24)
    if len(wrapped) > lines:
        wrapped = wrapped[:lines - 1] + [wrapped[lines - 1][:21] + "..."]
    for line_index, line in enumerate(wrapped):
        draw.text((margin, margin + GRID_TILE + 2 * border + 2 + line_index * line_height), line, fill=(0, 0, 0),
                  font=font)
    return np.asarray(cell)


# --- the whole evaluation ---------------------------------------------------------------------------------


def load_judge(folder: str):
    """(the attribute classifier in ``folder``, its classifier.json description); ``EvalError`` naming
    ``--classifier`` where it is unusable."""
    from ldm_train.classifier import load_classifier

    try:
        return load_classifier(folder)
    except UserError as error:
        raise EvalError(f"--classifier {folder} is unusable: {error}") from None


def heldout_prompts(count: int, image_size: int, data_seed: int) -> tuple[list[str], list]:
    """(captions, labels) of items 0..count - 1 of the shapes set's held-out split: the prompts and their truth."""
    from ldm_train.data.shapes import ShapesDataset

    prompts = ShapesDataset.heldout(count, image_size, data_seed)
    return [prompts.caption(i) for i in range(count)], [prompts.labels(i) for i in range(count)]


def real_image_sets(count: int, image_size: int, data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The real images FID compares with, (count, H, W, 3) uint8 each: items [N, 2N) and [2N, 3N) of the same
    held-out split, other than the prompts' own (``fid_in_domain`` against the first, ``fid_real_floor``)."""
    from ldm_train.data.shapes import ShapesDataset

    real = ShapesDataset.heldout(3 * count, image_size, data_seed)
    return real.images_uint8(range(count, 2 * count)), real.images_uint8(range(2 * count, 3 * count))


def evaluate(settings: EvalSettings) -> dict[str, Any]:
    """Run the whole evaluation and return the report (what ``--json`` receives)."""
    from ldm_train.data.shapes import ShapesDataset

    settings.validate()
    started = time.perf_counter()
    classifier, description = load_judge(settings.classifier)
    try:
        engine = load_engine(settings.model, engine=settings.engine, device=settings.device)
    except UserError as error:  # EngineLoadError, CheckpointError, EngineDirError, a bad device
        raise EvalError(f"--model {settings.model} cannot be opened: {error}") from None
    defaults = Pipeline(engine)  # a request that names no sampler or steps gets the model's defaults
    sampler = settings.sampler or defaults.default_sampler
    settings = replace(settings, sampler=sampler, steps=settings.steps or defaults.default_steps_for(sampler),
                       guidance=defaults.default_guidance_scale if settings.guidance is None else settings.guidance)
    count, image_size = settings.num_prompts, engine.info.image_size
    prompts = ShapesDataset.heldout(count, image_size, settings.data_seed)
    captions = [prompts.caption(i) for i in range(count)]
    truths = [prompts.labels(i) for i in range(count)]
    seeds = [settings.seed + i for i in range(count)]

    generate_started = time.perf_counter()
    try:
        samples = generate_images(engine, captions, seeds, settings.steps, settings.guidance, settings.eta,
                                  settings.batch_size, settings.sampler, settings.guidance_interval,
                                  settings.cache_interval, settings.cache_schedule)
    except RequestError as error:
        raise EvalError(f"the model cannot sample with these settings: {error}") from None
    generate_seconds = time.perf_counter() - generate_started

    judge_started = time.perf_counter()
    scores = score_samples(samples, truths, captions,
                           *real_image_sets(count, classifier.config.image_size, settings.data_seed), classifier)
    judge_seconds = time.perf_counter() - judge_started

    reconstruct_started = time.perf_counter()
    psnr = reconstruction_psnr(engine, prompts.images_uint8(range(count)), settings.batch_size)
    reconstruct_seconds = time.perf_counter() - reconstruct_started

    if settings.grid is not None:
        write_grid(Path(settings.grid), samples, captions, scores["agrees"])
    return {
        "adherence": {name: round(value, 4) for name, value in scores["adherence"].items()},
        "judged": scores["judged"],
        "fid_in_domain": round(scores["fid_in_domain"], 4),
        "fid_real_floor": round(scores["fid_real_floor"], 4),
        "recon_psnr_db": round(psnr, 3),
        "classifier_accuracy": description.get("heldout_accuracy", {}),
        "classifier_accuracy_blurred": description.get("heldout_accuracy_blurred", {}),
        "settings": {
            **{name: value for name, value in asdict(settings).items() if name != "json"},
            "engine_name": engine.info.name,
            "image_size": image_size,
            "seeds": f"{settings.seed} + prompt index ({seeds[0]}..{seeds[-1]})",
            "prompts": f"ShapesDataset.heldout({count}, {image_size}, seed={settings.data_seed}) items 0..{count - 1}",
            "timings_s": {
                "generate": round(generate_seconds, 3),
                "images_per_s": round(count / generate_seconds, 3) if generate_seconds > 0 else None,
                "judge": round(judge_seconds, 3),
                "reconstruct": round(reconstruct_seconds, 3),
                "total": round(time.perf_counter() - started, 3),
            },
        },
    }


def add_prompt_seed_flags(parser: argparse.ArgumentParser, defaults) -> None:
    """--seed and --data-seed, which pick the held-out prompts and their seeds (ldm-eval's and the frontier's)."""
    parser.add_argument("--seed", type=int, default=defaults.seed, help="prompt i is sampled with seed + i")
    parser.add_argument("--data-seed", type=int, default=defaults.data_seed,
                        help="seed of the model's training data; the prompts come from its held-out split")


def add_device_flag(parser: argparse.ArgumentParser, defaults) -> None:
    parser.add_argument("--device", default=defaults.device, help="auto (CUDA when present), cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    defaults = EvalSettings(model="", json="")
    parser = OneLineArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint dir (model.json) or engine dir (manifest.json)")
    parser.add_argument("--json", required=True, help="report file to write")
    parser.add_argument("--classifier", default=defaults.classifier,
                        help="classifier dir (default: the models/shapes-classifier shipped with the repository)")
    parser.add_argument("--num-prompts", type=int, default=defaults.num_prompts, help="held-out prompts to generate")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default=defaults.sampler,
                        help="the sampler of every image: ddim (the model's own settings) or another; only ddim and "
                             f"tcd take --eta other than 0 (default: the model's default_sampler, else "
                             f"{DEFAULT_SAMPLER})")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help=f"sampler steps per image (default: the model's default_sampler steps, else "
                             f"{DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=finite_float, default=defaults.guidance,
                        help=f"classifier-free guidance scale (default: the model's default_sampler.guidance_scale, "
                             f"else {DEFAULT_GUIDANCE_SCALE:g})")
    parser.add_argument("--guidance-interval", type=noise_interval, default=None, metavar="LOW,HIGH",
                        help="guide only the UNet calls whose noise level sigma lies in (LOW, HIGH] (default: every "
                             "call)")
    parser.add_argument("--cache-interval", type=int, default=defaults.cache_interval, metavar="N",
                        help="DeepCache: run the whole UNet one step in N and its shallow part, on the features kept "
                             "from then, between (an engine with feature caching only; default: the model's, else 1)")
    parser.add_argument("--cache-schedule", choices=CACHE_SCHEDULES, default=defaults.cache_schedule,
                        help="which steps run the whole UNet under --cache-interval (default: the model's, else "
                             "uniform)")
    parser.add_argument("--eta", type=finite_float, default=defaults.eta,
                        help="DDIM eta or TCD's gamma (0: deterministic); the other samplers take 0 only")
    add_prompt_seed_flags(parser, defaults)
    parser.add_argument("--engine", default=defaults.engine, choices=ENGINE_NAMES,
                        help=f"engine to run the model with: {AUTO_ENGINE_HELP} (the report's engine_name says "
                             f"which)")
    add_device_flag(parser, defaults)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="requests per pipeline call")
    parser.add_argument("--grid", default=None, help="also write a PNG of the first samples with their prompts")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        settings = EvalSettings(**vars(build_parser().parse_args(argv)))
        report = evaluate(settings)
        try:
            write_text_atomic(Path(settings.json), json.dumps(report, indent=2) + "\n")
        except OSError as error:
            raise EvalError(f"--json {settings.json} cannot be written ({error.strerror or error})") from None
    except UserError as error:
        return report_user_error(PROG, error)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    adherence_line = ", ".join(f"{name} {value:.3f}" for name, value in report["adherence"].items())
    sampled = report["settings"]
    print(f"ldm-eval: {sampled['sampler']}, {sampled['steps']} steps: adherence {adherence_line}; fid_in_domain "
          f"{report['fid_in_domain']:.3f} (real floor {report['fid_real_floor']:.3f}); recon "
          f"{report['recon_psnr_db']:.2f} dB; wrote {settings.json}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
