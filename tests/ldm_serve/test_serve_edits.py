"""Image editing through ``ldm-serve``: ``init_image``, ``mask`` and ``strength`` on ``POST /v1/images`` (base64,
as the answers' images are), and ``POST /v1/images/edits`` in OpenAI's multipart shape against the official
``openai`` client (its mask's transparent pixels are repainted). Kept pixels come back exactly; both routes give
the same PNG for the same edit; every bad upload is a 4xx naming the field, the body limits admit two of the
largest uploads and no more."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import httpx
import numpy as np
import openai
import pytest
from openai.types import ImageEditCompletedEvent, ImageEditPartialImageEvent
from PIL import Image

from ldm_serve.errors import OPENAI_EDITS_PATH
from ldm_serve.request_schema import ServeLimits, base64_chars, body_limits, largest_upload_bytes
from tests.ldm_serve.gated_server import JSON, PROMPTS, Server, post

MAX_SIDE = 32  # the tiny engine's largest side (16 to 32, multiples of 4)
LIMITS = ServeLimits(max_size=MAX_SIDE, max_upload_bytes=largest_upload_bytes(MAX_SIDE))
MAX_UPLOAD = LIMITS.max_upload_bytes


@pytest.fixture(scope="module")
def server(engine_dir):
    running = Server(engine_dir, "--max-steps", "8", "--default-steps", "4").wait_ready()
    yield running
    running.stop()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def pixels_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def random_edit(rng: np.random.Generator, height: int = 16, width: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """An image (smooth, as a generated one is, plus noise) and a mask (255: repaint) of a random rectangle."""
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 // width, ys * 255 // height, np.full_like(xs, int(rng.integers(256)))], axis=-1)
    image = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
    mask[top:top + height // 2, left:left + width // 2] = 255
    return image, mask


def transparent_where(mask: np.ndarray) -> bytes:
    """OpenAI's mask of ``mask`` (255: repaint): an RGBA PNG, alpha 0 where to edit, 255 elsewhere."""
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(mask >= 128, 0, 255)
    return png(rgba)


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header states ``width`` x ``height`` and that holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


def client_for(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


# ---------------------------------------------------------------- POST /v1/images


def test_an_inpainting_request_keeps_every_unmasked_pixel_and_repaints_the_masked_ones(server, rng):
    image, mask = random_edit(rng, 20, 24)
    seed = int(rng.integers(0, 2**62))
    response = post(server.url, {"prompt": PROMPTS[1], "seed": seed, "steps": 4, "init_image": b64(png(image)),
                                 "mask": b64(png(mask)), "strength": 1.0})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["width"], answer["height"]) == (24, 20)
    edited = pixels_of(base64.b64decode(answer["images"][0]))
    kept = mask < 128
    assert np.array_equal(edited[kept], image[kept])
    assert not np.array_equal(edited[~kept], image[~kept])
    recorded = json.loads(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).text["parameters"])
    assert (recorded["strength"], recorded["masked"], recorded["width"]) == (1.0, True, 24)


def test_image_to_image_runs_the_last_steps_strength_names_and_the_same_seed_reproduces_it(server, rng):
    image, _ = random_edit(rng)
    seed = int(rng.integers(0, 2**62))
    answers, unet_calls = [], []
    for strength in (0.25, 0.75, 0.75):
        calls_before = server.metric("ldm_serve_unet_calls_total")
        answers.append(post(server.url, {"prompt": PROMPTS[2], "seed": seed, "steps": 8, "strength": strength,
                                         "init_image": b64(png(image))}))
        unet_calls.append(server.metric("ldm_serve_unet_calls_total") - calls_before)
    assert [answer.status_code for answer in answers] == [200] * 3, answers[0].text
    assert unet_calls == [2, 6, 6]  # int(8 * strength) steps, one UNet call each
    low, high, again = (answer.json()["images"][0] for answer in answers)
    assert high == again and low != high
    recorded = [json.loads(Image.open(io.BytesIO(base64.b64decode(one))).text["parameters"]) for one in (low, high)]
    assert [(one["strength"], one["masked"]) for one in recorded] == [(0.25, False), (0.75, False)]


def test_width_and_height_may_repeat_the_init_images_size(server, rng):
    image, _ = random_edit(rng, 16, 20)
    body = {"prompt": PROMPTS[0], "seed": 3, "steps": 2, "init_image": b64(png(image))}
    sized = post(server.url, {**body, "width": 20, "height": 16})
    unsized = post(server.url, body)
    assert sized.status_code == 200 and sized.json()["images"] == unsized.json()["images"], sized.text


def bad_uploads(rng: np.random.Generator) -> list[tuple[dict, int, str, str]]:
    image, mask = random_edit(rng)
    good = b64(png(image))
    return [
        ({"init_image": "not base64!"}, 422, "init_image", 'init_image is "not base64!", which is not base64'),
        ({"init_image": "QUJD"}, 422, "init_image", "init_image is not a PNG, JPEG or WebP image"),
        ({"init_image": ""}, 422, "init_image", "init_image is empty"),
        ({"init_image": b64(image.tobytes()[:300])}, 422, "init_image", "is not a PNG, JPEG or WebP image"),
        ({"init_image": b64(b"GIF89a" + bytes(40))}, 422, "init_image", "is not a PNG, JPEG or WebP image"),
        ({"init_image": b64(bomb_png(100_000, 100_000))}, 422, "init_image", "(a decompression bomb)"),
        ({"init_image": b64(bomb_png(40, 16))}, 422, "init_image",
         f"init_image is 40x16 pixels; expected at most {MAX_SIDE} pixels a side"),
        ({"init_image": b64(png(np.zeros((16, 18, 3), dtype=np.uint8)))}, 422, "init_image",
         "init_image is 18x16 pixels; expected sides"),
        ({"init_image": b64(png(image))[:-40]}, 422, "init_image", "init_image cannot be decoded"),
        ({"init_image": "A" * (base64_chars(MAX_UPLOAD) + 4)}, 422, "init_image",
         f"characters of base64; expected at most {base64_chars(MAX_UPLOAD)} (an image of at most {MAX_UPLOAD}"),
        ({"init_image": good, "mask": b64(png(mask[:, :12]))}, 422, "mask",
         "mask is 12x16 pixels; expected the init_image's size, 16x16"),
        ({"init_image": good, "mask": "%%"}, 422, "mask", "which is not base64"),
        ({"mask": b64(png(mask))}, 422, "mask", "mask is given without an init_image"),
        ({"strength": 0.5}, 422, "strength", "strength is given without an init_image"),
        ({"init_image": good, "strength": 1.5}, 422, "strength", "strength is 1.5; expected a number from 0 to 1"),
        ({"init_image": good, "strength": "0.5"}, 422, "strength", 'strength is "0.5"'),
        ({"init_image": good, "width": 24}, 422, "width", "width is 24 but the init_image is 16x16 pixels"),
        ({"init_image": 7}, 422, "init_image", "init_image is 7; expected a PNG, JPEG or WebP image"),
    ]


def test_every_bad_upload_on_v1_images_is_a_422_naming_the_field(server, rng):
    invalid_before = server.metric('ldm_serve_requests_total{outcome="invalid"}')
    cases = bad_uploads(rng)
    for fields, status, field, message in cases:
        response = post(server.url, {"prompt": PROMPTS[0], "steps": 2, **fields})
        assert response.status_code == status, (fields.keys(), response.text)
        error = response.json()["error"]
        assert error["field"] == field and message in error["message"], (message, error)
        assert "\n" not in error["message"] and "Traceback" not in response.text
    assert server.metric('ldm_serve_requests_total{outcome="invalid"}') == invalid_before + len(cases)
    assert post(server.url, {"prompt": PROMPTS[0], "steps": 2}).status_code == 200


def test_v1_images_admits_two_of_the_largest_uploads_in_base64_and_no_more(server):
    limit = body_limits(LIMITS)["/v1/images"]
    largest = "A" * base64_chars(MAX_UPLOAD)
    fits = json.dumps({"prompt": PROMPTS[0], "init_image": largest, "mask": largest}).encode()
    response = post(server.url, fits)
    assert response.status_code == 422 and response.json()["error"]["field"] == "init_image", response.text
    over = post(server.url, fits + b" " * (limit - len(fits) + 1))
    assert over.status_code == 413 and f"the body is over {limit} bytes" in over.json()["error"]["message"]


# ---------------------------------------------------------------- POST /v1/images/edits (OpenAI's shape)


def test_the_openai_client_edit_keeps_the_unmasked_pixels_and_matches_v1_images(server, rng):
    image, mask = random_edit(rng, 24, 20)
    seed = int(rng.integers(0, 2**62))
    answer = client_for(server).images.edit(
        image=("photo.png", png(image), "image/png"), mask=("mask.png", transparent_where(mask), "image/png"),
        prompt=PROMPTS[3], n=2, size="20x24", response_format="b64_json",
        extra_body={"seed": seed, "steps": 4, "strength": 0.9, "guidance_interval": [0.0, 5.0]})
    edited = [base64.b64decode(one.b64_json) for one in answer.data]
    kept = mask < 128
    for data in edited:
        pixels = pixels_of(data)
        assert pixels.shape == (24, 20, 3) and np.array_equal(pixels[kept], image[kept])
        assert not np.array_equal(pixels[~kept], image[~kept])
    assert [one.model_extra["seed"] for one in answer.data] == [seed, seed + 1] and answer.size == "20x24"
    ours = post(server.url, {"prompt": PROMPTS[3], "n": 2, "seed": seed, "steps": 4, "strength": 0.9,
                             "guidance_interval": [0.0, 5.0], "init_image": b64(png(image)), "mask": b64(png(mask))})
    assert ours.status_code == 200, ours.text
    assert edited == [base64.b64decode(one) for one in ours.json()["images"]]


def test_the_openai_client_edit_without_a_mask_redraws_the_image_at_strength(server, rng):
    image, _ = random_edit(rng)
    answer = client_for(server).images.edit(image=("photo.png", png(image), "image/png"), prompt=PROMPTS[0],
                                            extra_body={"seed": 5, "steps": 4, "strength": 0.5})
    ours = post(server.url, {"prompt": PROMPTS[0], "seed": 5, "steps": 4, "strength": 0.5,
                             "init_image": b64(png(image))})
    assert base64.b64decode(answer.data[0].b64_json) == base64.b64decode(ours.json()["images"][0])


def test_the_openai_clients_edit_stream_gets_partial_images_then_the_edited_images(server, rng):
    image, mask = random_edit(rng)
    stream = client_for(server).images.edit(
        image=("photo.png", png(image), "image/png"), mask=("mask.png", transparent_where(mask), "image/png"),
        prompt=PROMPTS[1], stream=True, partial_images=1, extra_body={"seed": 9, "steps": 6})
    events = list(stream)
    partial = [event for event in events if isinstance(event, ImageEditPartialImageEvent)]
    completed = [event for event in events if isinstance(event, ImageEditCompletedEvent)]
    assert events == partial + completed and len(partial) == 1 and len(completed) == 1, events
    assert completed[0].type == "image_edit.completed" and completed[0].size == "16x16"
    unstreamed = client_for(server).images.edit(
        image=("photo.png", png(image), "image/png"), mask=("mask.png", transparent_where(mask), "image/png"),
        prompt=PROMPTS[1], extra_body={"seed": 9, "steps": 6})
    assert completed[0].b64_json == unstreamed.data[0].b64_json


def bad_edits(rng: np.random.Generator) -> list[tuple[dict, str, str]]:
    image, mask = random_edit(rng)
    image_file = ("photo.png", png(image), "image/png")
    return [
        ({"image": ("a.png", b"not an image", "image/png")}, "image", "image is not a PNG, JPEG or WebP image"),
        ({"image": ("a.png", bomb_png(100_000, 100_000), "image/png")}, "image", "(a decompression bomb)"),
        ({"image": ("a.png", png(np.zeros((16, 18, 3), dtype=np.uint8)), "image/png")}, "image",
         "image is 18x16 pixels; expected sides that are multiples of 4 from 16 to 32"),
        ({"image": ("a.png", bomb_png(48, 16), "image/png")}, "image", "expected at most 32 pixels a side"),
        ({"image": [image_file, image_file]}, "image", "image is given more than once; expected one file"),
        ({"image": image_file, "mask": ("m.png", png(mask), "image/png")}, "mask",
         "mask is a PNG image without an alpha channel (mode L); expected a PNG whose fully transparent pixels"),
        ({"image": image_file, "mask": ("m.png", transparent_where(mask[:, :12]), "image/png")}, "mask",
         "mask is 12x16 pixels but the image is 16x16; expected a mask of the image's size"),
        ({"image": image_file, "size": "20x20"}, "size", 'size is "20x20" but the image is 16x16 pixels'),
        ({"image": image_file, "response_format": "url"}, "response_format", "cannot answer with a \"url\""),
        ({"image": image_file, "extra_body": {"strength": 2}}, "strength", "strength is 2; expected a number"),
        ({"image": image_file, "extra_body": {"seed": "abc"}}, "seed", 'seed is "abc"; expected an integer'),
        ({"image": image_file, "extra_body": {"steps": 9}}, "steps", "steps is 9; expected an integer from 1 to 8"),
        ({"image": image_file, "extra_body": {"guidance_interval": [2, 1]}}, "guidance_interval",
         "guidance_interval is [2, 1]; expected two noise levels"),
        ({"image": image_file, "partial_images": 2}, "partial_images", "partial_images is 2 but stream is false"),
        ({"image": image_file, "quality": "high"}, "quality", "quality is not a field of this request"),
    ]


def test_every_bad_edit_raises_the_clients_bad_request_error_naming_the_param(server, rng):
    for arguments, param, message in bad_edits(rng):
        with pytest.raises(openai.BadRequestError) as raised:
            client_for(server).images.edit(prompt=PROMPTS[0], **arguments)
        error = raised.value
        assert error.status_code == 400 and error.type == "invalid_request_error", error.body
        assert error.param == param and message in error.message, (message, error.body)
        assert "\n" not in error.message and "Traceback" not in str(error.body)


def test_the_edit_routes_refusals_outside_the_client_are_in_openais_shape(server, rng):
    image, _ = random_edit(rng)
    url = f"{server.url}{OPENAI_EDITS_PATH}"
    as_json = httpx.post(url, content=json.dumps({"prompt": "a"}), headers=JSON, timeout=60)
    assert as_json.status_code == 415 and as_json.json()["error"]["param"] == "content-type", as_json.text
    no_image = httpx.post(url, files={"prompt": (None, "a")}, timeout=60)
    assert no_image.status_code == 400 and no_image.json()["error"]["param"] == "image", no_image.text
    text_image = httpx.post(url, files={"prompt": (None, "a"), "image": (None, "abc")}, timeout=60)
    assert text_image.status_code == 400 and "image is a text field" in text_image.json()["error"]["message"]
    many = httpx.post(url, files=[("prompt", (None, "a"))] * 41 + [("image", ("a.png", png(image)))], timeout=60)
    assert many.status_code == 400 and many.json()["error"]["param"] == "body", many.text
    assert "Too many fields" in many.json()["error"]["message"]
    twice = httpx.post(url, files=[("prompt", (None, "a")), ("prompt", (None, "b")), ("image", ("a.png", png(image)))],
                       timeout=60)
    assert twice.status_code == 400 and "prompt is given 2 times" in twice.json()["error"]["message"], twice.text
    image_part = ("image", ("a.png", png(image)))
    cross_site = httpx.post(url, files=[("prompt", (None, "a")), image_part], timeout=60,
                            headers={"Origin": "https://elsewhere.example"})
    assert cross_site.status_code == 403 and cross_site.json()["error"]["param"] == "origin", cross_site.text
    own = httpx.post(url, files=[("prompt", (None, "a")), ("steps", (None, "2")), image_part], timeout=60,
                     headers={"Origin": server.url})
    assert own.status_code == 200, own.text
    long_prompt = httpx.post(url, files=[("prompt", (None, "x" * 6000)), image_part], timeout=60)
    assert long_prompt.status_code == 400 and long_prompt.json()["error"]["param"] == "body", long_prompt.text
    assert (f"a text field of the form is over {4 * LIMITS.max_prompt_chars + 1024} bytes; expected prompt and "
            f"negative_prompt of at most {LIMITS.max_prompt_chars} characters"
            ) in long_prompt.json()["error"]["message"]
    huge_number = httpx.post(url, files=[("prompt", (None, "a")), ("steps", (None, "1e1000000000000000000")),
                                         image_part], timeout=60)
    assert huge_number.status_code == 400 and huge_number.json()["error"]["param"] == "steps", huge_number.text
    assert "steps is 1e1000000000000000000; expected an integer" in huge_number.json()["error"]["message"]
    broken = httpx.post(url, content=b"--x\r\nnot a part", headers={"Content-Type": "multipart/form-data"},
                        timeout=60)
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "body", broken.text


def test_the_edit_route_admits_two_of_the_largest_uploads_and_no_more(server):
    limit = body_limits(LIMITS)[OPENAI_EDITS_PATH]
    largest = bytes(MAX_UPLOAD)
    fits = httpx.post(f"{server.url}{OPENAI_EDITS_PATH}", timeout=60,
                      files={"prompt": (None, "a" * LIMITS.max_prompt_chars), "image": ("a.png", largest),
                             "mask": ("m.png", largest)})
    assert fits.status_code == 400 and fits.json()["error"]["param"] == "image", fits.text
    assert "image is not a PNG" in fits.json()["error"]["message"]
    over_one = httpx.post(f"{server.url}{OPENAI_EDITS_PATH}", timeout=60,
                          files={"prompt": (None, "a"), "image": ("a.png", bytes(MAX_UPLOAD + 1))})
    assert over_one.status_code == 400 and f"expected a PNG, JPEG or WebP image of at most {MAX_UPLOAD} bytes" in (
        over_one.json()["error"]["message"]), over_one.text
    over = httpx.post(f"{server.url}{OPENAI_EDITS_PATH}", timeout=60,
                      files={"prompt": (None, "a"), "image": ("a.png", bytes(limit))})
    assert over.status_code == 413 and f"the body is over {limit} bytes" in over.json()["error"]["message"]
    assert over.json()["error"]["param"] == "body"


# ---------------------------------------------------------------- an inpainting model


def test_an_inpainting_model_is_served_its_edits_and_a_request_without_images_is_422(tmp_path, rng):
    import dataclasses

    from ldm_runtime.config import inpainting_channels
    from ldm_train.checkpoint import write_random_checkpoint
    from tests.ldm_export.tiny_checkpoint import TINY_CONFIG

    config = dataclasses.replace(TINY_CONFIG, unet=dataclasses.replace(
        TINY_CONFIG.unet, in_channels=inpainting_channels(TINY_CONFIG.autoencoder.latent_channels)))
    checkpoint = tmp_path / "inpaint"
    write_random_checkpoint(checkpoint, config, seed=int(rng.integers(0, 2**31)))
    running = Server(checkpoint, "--max-steps", "4", "--default-steps", "2").wait_ready()  # refused to start
    try:
        assert httpx.get(f"{running.url}/readyz", timeout=60).status_code == 200  # its warm-up repaints
        image, mask = random_edit(rng)
        edited = post(running.url, {"prompt": PROMPTS[0], "seed": 3, "init_image": b64(png(image)),
                                    "mask": b64(png(mask))})
        assert edited.status_code == 200, edited.text
        kept = pixels_of(base64.b64decode(edited.json()["images"][0]))[mask < 128]
        assert np.array_equal(kept, image[mask < 128])
        text_only = post(running.url, {"prompt": PROMPTS[0], "seed": 3})
        assert text_only.status_code == 422 and text_only.json()["error"]["field"] == "init_image", text_only.text
        assert "this is an inpainting model" in text_only.json()["error"]["message"]
    finally:
        running.stop()
