"""``POST /v1/images/generations`` against the official ``openai`` client, unchanged, pointed at a loopback
``ldm-serve`` (``base_url``, ``api_key``): the images are those ``/v1/images`` makes for the same request and seed,
streamed or not (``stream=True``: partial images, then the completed images, as the client's own event types),
errors come back in OpenAI's error shape (so the client raises its own exception classes with ``param`` and
``code``, a cancelled stream too), and the route shares ``/v1/images``' limits, key, queue and metrics. As in
test_serve.py, the step gate and ``/metrics`` decide when work is queued, never a sleep."""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
import numpy as np
import openai
import pytest
from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent
from PIL import Image

from ldm_runtime.schedulers import SAMPLER_NAMES
from ldm_serve.request_schema import ServeLimits
from ldm_serve.server import API_KEY_ENV
from tests.ldm_serve.gated_server import JSON, PROMPTS, Server, post

API_KEY = "sesame"
ROUTE = "/v1/images/generations"


@pytest.fixture(scope="module")
def keyed_server(engine_dir):
    """An API key, a queue of one and no batching: the 429 test fills the queue with one held request."""
    running = Server(engine_dir, "--max-steps", "8", "--default-steps", "2", "--max-queue", "1",
                     "--batching", "none", env={API_KEY_ENV: API_KEY}).wait_ready()
    yield running
    running.stop()


def client_for(server: Server, api_key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=60)


def openai_post(server: Server, content: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}{ROUTE}", content=content, timeout=60,
                      headers={**JSON, "Authorization": f"Bearer {API_KEY}", **(headers or {})})


def assert_openai_error(error: dict, param: str | None, code: str, message: str) -> None:
    assert set(error) == {"message", "type", "param", "code"}, error
    assert (error["param"], error["code"]) == (param, code) and message in error["message"], error
    assert "\n" not in error["message"] and "Traceback" not in error["message"]


def test_the_openai_client_gets_the_pngs_v1_images_makes_for_the_same_request(keyed_server, rng):
    seed, sampler = int(rng.integers(0, 2**62)), str(rng.choice(SAMPLER_NAMES))
    ok_before = keyed_server.metric('ldm_serve_requests_total{outcome="ok"}')
    answer = client_for(keyed_server).images.generate(
        prompt=PROMPTS[1], n=2, size="24x16", response_format="b64_json", model="anything", user="tester",
        extra_body={"seed": seed, "steps": 3, "negative_prompt": "blurry", "guidance_scale": 2.5, "sampler": sampler})
    pngs = [base64.b64decode(image.b64_json) for image in answer.data]
    ours = post(keyed_server.url, {"prompt": PROMPTS[1], "n": 2, "width": 24, "height": 16, "seed": seed, "steps": 3,
                                   "negative_prompt": "blurry", "guidance_scale": 2.5, "sampler": sampler},
                headers={**JSON, "Authorization": f"Bearer {API_KEY}"})
    assert ours.status_code == 200, ours.text
    assert pngs == [base64.b64decode(image) for image in ours.json()["images"]]
    assert len(set(pngs)) == 2 and np.asarray(Image.open(io.BytesIO(pngs[0]))).shape == (16, 24, 3)  # "WxH"
    assert [image.model_extra["seed"] for image in answer.data] == [seed, seed + 1]
    assert json.loads(Image.open(io.BytesIO(pngs[0])).text["parameters"])["sampler"] == sampler
    assert answer.size == "24x16" and answer.output_format == "png" and answer.created > 0
    assert keyed_server.metric('ldm_serve_requests_total{outcome="ok"}') == ok_before + 2


def test_the_openai_client_passes_the_guidance_interval_and_cache_settings_as_extra_fields(keyed_server, rng):
    """guidance_interval, cache_interval and cache_schedule in ``extra_body``: the PNG /v1/images makes for the same
    request, recording them; an interval that holds no UNet call's noise level gives the unguided pixels."""
    seed = int(rng.integers(0, 2**62))
    extras = {"seed": seed, "steps": 3, "guidance_scale": 4.0, "guidance_interval": [1e5, 1e6], "cache_interval": 1,
              "cache_schedule": "quadratic"}
    answer = client_for(keyed_server).images.generate(prompt=PROMPTS[0], extra_body=extras)
    png = base64.b64decode(answer.data[0].b64_json)
    ours = post(keyed_server.url, {"prompt": PROMPTS[0], **extras},
                headers={**JSON, "Authorization": f"Bearer {API_KEY}", "Accept": "image/png"})
    assert ours.status_code == 200 and ours.content == png, ours.text
    recorded = json.loads(Image.open(io.BytesIO(png)).text["parameters"])
    assert (recorded["guidance_interval"], recorded["cache_interval"], recorded["cache_schedule"]) == (
        [1e5, 1e6], 1, "quadratic")
    unguided = client_for(keyed_server).images.generate(
        prompt=PROMPTS[0], extra_body={"seed": seed, "steps": 3, "guidance_scale": 1.0})
    guided = client_for(keyed_server).images.generate(
        prompt=PROMPTS[0], extra_body={"seed": seed, "steps": 3, "guidance_scale": 4.0})
    pixels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))))
              for result in (unguided, guided)]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels[0])
    assert not np.array_equal(pixels[0], pixels[1])


def test_the_openai_client_without_extras_gets_the_models_size_and_a_seed(keyed_server):
    answer = client_for(keyed_server).images.generate(prompt=PROMPTS[2])
    assert len(answer.data) == 1 and answer.size == "16x16"
    image = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json)))
    assert json.loads(image.text["parameters"])["seed"] == answer.data[0].model_extra["seed"]


@pytest.mark.parametrize("arguments, param, message", [
    ({"size": "18x18"}, "size",
     'size is "18x18"; expected "WxH" with each side a multiple of 4 from 16 to 32 (such as "16x16"), or null'),
    ({"size": "1024x1024"}, "size", 'size is "1024x1024"'),
    ({"response_format": "url"}, "response_format", "the server keeps no images, so it cannot answer with a \"url\""),
    ({"n": 5}, "n", "n is 5; expected an integer from 1 to 4"),
    ({"extra_body": {"steps": 9}}, "steps", "steps is 9; expected an integer from 1 to 8"),
    ({"extra_body": {"sampler": "heun"}}, "sampler", f'sampler is "heun"; expected one of {", ".join(SAMPLER_NAMES)}'),
    ({"extra_body": {"sampler": "lcm", "eta": 0.3}}, "eta", "eta is 0.3; expected 0 for the lcm sampler"),
    ({"extra_body": {"guidance_interval": [2, 1]}}, "guidance_interval",
     "guidance_interval is [2, 1]; expected two noise levels [low, high] with 0 <= low < high, or null"),
    ({"extra_body": {"guidance_interval": 1}}, "guidance_interval", "guidance_interval is 1; expected two noise"),
    ({"extra_body": {"cache_interval": 0}}, "cache_interval", "cache_interval is 0; expected "),
    ({"extra_body": {"cache_schedule": "cubic"}}, "cache_schedule",
     'cache_schedule is "cubic"; expected one of uniform, quadratic'),
    ({"quality": "hd"}, "quality", "quality is not a field of this request; expected some of prompt, n, size"),
    ({"partial_images": 2}, "partial_images", "partial_images is 2 but stream is false; expected stream: true for "
                                              "partial images, or partial_images 0"),
    ({"partial_images": 4, "stream": True}, "partial_images", "partial_images is 4; expected an integer from 0 to 3"),
])
def test_the_openai_client_raises_bad_request_naming_the_param(keyed_server, arguments, param, message):
    invalid_before = keyed_server.metric('ldm_serve_requests_total{outcome="invalid"}')
    with pytest.raises(openai.BadRequestError) as raised:
        client_for(keyed_server).images.generate(prompt=PROMPTS[0], **arguments)
    error = raised.value
    assert error.status_code == 400 and error.type == "invalid_request_error"
    assert (error.param, error.code) == (param, "invalid_request") and message in error.message, error.body
    assert keyed_server.metric('ldm_serve_requests_total{outcome="invalid"}') == invalid_before + 1


def test_the_openai_client_with_a_wrong_key_raises_authentication_error(keyed_server):
    with pytest.raises(openai.AuthenticationError) as raised:
        client_for(keyed_server, api_key="wrong").images.generate(prompt=PROMPTS[0])
    assert raised.value.status_code == 401 and raised.value.param == "authorization"
    assert API_KEY not in str(raised.value.body)


def test_a_full_queue_raises_rate_limit_error_with_retry_after(keyed_server):
    """One held request fills the queue of one; the client's next request gets 429 in OpenAI's shape."""
    answers: list[httpx.Response] = []
    with keyed_server.held():
        holder = threading.Thread(target=lambda: answers.append(openai_post(
            keyed_server, json.dumps({"prompt": PROMPTS[0], "seed": 1}).encode())))
        holder.start()
        keyed_server.wait_for("ldm_serve_queue_depth", lambda value: value == 1, "the first request never queued")
        with pytest.raises(openai.RateLimitError) as raised:
            client_for(keyed_server).images.generate(prompt=PROMPTS[0])
    holder.join(60)
    assert raised.value.code == "queue_full" and raised.value.type == "rate_limit_error"
    assert int(raised.value.response.headers["retry-after"]) >= 1
    assert [answer.status_code for answer in answers] == [200]


@pytest.mark.parametrize("content, headers, status, param, code, message", [
    (b'{"prompt": "a",', {}, 400, "body", "malformed_json", "the body is not valid JSON"),
    (b'{"prompt": "a", "n": 1e1000000000000000000}', {}, 400, "n", "invalid_request", "n is 1e1000000000000000000"),
    (b'{"prompt": "   "}', {}, 400, "prompt", "invalid_request", "not only spaces"),
    (b'{"prompt": "a", "size": "16X16"}', {}, 400, "size", "invalid_request", 'size is "16X16"'),
    (b'{"prompt": "a", "size": 16}', {}, 400, "size", "invalid_request", "size is 16; expected \"WxH\""),
    (b'{"prompt": "a"}', {"Content-Type": "text/plain"}, 415, "content-type", "unsupported_media_type",
     "content type"),
    (json.dumps({"prompt": "a" * 40000}).encode(), {}, 413, "body", "body_too_large", "the body is over"),
    (b'{"prompt": "a"}', {"Authorization": "Bearer nope"}, 401, "authorization", "unauthorized",
     "a wrong API key"),
])
def test_every_error_on_the_route_is_in_openais_shape(keyed_server, content, headers, status, param, code,
                                                      message):
    response = openai_post(keyed_server, content, headers)
    assert response.status_code == status, response.text
    assert_openai_error(response.json()["error"], param, code, message)


def test_the_longest_valid_body_is_not_refused_for_its_size(keyed_server):
    """Every string field at its longest, in astral characters that JSON encoders write as 12-byte escapes; n one
    over the limit, so that the answer names n (the body was read) and no image is made."""
    astral, longest = "\U0001F600", ServeLimits().max_prompt_chars
    content = json.dumps({"prompt": astral * longest, "negative_prompt": astral * longest, "n": 5,
                          "model": astral * 256, "user": astral * 256, "size": "16x16", "seed": 2**63 - 1}).encode()
    assert len(content) > 12 * 2 * (longest + 256)
    response = openai_post(keyed_server, content)
    assert response.status_code == 400, response.text
    assert_openai_error(response.json()["error"], "n", "invalid_request", "n is 5; expected an integer from 1 to 4")


def test_v1_images_keeps_its_own_error_shape_and_422(keyed_server):
    response = post(keyed_server.url, b'{"prompt": "a", "size": "16x16"}',
                    headers={**JSON, "Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "size"
    assert set(response.json()["error"]) == {"type", "field", "message"}
    wrong_method = httpx.get(f"{keyed_server.url}{ROUTE}", headers={"Authorization": f"Bearer {API_KEY}"})
    assert wrong_method.status_code == 405 and set(wrong_method.json()["error"]) == {"message", "type", "param",
                                                                                     "code"}


def test_the_schema_lists_exactly_the_sizes_and_formats_the_route_takes(keyed_server):
    schema = httpx.get(f"{keyed_server.url}/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    operation = schema["paths"][ROUTE]["post"]
    fields = operation["requestBody"]["content"]["application/json"]["schema"]["properties"]
    sizes = next(option["enum"] for option in fields["size"]["anyOf"] if "enum" in option)
    assert sorted(sizes) == sorted(f"{width}x{height}" for width in (16, 20, 24, 28, 32) for height in
                                   (16, 20, 24, 28, 32))
    formats = next(option for option in fields["response_format"]["anyOf"] if option.get("type") == "string")
    assert formats.get("enum", [formats.get("const")]) == ["b64_json"]
    assert fields["sampler"]["enum"] == list(SAMPLER_NAMES) and fields["steps"]["maximum"] == 8
    assert operation["security"] == [{"bearer": []}]
    error_schema = operation["responses"]["400"]["content"]["application/json"]["schema"]
    assert error_schema["properties"]["error"]["required"] == ["message", "type", "param", "code"]


def test_the_openai_clients_stream_gets_partial_images_then_the_images_v1_images_makes(keyed_server, rng):
    seed = int(rng.integers(0, 2**62))
    ok_before = keyed_server.metric('ldm_serve_requests_total{outcome="ok"}')
    stream = client_for(keyed_server).images.generate(prompt=PROMPTS[3], n=2, size="20x16", stream=True,
                                                      partial_images=2, extra_body={"seed": seed, "steps": 6})
    events = list(stream)
    assert stream.response.headers["content-type"].startswith("text/event-stream")
    partial = [event for event in events if isinstance(event, ImageGenPartialImageEvent)]
    completed = [event for event in events if isinstance(event, ImageGenCompletedEvent)]
    assert events == partial + completed, [event.type for event in events]
    assert [(event.model_extra["image_index"], event.partial_image_index) for event in partial] == [
        (0, 0), (1, 0), (0, 1), (1, 1)]
    for event in partial:
        preview = np.asarray(Image.open(io.BytesIO(base64.b64decode(event.b64_json))))
        assert preview.shape == (16, 20, 3) and event.size == "20x16" and event.output_format == "png"
    assert [event.model_extra["seed"] for event in completed] == [seed, seed + 1]
    assert all(event.type == "image_generation.completed" and event.size == "20x16" for event in completed)
    ours = post(keyed_server.url, {"prompt": PROMPTS[3], "n": 2, "width": 20, "height": 16, "seed": seed, "steps": 6},
                headers={**JSON, "Authorization": f"Bearer {API_KEY}"})
    assert [base64.b64decode(event.b64_json) for event in completed] == [
        base64.b64decode(image) for image in ours.json()["images"]]
    assert keyed_server.metric('ldm_serve_requests_total{outcome="ok"}') == ok_before + 2


def test_a_cancelled_openai_stream_ends_with_an_error_the_client_raises(keyed_server):
    cancelled_before = keyed_server.metric('ldm_serve_requests_total{outcome="cancelled"}')
    with keyed_server.held():
        stream = client_for(keyed_server).images.generate(prompt=PROMPTS[0], stream=True, extra_body={"steps": 8})
        keyed_server.wait_for("ldm_serve_queue_depth", lambda value: value == 1, "the request never queued")
        request_id = stream.response.headers["x-request-id"]
        cancelled = httpx.delete(f"{keyed_server.url}/v1/images/{request_id}",
                                 headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        assert cancelled.status_code == 200, cancelled.text
        with pytest.raises(openai.APIError) as raised:
            list(stream)
    assert raised.value.body["code"] == "cancelled" and request_id in raised.value.message
    keyed_server.wait_for("ldm_serve_queue_depth", lambda value: value == 0, "the cancelled request still queues")
    assert keyed_server.metric('ldm_serve_requests_total{outcome="cancelled"}') == cancelled_before + 1
