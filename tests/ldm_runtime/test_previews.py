"""The previews of images part-way through sampling (``ldm_runtime.previews``): the latent-to-RGB map fitted
against the decoder recovers a decoder that is linear per pixel, is scored by how much of the decoder's colours it
explains, gives way to the decoder itself where it explains little, and round-trips through the model folder's
``latent_preview.json``, a broken one refused in one sentence naming it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ldm_runtime.engines.base import EngineInfo
from ldm_runtime.errors import ConfigError
from ldm_runtime.previews import (PREVIEW_FILE, DecoderPreview, LatentPreview, fit_latent_preview,
                                  load_latent_preview, preview_for, save_latent_preview, unit_scale,
                                  write_fitted_preview)

FACTOR = 2
SCALE = 0.5


class PerPixelEngine:
    """An engine whose autoencoder works pixel by pixel on the latent grid: the encoder turns each ``FACTOR``-pooled
    RGB pixel into 4 latent channels (one of them a square, so that the channels are not a linear function of each
    other), and the decoder gives ``decode_pixel`` of each latent pixel, ``FACTOR`` x ``FACTOR`` times."""

    info = EngineInfo(name="per-pixel", latent_channels=4, latent_factor=FACTOR, latent_scale_factor=SCALE,
                      image_size=16, min_image_size=8, max_image_size=32, image_size_multiple=4, max_batch_size=8,
                      text_max_length=8, schedule={})

    def __init__(self, decode_pixel):
        self.decode_pixel = decode_pixel
        self.calls = []

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        self.calls.append(("encode", images.shape))
        batch, _, height, width = images.shape
        pooled = images.reshape(batch, 3, height // FACTOR, FACTOR, width // FACTOR, FACTOR).mean(axis=(3, 5))
        return np.concatenate([pooled, pooled[:, :1] ** 2], axis=1).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        self.calls.append(("decode", latents.shape))
        pixels = self.decode_pixel(latents.transpose(0, 2, 3, 1) * SCALE).transpose(0, 3, 1, 2)
        return np.repeat(np.repeat(pixels, FACTOR, axis=2), FACTOR, axis=3).astype(np.float32)

    def to_array(self, values, like=None):
        return np.asarray(values)

    def to_host(self, array):
        return np.asarray(array)


def linear_decoder(weights: np.ndarray):
    return lambda scaled: scaled @ weights[:-1] + weights[-1]


def test_the_fitted_map_recovers_a_decoder_that_is_linear_per_pixel_and_explains_all_of_it(rng):
    weights = rng.normal(0, 0.4, size=(5, 3))
    engine = PerPixelEngine(linear_decoder(weights))
    preview, score = fit_latent_preview(engine, count=6, seed=int(rng.integers(1000)))
    np.testing.assert_allclose(preview.weights, weights, atol=1e-4)
    assert score > 0.9999 and preview.factor == FACTOR
    assert all(shape[0] <= engine.info.max_images for _, shape in engine.calls)  # in batches the engine takes
    assert isinstance(preview_for(engine, None), LatentPreview)


def test_a_preview_is_the_maps_colours_block_by_block_and_latents_with_sigma_noise_come_to_unit_scale(rng):
    weights = rng.normal(0, 0.4, size=(5, 3)).astype(np.float32)
    preview = LatentPreview(weights=weights, factor=FACTOR)
    latents = rng.normal(0, 0.5, size=(1, 4, 3, 5)).astype(np.float32)
    pixels = preview.rgb(latents)
    assert pixels.shape == (6, 10, 3) and pixels.dtype == np.uint8
    expected = np.clip((latents[0].transpose(1, 2, 0) @ weights[:-1] + weights[-1] + 1) * 127.5, 0, 255)
    assert np.abs(pixels[::FACTOR, ::FACTOR].astype(np.float64) - expected).max() <= 0.5 + 1e-4
    assert (pixels[1::FACTOR, 1::FACTOR] == pixels[::FACTOR, ::FACTOR]).all()
    noisy = latents * 14.0  # x_0 + sigma * eps with sigma 14, as a sigma sampler's first latents are
    assert np.sqrt(np.mean(unit_scale(noisy) ** 2)) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(unit_scale(latents), latents)


def test_where_no_linear_map_explains_the_decoder_the_previews_are_the_decoders(rng):
    engine = PerPixelEngine(lambda scaled: np.sin(40.0 * scaled[..., :3] * scaled[..., 3:]))
    chosen = preview_for(engine, None)
    assert isinstance(chosen, DecoderPreview) and "R²" in chosen.source
    latents = [rng.normal(0, 1, size=(1, 4, 4, 4)).astype(np.float32) for _ in range(3)]
    images = chosen.images(engine, latents)
    decoded = engine.decode(np.concatenate([unit_scale(one) for one in latents]) / SCALE)
    for image, one in zip(images, decoded):
        expected = np.round(np.clip((one + 1) * 127.5, 0, 255)).astype(np.uint8).transpose(1, 2, 0)
        np.testing.assert_array_equal(image, expected)


def test_the_map_written_for_a_model_folder_is_the_fit_or_none_where_it_explains_too_little(tmp_path, rng):
    weights = rng.normal(0, 0.4, size=(5, 3))
    said = write_fitted_preview(PerPixelEngine(linear_decoder(weights)), tmp_path)
    assert said.startswith(f"wrote {PREVIEW_FILE} (") and "R² 1.00" in said, said
    np.testing.assert_allclose(load_latent_preview(tmp_path, 4, FACTOR).weights, weights, atol=1e-4)
    said = write_fitted_preview(PerPixelEngine(lambda scaled: np.sin(40.0 * scaled[..., :3] * scaled[..., 3:])),
                                tmp_path)  # the folder's decoder changed: the old map must not stay
    assert said.startswith(f"no {PREVIEW_FILE}: ") and said.endswith("previews decode"), said
    assert not (tmp_path / PREVIEW_FILE).exists()


def test_a_stored_map_is_taken_before_any_fit_and_round_trips(tmp_path, rng):
    weights = rng.normal(size=(5, 3)).astype(np.float32)
    path = save_latent_preview(tmp_path, LatentPreview(weights=weights, factor=FACTOR))
    assert path == tmp_path / PREVIEW_FILE
    loaded = load_latent_preview(tmp_path, 4, FACTOR)
    np.testing.assert_array_equal(loaded.weights, weights)
    engine = PerPixelEngine(linear_decoder(rng.normal(size=(5, 3))))
    assert preview_for(engine, loaded) is loaded and engine.calls == []
    assert load_latent_preview(tmp_path / "elsewhere", 4, FACTOR) is None


@pytest.mark.parametrize("content", [
    "{not json", json.dumps([1, 2]), json.dumps({"format": 1, "factor": FACTOR, "weights": [[0, 0, 0]] * 4}),
    json.dumps({"format": 1, "factor": 8, "weights": [[0, 0, 0]] * 5}),
    json.dumps({"format": 1, "factor": FACTOR, "weights": [[0, 0, "red"]] * 5}),
    json.dumps({"format": 1, "factor": FACTOR, "weights": [[0, 0, 1e400]] * 5}).replace("Infinity", "1e400"),
])
def test_a_broken_stored_map_is_refused_in_one_sentence_naming_the_file(tmp_path, content):
    (tmp_path / PREVIEW_FILE).write_text(content)
    with pytest.raises(ConfigError) as raised:
        load_latent_preview(tmp_path, 4, FACTOR)
    message = str(raised.value)
    assert str(tmp_path / PREVIEW_FILE) in message and "\n" not in message, message
