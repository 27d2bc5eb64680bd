"""ldm-eval: adherence and Fréchet scoring on real and corrupted shapes images, the reconstruction PSNR, the
whole run through ``main`` with a stand-in generator, and the bad inputs a user can give."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

import ldm_tools.evaluate
from ldm_runtime.engines.base import EngineInfo
from ldm_runtime.schedulers import SAMPLER_NAMES
from ldm_tools.evaluate import (
    DEFAULT_CLASSIFIER, adherence, background_stated, frechet_distance, main, reconstruction_psnr, score_samples,
    stated_sizes,
)
from ldm_train.data.shapes import (
    COLORS, MIN_CONTRAST, PALETTE, ShapeObject, ShapesDataset, ShapesLabels, color_distance,
)

needs_classifier = pytest.mark.skipif(not (DEFAULT_CLASSIFIER / "classifier.json").is_file(),
                                      reason="models/shapes-classifier is not in this tree")


def fresh_seed() -> int:
    """A data seed from numpy's global generator, which tests/conftest.py seeds per test (LDM_TEST_SEED)."""
    return int(np.random.randint(1, 100_000))


def recoloured(dataset: ShapesDataset, index: int) -> tuple[np.ndarray, ShapesLabels]:
    """Item ``index`` drawn with every object in another colour that still stands out from the background."""
    caption, labels, placements = dataset._describe(index)
    taken = {obj.color for obj in labels.objects}
    objects = []
    for obj in labels.objects:
        color = next(c for c in COLORS if c not in taken and c != labels.background
                     and color_distance(PALETTE[c], PALETTE[labels.background]) >= MIN_CONTRAST)
        taken.add(color)
        objects.append(replace(obj, color=color))
    wrong = ShapesLabels(labels.background, tuple(objects))
    return dataset._draw(wrong, placements), wrong


def heldout_case(count: int):
    """(prompts dataset, captions, labels, reference images, floor images) from a fresh held-out seed."""
    data_seed = fresh_seed()
    real = ShapesDataset.heldout(3 * count, 32, data_seed)
    captions = [real.caption(i) for i in range(count)]
    truths = [real.labels(i) for i in range(count)]
    return real, captions, truths, real.images_uint8(range(count, 2 * count)), real.images_uint8(range(2 * count,
                                                                                                       3 * count))


@pytest.fixture(scope="module")
def classifier():
    from ldm_train.classifier import load_classifier
    return load_classifier(DEFAULT_CLASSIFIER)[0]


@needs_classifier
def test_perfect_generator_scores_full_adherence_and_fid_at_the_real_floor(classifier):
    real, captions, truths, reference, floor = heldout_case(96)
    scores = score_samples(real.images_uint8(range(96)), truths, captions, reference, floor, classifier)
    assert all(scores["adherence"][name] >= 0.95 for name in ("shape", "color", "position", "count", "background")), \
        scores["adherence"]
    assert scores["fid_in_domain"] < 1.5 * scores["fid_real_floor"] + 1e-3, scores
    # A generator that draws only the background: the same colours of canvas, no objects, a far-off distribution.
    blank = np.stack([np.broadcast_to(np.array(PALETTE[t.background], np.uint8), (32, 32, 3)) for t in truths])
    blank_scores = score_samples(blank, truths, captions, reference, floor, classifier)
    assert blank_scores["fid_in_domain"] > 5 * scores["fid_real_floor"], (blank_scores["fid_in_domain"], scores)
    assert blank_scores["adherence"]["all"] < 0.2


@needs_classifier
def test_wrong_colour_generator_scores_low_on_colour_and_high_on_shape(classifier):
    real, captions, truths, reference, floor = heldout_case(96)
    wrong = np.stack([recoloured(real, i)[0] for i in range(96)])
    scores = score_samples(wrong, truths, captions, reference, floor, classifier)
    assert scores["adherence"]["color"] < 0.1, scores["adherence"]
    assert scores["adherence"]["shape"] >= 0.9 and scores["adherence"]["position"] >= 0.95, scores["adherence"]


def test_adherence_judges_size_and_background_only_where_the_caption_states_them():
    dataset = ShapesDataset.heldout(300, 32, fresh_seed())
    captions = [dataset.caption(i) for i in range(300)]
    truths = [dataset.labels(i) for i in range(300)]
    # Predictions that get every size and background wrong and everything else right.
    flipped = [ShapesLabels(next(b for b in ("black", "white") if b != t.background),
                            tuple(replace(o, size="large" if o.size == "small" else "small") for o in t.objects))
               for t in truths]
    fractions, judged, per_image = adherence(flipped, truths, captions)
    assert fractions["shape"] == fractions["color"] == fractions["position"] == fractions["count"] == 1.0
    assert fractions["size"] == 0.0 and fractions["background"] == 0.0
    stated_size = sum(any(stated_sizes(c, t)) for c, t in zip(captions, truths))
    stated_background = sum(background_stated(c, t) for c, t in zip(captions, truths))
    assert judged["size"] == stated_size and 0 < stated_size < 300
    assert judged["background"] == stated_background and 0 < stated_background < 300
    # An image fails "all" only through an attribute its caption states.
    assert per_image == [not (any(stated_sizes(c, t)) or background_stated(c, t)) for c, t in zip(captions, truths)]


def test_caption_parsing_finds_the_stated_attributes():
    labels = ShapesLabels("gray", (ShapeObject("star", "red", "large", "left"), ShapeObject("cross", "blue", "small",
                                                                                            "right")))
    caption = "a large red star on the left and a blue cross on the right, on a gray background"
    assert stated_sizes(caption, labels) == (True, False)
    assert background_stated(caption, labels)
    assert not background_stated("large red star, left side, small blue cross, right side", labels)


def test_frechet_distance_matches_the_float64_formula_on_random_gaussians(rng):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    dim = 6
    a = rng.normal(size=(400, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=dim)
    b = rng.normal(size=(300, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=dim)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b)
                - 2 * np.trace(scipy_linalg.sqrtm(cov_a @ cov_b).real))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8, abs=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_diagonal_gaussians_has_the_closed_form(rng):
    dim, count = 4, 5000
    std_a, std_b = rng.uniform(0.5, 2, dim), rng.uniform(0.5, 2, dim)
    a = rng.normal(size=(count, dim))
    a = (a - a.mean(0)) / a.std(0, ddof=1) * std_a  # exactly the chosen moments, up to the tiny cross-covariance
    b = rng.normal(size=(count, dim))
    b = (b - b.mean(0)) / b.std(0, ddof=1) * std_b + 1.5
    expected = dim * 1.5 ** 2 + np.sum((std_a - std_b) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


class FakeEngine:
    """An autoencoder whose reconstruction is the input plus a fixed offset: its PSNR is known exactly."""

    def __init__(self, offset: float):
        self.offset = offset
        self.info = EngineInfo(name="fake", latent_channels=3, latent_factor=1, latent_scale_factor=1.0,
                               image_size=32, min_image_size=32, max_image_size=32, image_size_multiple=8,
                               max_batch_size=64, text_max_length=16, schedule={})

    def to_array(self, values, like=None):
        return np.asarray(values, np.float32)

    def to_host(self, array):
        return np.asarray(array)

    def encode_images(self, images):
        assert len(images) <= self.info.max_images, f"{len(images)} images, past the engine's {self.info.max_images}"
        return images

    def decode(self, latents):
        return latents + self.offset


def test_reconstruction_psnr_of_a_known_offset(rng):
    images = rng.integers(40, 215, size=(10, 32, 32, 3), dtype=np.uint8)  # the offset never clips
    offset = float(rng.uniform(0.01, 0.1))  # in [-1, 1] units: offset / 2 in [0, 1] pixels
    expected = 10 * np.log10(1 / (offset / 2) ** 2)
    assert reconstruction_psnr(FakeEngine(offset), images, batch_size=4) == pytest.approx(expected, rel=1e-4)
    small = FakeEngine(offset)  # an engine dir exported for 8 UNet rows holds 4 images a call: --batch-size 16
    small.info = replace(small.info, max_batch_size=8)  # is cut to that, not refused after generating
    assert reconstruction_psnr(small, images, batch_size=16) == pytest.approx(expected, rel=1e-4)


@pytest.fixture
def stand_in_model(tmp_path, monkeypatch):
    """A model dir, ``load_engine`` and a pipeline that draws each prompt's real held-out image."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text("{}")
    calls = []

    class Pipeline:
        default_sampler, default_steps = "ddim", 25  # a model.json that names ddim at 25 steps
        default_guidance_scale = 5.0

        def default_steps_for(self, sampler):
            return self.default_steps

        def __init__(self, engine):
            self.real = ShapesDataset.heldout(64, 32, seed=7)
            self.by_caption = {}
            for index in reversed(range(64)):
                self.by_caption[self.real.caption(index)] = index

        def generate(self, requests, batch_size=None):
            calls.append(requests)
            return [self.real.render(self.by_caption[r.prompt])[0] for r in requests]

    monkeypatch.setattr(ldm_tools.evaluate, "Pipeline", Pipeline)
    monkeypatch.setattr(ldm_tools.evaluate, "load_engine", lambda folder, engine, device: FakeEngine(0.02))
    return model, calls


@needs_classifier
def test_main_writes_the_report_and_the_grid(stand_in_model, tmp_path):
    model, calls = stand_in_model
    report_path, grid_path = tmp_path / "out" / "eval.json", tmp_path / "out" / "grid.png"
    assert main(["--model", str(model), "--json", str(report_path), "--grid", str(grid_path), "--num-prompts", "24",
                 "--data-seed", "7", "--seed", "100", "--steps", "3", "--batch-size", "10"]) == 0
    report = json.loads(report_path.read_text())
    assert set(report) == {"adherence", "judged", "fid_in_domain", "fid_real_floor", "recon_psnr_db",
                           "classifier_accuracy", "classifier_accuracy_blurred", "settings"}
    assert report["adherence"]["shape"] >= 0.9 and report["adherence"]["color"] >= 0.9
    assert report["recon_psnr_db"] == pytest.approx(10 * np.log10(1 / 0.01 ** 2), rel=1e-3)
    assert report["classifier_accuracy"]["shape"] >= 0.95
    assert report["settings"]["num_prompts"] == 24 and report["settings"]["engine_name"] == "fake"
    assert [len(batch) for batch in calls] == [10, 10, 4]
    assert [r.seed for batch in calls for r in batch] == list(range(100, 124))
    assert {(r.sampler, r.steps, r.guidance_scale, r.eta) for batch in calls for r in batch} == {("ddim", 3, 5.0, 0.0)}
    assert (report["settings"]["sampler"], report["settings"]["steps"]) == ("ddim", 3)
    from PIL import Image
    assert Image.open(grid_path).size[0] > 8 * 128


@pytest.mark.parametrize("case", ["not_a_model", "missing_classifier", "zero_prompts", "unwritable_json"])
def test_bad_input_is_one_error_line_and_exit_2(case, stand_in_model, tmp_path, capsys):
    model, _ = stand_in_model
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    flags = {"--model": str(model), "--json": str(tmp_path / "eval.json")}
    extra = []
    if case == "not_a_model":
        flags["--model"] = str(tmp_path)
    elif case == "missing_classifier":
        extra = ["--classifier", str(tmp_path / "no-classifier")]
    elif case == "zero_prompts":
        extra = ["--num-prompts", "0"]
    else:
        flags["--json"] = str(blocker / "eval.json")
    assert main([item for pair in flags.items() for item in pair] + extra) == 2
    error = capsys.readouterr().err
    assert error.startswith("ldm-eval: error: ") and error.count("\n") == 1, error
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--seed", str(2**64)], f"--seed is {2**64}; expected an integer from 0 to {2**63 - 200}"),
    (["--seed", str(2**63 - 10), "--num-prompts", "24"], f"--seed is {2**63 - 10}; expected an integer from 0 to "
                                                         f"{2**63 - 24}"),
    (["--data-seed", str(2**64)], f"--data-seed is {2**64}; expected an integer from 0 to 2**32 - 1"),
    (["--seed", "-3"], "--seed is -3"),
    (["--sampler", "heun"], "argument --sampler: invalid choice: 'heun'"),
    (["--sampler", "lcm", "--eta", "0.5"], "--eta is 0.5 with --sampler lcm; expected 0 (eta applies to ddim and "
                                           "tcd only)"),
    (["--guidance", "1e308"], "--guidance is 1e+308; expected a number from 0 to 100"),
    (["--guidance", "100.5"], "--guidance is 100.5; expected a number from 0 to 100"),
    (["--guidance", "-1"], "--guidance is -1; expected a number from 0 to 100"),
])
def test_seeds_and_samplers_out_of_range_are_one_line_before_any_work(extra, message, stand_in_model, tmp_path,
                                                                     capsys, monkeypatch):
    model, calls = stand_in_model
    monkeypatch.setattr(ldm_tools.evaluate, "load_engine", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    assert main(["--model", str(model), "--json", str(tmp_path / "eval.json"), *extra]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"ldm-eval: error: {message}"), error
    assert error.count("\n") == 1 and not (tmp_path / "eval.json").exists() and calls == []


@needs_classifier
@pytest.mark.parametrize("sampler", [name for name in SAMPLER_NAMES if name != "ddim"])
def test_the_sampler_flag_reaches_every_request_and_the_report_names_it_beside_the_steps(sampler, stand_in_model,
                                                                                          tmp_path, capsys):
    model, calls = stand_in_model
    report_path = tmp_path / "eval.json"
    assert main(["--model", str(model), "--json", str(report_path), "--num-prompts", "6", "--data-seed", "7",
                 "--steps", "4", "--sampler", sampler]) == 0
    assert {(r.sampler, r.steps) for batch in calls for r in batch} == {(sampler, 4)}
    settings = json.loads(report_path.read_text())["settings"]
    assert (settings["sampler"], settings["steps"]) == (sampler, 4)
    assert list(settings).index("steps") == list(settings).index("sampler") + 1
    assert f"ldm-eval: {sampler}, 4 steps: adherence " in capsys.readouterr().err


@needs_classifier
def test_the_guidance_interval_reaches_every_request_and_the_report(stand_in_model, tmp_path):
    model, calls = stand_in_model
    report_path = tmp_path / "eval.json"
    assert main(["--model", str(model), "--json", str(report_path), "--num-prompts", "6", "--data-seed", "7",
                 "--guidance-interval", "0.5,8"]) == 0
    assert {r.guidance_interval for batch in calls for r in batch} == {(0.5, 8.0)}
    assert json.loads(report_path.read_text())["settings"]["guidance_interval"] == [0.5, 8.0]


@needs_classifier
def test_the_cache_settings_reach_every_request_and_the_report(stand_in_model, tmp_path):
    model, calls = stand_in_model
    report_path = tmp_path / "eval.json"
    assert main(["--model", str(model), "--json", str(report_path), "--num-prompts", "6", "--data-seed", "7",
                 "--cache-interval", "3", "--cache-schedule", "quadratic"]) == 0
    assert {(r.cache_interval, r.cache_schedule) for batch in calls for r in batch} == {(3, "quadratic")}
    settings = json.loads(report_path.read_text())["settings"]
    assert (settings["cache_interval"], settings["cache_schedule"]) == (3, "quadratic")


@pytest.mark.parametrize("extra, message", [
    (["--cache-interval", "0"], "--cache-interval is 0; expected a positive integer"),
    (["--cache-schedule", "cubic"], "argument --cache-schedule: invalid choice: 'cubic'"),
])
def test_bad_cache_settings_are_one_line_before_any_work(extra, message, stand_in_model, tmp_path, capsys,
                                                         monkeypatch):
    model, calls = stand_in_model
    monkeypatch.setattr(ldm_tools.evaluate, "load_engine", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    assert main(["--model", str(model), "--json", str(tmp_path / "eval.json"), *extra]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"ldm-eval: error: {message}") and error.count("\n") == 1, error


def test_importing_the_evaluator_does_not_import_torch():
    code = "import sys, ldm_tools.evaluate; sys.exit('torch' in sys.modules or 'ldm_train' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_ctrl_c_is_one_line_and_exit_130(stand_in_model, tmp_path, capsys, monkeypatch):
    from ldm_tools import eval_command

    def interrupted(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(ldm_tools.evaluate, "evaluate", interrupted)
    model, _ = stand_in_model
    argv = ["--model", str(model), "--json", str(tmp_path / "eval.json")]
    for command in (main, eval_command.main):
        try:
            code = command(argv)
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C left main as a KeyboardInterrupt (a traceback)")
        assert code == 130 and capsys.readouterr().err == "ldm-eval: interrupted\n"
    assert not (tmp_path / "eval.json").exists()
