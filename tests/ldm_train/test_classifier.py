"""The shapes attribute classifier: its outputs, its training, its files, and the accuracy of the shipped one."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ldm_runtime.checkpoint import CheckpointError
from ldm_train.classifier import (
    CLASSIFIER_JSON, CLASSIFIER_TENSORS, LAYOUTS, ClassifierConfig, ShapesClassifier, attribute_agreement,
    classifier_loss, count_parameters, decode_predictions, gaussian_blur, heldout_accuracy, labels_to_targets,
    load_classifier, uint8_to_model_input,
)
from ldm_train.cli import main
from ldm_train.data.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, ShapesDataset

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "shapes-classifier"


def fresh_seed() -> int:
    """A data seed from numpy's global generator, which tests/conftest.py seeds per test (LDM_TEST_SEED)."""
    return int(np.random.randint(1, 100_000))


@pytest.mark.parametrize("image_size", [32, 48])
def test_classifier_outputs_have_the_documented_shapes(image_size):
    model = ShapesClassifier(ClassifierConfig(image_size=image_size)).eval()
    images = torch.rand(5, 3, image_size, image_size) * 2 - 1
    logits = model(images)
    slots = len(POSITIONS)
    assert logits["layout"].shape == (5, len(LAYOUTS))
    assert logits["background"].shape == (5, len(BACKGROUNDS))
    assert logits["shape"].shape == (5, slots, len(SHAPES))
    assert logits["color"].shape == (5, slots, len(COLORS))
    assert logits["size"].shape == (5, slots, len(SIZES))
    assert model.features(images).shape == (5, 128)
    assert count_parameters(model) < 500_000


def test_targets_decode_back_to_the_labels_they_came_from():
    dataset = ShapesDataset(40, seed=fresh_seed())
    labels = [dataset.labels(i) for i in range(len(dataset))]
    targets = labels_to_targets(labels)
    # Logits that put all the mass on each target class: the decoded labels must be the originals.
    logits = {
        "layout": torch.nn.functional.one_hot(targets["layout"], len(LAYOUTS)).float(),
        "background": torch.nn.functional.one_hot(targets["background"], len(BACKGROUNDS)).float(),
    }
    for name, classes in (("shape", len(SHAPES)), ("color", len(COLORS)), ("size", len(SIZES))):
        logits[name] = torch.nn.functional.one_hot(targets[name].clamp(min=0), classes).float()
    decoded = decode_predictions(logits)
    for predicted, truth in zip(decoded, labels):
        assert predicted.background == truth.background
        assert sorted(predicted.objects, key=lambda o: o.position) == sorted(truth.objects, key=lambda o: o.position)


def test_gaussian_blur_matches_pil_and_sigma_zero_is_the_identity(rng):
    dataset = ShapesDataset(3, seed=fresh_seed())
    pixels = dataset.images_uint8(range(3))
    sigma = float(rng.uniform(0.6, 1.2))
    blurred = gaussian_blur(uint8_to_model_input(pixels, 32), torch.tensor([0.0, sigma, sigma]))
    assert torch.equal(blurred[0], uint8_to_model_input(pixels[:1], 32)[0])
    ours = ((blurred[1] + 1) * 127.5).permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(pixels[1]).filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32)
    inner = (slice(3, -3), slice(3, -3))  # the borders are padded differently
    # PIL rounds to uint8 and truncates its kernel elsewhere: agreement within a fifth of what the blur changes.
    assert np.abs(ours - pil)[inner].mean() < 0.2 * np.abs(ours - pixels[1])[inner].mean()


def test_a_few_training_steps_reduce_the_loss():
    torch.manual_seed(fresh_seed())
    dataset = ShapesDataset(32, seed=fresh_seed())
    images = uint8_to_model_input(dataset.images_uint8(range(32)), 32)
    targets = labels_to_targets([dataset.labels(i) for i in range(32)])
    model = ShapesClassifier(ClassifierConfig(widths=(8, 16, 16, 32), feature_dim=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = classifier_loss(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_agreement_counts_a_pair_only_when_both_objects_agree():
    dataset = ShapesDataset(400, seed=fresh_seed())
    truth = next(dataset.labels(i) for i in range(400) if len(dataset.labels(i).objects) == 2)
    first, second = truth.objects
    other_color = next(c for c in COLORS if c not in (first.color, second.color))
    one_recoloured = type(truth)(truth.background, (first, type(second)(second.shape, other_color, second.size,
                                                                        second.position)))
    agreement = attribute_agreement(one_recoloured, truth)
    assert agreement["color"] is False and agreement["shape"] and agreement["position"] and agreement["count"]
    # The same two objects drawn at each other's places: positions agree, so the pairing is by position and
    # the colours (distinct within a pair) are bound to the wrong places.
    swapped = type(truth)(truth.background, (
        type(first)(second.shape, second.color, second.size, first.position),
        type(second)(first.shape, first.color, first.size, second.position)))
    assert attribute_agreement(swapped, truth)["color"] is False
    missing = type(truth)(truth.background, (first,))
    assert attribute_agreement(missing, truth) == {"shape": False, "color": False, "size": False, "position": False,
                                                   "background": True, "count": False}


def test_cli_trains_and_writes_a_loadable_classifier_dir(tmp_path):
    out = tmp_path / "classifier"
    assert main(["classifier", "--out", str(out), "--steps", "3", "--data", "shapes:48", "--batch-size", "16",
                 "--heldout-images", "16", "--seed", str(fresh_seed())]) == 0
    assert (out / CLASSIFIER_TENSORS).is_file()
    description = json.loads((out / CLASSIFIER_JSON).read_text())
    attributes = {"shape", "color", "size", "position", "background", "count", "all"}
    assert set(description["heldout_accuracy"]) == set(description["heldout_accuracy_blurred"]) == attributes
    assert description["vocabularies"]["shape"] == list(SHAPES)
    model, loaded = load_classifier(out)
    assert loaded == description
    assert not model.training
    assert sorted(p.name for p in out.iterdir()) == [CLASSIFIER_JSON, CLASSIFIER_TENSORS]  # no temp files left


def test_cli_rejects_data_without_labels_and_a_missing_dir_is_named(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert main(["classifier", "--out", str(tmp_path / "c"), "--data", str(tmp_path / "images"), "--steps", "1"]) == 2
    assert capsys.readouterr().err.startswith("ldm-train: error: ")
    assert main(["classifier", "--out", str(tmp_path / "c"), "--steps", "0"]) == 2
    with pytest.raises(CheckpointError, match="no classifier.json"):
        load_classifier(tmp_path / "nowhere")


@pytest.mark.skipif(not (SHIPPED / CLASSIFIER_JSON).is_file(), reason="models/shapes-classifier is not in this tree")
def test_shipped_classifier_reads_fresh_heldout_images_at_least_95_percent_right():
    model, description = load_classifier(SHIPPED)
    heldout = ShapesDataset.heldout(64, model.config.image_size, seed=fresh_seed())
    accuracy = heldout_accuracy(model, heldout)
    assert all(accuracy[name] >= 0.95 for name in ("shape", "color", "size", "position", "background", "count")), \
        accuracy
    assert description["heldout_accuracy"]["shape"] >= 0.95
