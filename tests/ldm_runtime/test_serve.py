"""``ldm-serve`` end to end: the real server started as a subprocess on a free loopback port, serving the tiny
engine dir (tests/export/tiny_checkpoint.py), exercised over HTTP with httpx: batch invariance of the images,
step-level joining, backpressure, disconnects, timeouts, SIGTERM drain, auth, metrics, and every bad input."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ldm_runtime.serve.process import ServeProcess
from tests.export.tiny_checkpoint import shared_tiny_engine

JSON = {"Content-Type": "application/json"}
PROMPTS = ["a red circle", "a blue square on the left", "two yellow stars", "a small green triangle"]


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory) -> Path:
    _, engine, code, output = shared_tiny_engine(tmp_path_factory, "fp32")
    assert code == 0, output
    return engine


@pytest.fixture
def rng() -> np.random.Generator:
    seed = np.random.SeedSequence().entropy % 2**32
    print(f"random seed {seed}")  # shown by pytest when the test fails
    return np.random.default_rng(seed)


class Server(ServeProcess):
    """``ldm-serve`` in a subprocess (``ldm_runtime.serve.process``); ``url`` once it listens, ``log`` its stderr
    so far."""


@pytest.fixture(scope="module")
def server(engine_dir):
    """Step-level batching of up to 4 images; long requests allowed (for the join and disconnect tests)."""
    running = Server(engine_dir, "--max-steps", "999", "--max-queue", "256").wait_ready()
    yield running
    running.stop()


def body(**fields) -> dict:
    return {"prompt": PROMPTS[0], "seed": 1, "steps": 4, **fields}


def post(url: str, payload, headers=JSON, timeout: float = 60) -> httpx.Response:
    content = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    return httpx.post(f"{url}/v1/images", content=content, headers=headers, timeout=timeout)


async def post_all(url: str, payloads: list[dict], headers=JSON) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(payloads) + 1)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(client.post(f"{url}/v1/images", content=json.dumps(payload), headers=headers)
                                      for payload in payloads))


def random_bodies(rng: np.random.Generator, count: int) -> list[dict]:
    """Requests that differ in everything a request can set, one shared batch's worth of variety."""
    bodies = []
    for index in range(count):
        bodies.append(body(
            prompt=PROMPTS[index % len(PROMPTS)], seed=int(rng.integers(0, 2**62)), steps=int(rng.integers(2, 9)),
            guidance_scale=float(rng.choice([1.0, 2.5, 5.0])), eta=float(rng.choice([0.0, 0.6])),
            negative_prompt=["", "blurry"][index % 2], n=int(rng.integers(1, 3)),
            **({"height": 20, "width": 24} if index % 5 == 4 else {})))
    return bodies


# ---------------------------------------------------------------- images


def test_png_answer_is_a_png_of_the_model_size_with_seed_and_timings(server):
    response = post(server.url, body(seed=7), headers={**JSON, "Accept": "image/png"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png" and response.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert response.headers["x-seed"] == "7" and "compute;dur=" in response.headers["server-timing"]
    image = np.asarray(Image.open(io.BytesIO(response.content)))
    assert image.shape == (16, 16, 3) and image.std() > 0


def test_json_answer_has_one_png_per_image_the_seeds_and_the_timings(server):
    response = post(server.url, body(seed=11, n=3))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["seeds"] == [11, 12, 13] and (answer["height"], answer["width"]) == (16, 16)
    images = [base64.b64decode(image) for image in answer["images"]]
    assert len(images) == 3 and len(set(images)) == 3 and all(image[:4] == b"\x89PNG" for image in images)
    assert set(answer["timings"]) == {"queue_ms", "compute_ms", "total_ms"}
    assert answer["timings"]["compute_ms"] > 0


def test_a_request_without_a_seed_gets_one_and_the_same_seed_reproduces_it(server):
    first = post(server.url, {"prompt": "a red circle", "steps": 3}).json()
    again = post(server.url, {"prompt": "a red circle", "steps": 3, "seed": first["seeds"][0]}).json()
    assert again["images"] == first["images"]


def test_concurrent_requests_give_the_same_bytes_as_each_request_alone(server, rng):
    """Batch invariance: 24 different requests at once (different steps, guidance, eta, negative prompts, n and
    sizes share UNet calls at different steps) answer exactly what each answers alone."""
    bodies = random_bodies(rng, 24)
    together = asyncio.run(post_all(server.url, bodies))
    assert [response.status_code for response in together] == [200] * len(bodies), together[0].text
    batch_sizes = server.metric("ldm_serve_batch_size_sum") / server.metric("ldm_serve_batch_size_count")
    assert batch_sizes > 1  # the UNet calls did hold several images
    for payload, response in zip(bodies, together):
        alone = post(server.url, payload)
        assert alone.json()["images"] == response.json()["images"], payload


def test_many_simultaneous_requests_all_succeed_and_the_server_stays_healthy(server, rng):
    bodies = [body(prompt=f"{PROMPTS[i % 4]} number {i}", seed=i, steps=2) for i in range(96)]
    responses = asyncio.run(post_all(server.url, bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    assert len({r.json()["images"][0] for r in responses}) == len(bodies)
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "alive"}
    assert "Traceback" not in server.log


def test_a_short_request_joins_the_running_batch_and_finishes_before_a_long_one_and_health_answers(server):
    async def run() -> tuple[float, float, httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            started = time.monotonic()
            long = asyncio.ensure_future(client.post(f"{server.url}/v1/images", headers=JSON,
                                                     content=json.dumps(body(steps=600))))
            await asyncio.sleep(0.3)
            health_started = time.monotonic()  # the event loop answers while the worker thread computes
            assert (await client.get(f"{server.url}/healthz")).status_code == 200
            assert time.monotonic() - health_started < 0.5
            short = await client.post(f"{server.url}/v1/images", headers=JSON, content=json.dumps(body(steps=3)))
            short_done = time.monotonic() - started
            assert not long.done()
            assert (await long).status_code == 200
            return short_done, time.monotonic() - started, short
    short_done, long_done, short = asyncio.run(run())
    assert short.status_code == 200 and short.json()["timings"]["queue_ms"] < 1000
    assert short_done < long_done


# ---------------------------------------------------------------- disconnects and timeouts


def test_a_disconnected_client_is_dropped_from_the_batch_and_frees_its_slot(server):
    steps_before = server.metric("ldm_serve_sample_steps_total")
    disconnected_before = server.metric('ldm_serve_requests_total{outcome="disconnected"}')
    with pytest.raises(httpx.ReadTimeout):
        post(server.url, body(steps=999, n=4), timeout=0.5)  # 4 images fill the batch for seconds
    deadline = time.monotonic() + 10
    while server.metric('ldm_serve_requests_total{outcome="disconnected"}') == disconnected_before:
        assert time.monotonic() < deadline, "the server never noticed the disconnect"
        time.sleep(0.05)
    while server.metric("ldm_serve_active_images") > 0:
        assert time.monotonic() < deadline, "the dropped request still holds its rows"
        time.sleep(0.05)
    steps_after = server.metric("ldm_serve_sample_steps_total")
    time.sleep(0.3)
    assert server.metric("ldm_serve_sample_steps_total") == steps_after  # nothing runs for the gone client
    assert steps_after - steps_before < 4 * 999
    assert post(server.url, body(n=4)).status_code == 200


# ---------------------------------------------------------------- backpressure, auth, timeouts


@pytest.fixture(scope="module")
def small_server(engine_dir):
    """No batching, two queue slots, an API key and a 4 s timeout: easy to fill."""
    running = Server(engine_dir, "--batching", "none", "--max-queue", "2", "--max-steps", "999",
                     "--request-timeout", "4", env={"LDM_SERVE_API_KEY": "sesame"}).wait_ready()
    yield running
    running.stop()


AUTH = {**JSON, "Authorization": "Bearer sesame"}


def test_a_full_queue_answers_429_with_retry_after_and_every_request_is_answered(small_server):
    responses = asyncio.run(post_all(small_server.url, [body(seed=i, steps=40) for i in range(10)], headers=AUTH))
    codes = [response.status_code for response in responses]
    assert set(codes) <= {200, 429} and codes.count(200) >= 3 and codes.count(429) >= 1, codes
    refused = next(response for response in responses if response.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "queue_full"
    assert small_server.metric('ldm_serve_requests_total{outcome="queue_full"}') == codes.count(429)


def test_a_request_past_its_timeout_gets_503_with_retry_after(small_server):
    response = post(small_server.url, body(steps=999, n=4), headers=AUTH)
    assert response.status_code == 503 and response.json()["error"]["type"] == "timeout"
    assert int(response.headers["retry-after"]) >= 1
    assert post(small_server.url, body(), headers=AUTH).status_code == 200


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "sesame", "Basic c2VzYW1l"])
def test_requests_without_the_right_api_key_get_401(small_server, authorization):
    headers = dict(JSON) if authorization is None else {**JSON, "Authorization": authorization}
    response = post(small_server.url, body(), headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["field"] == "authorization" and "sesame" not in response.text


def test_health_and_metrics_need_no_api_key(small_server):
    assert httpx.get(f"{small_server.url}/healthz").status_code == 200
    assert httpx.get(f"{small_server.url}/readyz").status_code == 200
    assert "ldm_serve_queue_depth" in httpx.get(f"{small_server.url}/metrics").text


# ---------------------------------------------------------------- drain


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(engine_dir):
    server = Server(engine_dir, "--max-steps", "999").wait_ready()
    results: list[httpx.Response] = []

    def send(seed: int) -> None:
        results.append(post(server.url, body(seed=seed, steps=300)))

    senders = [threading.Thread(target=send, args=(seed,)) for seed in range(3)]
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + 10
    while server.metric("ldm_serve_active_images") < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):  # the listening socket is closed
        httpx.post(f"{server.url}/v1/images", content=json.dumps(body()), headers=JSON, timeout=5)
    for sender in senders:
        sender.join(60)
    assert server.process.wait(30) == 0, server.log
    assert [response.status_code for response in results] == [200] * 3
    assert "drained and stopped" in server.log and "Traceback" not in server.log


# ---------------------------------------------------------------- bad input

BAD_BODIES = [
    ({"steps": 4}, 422, "prompt", "prompt is missing"),
    ({"prompt": 3}, 422, "prompt", "prompt is 3; expected a non-empty string"),
    ({"prompt": ""}, 422, "prompt", "expected a non-empty string"),
    ({"prompt": "   "}, 422, "prompt", "not only spaces"),
    ({"prompt": "x" * 1001}, 422, "prompt", "prompt has 1001 characters; expected at most 1000"),
    ({"prompt": "a", "negative_prompt": None}, 422, "negative_prompt", "negative_prompt is null"),
    ({"prompt": "a", "n": 0}, 422, "n", "n is 0; expected an integer from 1 to 4"),
    ({"prompt": "a", "n": 5}, 422, "n", "n is 5"),
    ({"prompt": "a", "n": True}, 422, "n", "n is true"),
    ({"prompt": "a", "steps": 0}, 422, "steps", "steps is 0; expected an integer from 1 to 999"),
    ({"prompt": "a", "steps": 1000}, 422, "steps", "steps is 1000"),
    ({"prompt": "a", "steps": 2.5}, 422, "steps", "steps is 2.5"),
    ({"prompt": "a", "steps": "5"}, 422, "steps", 'steps is "5"'),
    ({"prompt": "a", "guidance_scale": -1}, 422, "guidance_scale", "guidance_scale is -1"),
    ({"prompt": "a", "guidance_scale": 1e9}, 422, "guidance_scale", "expected a number from 0 to 100"),
    ({"prompt": "a", "guidance_scale": "5"}, 422, "guidance_scale", 'guidance_scale is "5"'),
    ({"prompt": "a", "eta": 1.5}, 422, "eta", "eta is 1.5; expected a number from 0 to 1"),
    ({"prompt": "a", "eta": [0]}, 422, "eta", "eta is [0]"),
    ({"prompt": "a", "seed": -1}, 422, "seed", "seed is -1"),
    ({"prompt": "a", "seed": 2**63}, 422, "seed", "seed is 9223372036854775808"),
    ({"prompt": "a", "seed": 2**63 - 1, "n": 2}, 422, "seed", "stay below 2**63"),
    ({"prompt": "a", "seed": 1.0}, 422, "seed", "seed is 1.0"),
    ({"prompt": "a", "height": 18}, 422, "height", "height is 18; expected a multiple of 4 from 16 to 32"),
    ({"prompt": "a", "width": 64}, 422, "width", "width is 64"),
    ({"prompt": "a", "width": "16"}, 422, "width", 'width is "16"'),
    ({"prompt": "a", "model": "/etc/passwd"}, 422, "model", "model is not a field of this request"),
    ({"prompt": "a", "engine": "torch"}, 422, "engine", "engine is not a field"),
    ([{"prompt": "a"}], 422, "body", "expected a JSON object"),
    ("a red circle", 422, "body", "expected a JSON object"),
    (b'{"prompt": "a",', 400, "body", "the body is not valid JSON"),
    (b'{"prompt": "a", "eta": NaN}', 400, "body", "NaN is not valid JSON"),
    (b"", 400, "body", "the body is not valid JSON"),
    (b'{"prompt": "\xff"}', 400, "body", "the body is not UTF-8"),
    (json.dumps({"prompt": "a" * 20000}).encode(), 413, "body", "the body is over 16384 bytes"),
]


@pytest.mark.parametrize("payload, status, field, message", BAD_BODIES,
                         ids=[f"{case[2]}-{index}" for index, case in enumerate(BAD_BODIES)])
def test_bad_input_gets_a_4xx_json_error_naming_the_field(server, engine_dir, payload, status, field, message):
    if isinstance(payload, str):
        payload = json.dumps(payload).encode()
    response = post(server.url, payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and message in error["message"], error
    assert "\n" not in error["message"] and "Traceback" not in response.text and str(engine_dir) not in response.text


def test_wrong_content_type_chunked_oversized_body_and_png_only_for_several_images(server):
    response = post(server.url, json.dumps(body()), headers={"Content-Type": "text/plain"})
    assert response.status_code == 415 and response.json()["error"]["field"] == "content-type"

    def chunks():  # no Content-Length: the limit is counted while the body streams in
        for _ in range(40):
            yield b" " * 1024
    response = httpx.post(f"{server.url}/v1/images", content=chunks(), headers=JSON, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["field"] == "body"

    response = post(server.url, body(n=2), headers={**JSON, "Accept": "image/png"})
    assert response.status_code == 406 and response.json()["error"]["field"] == "n"


def test_unknown_paths_and_methods_get_json_errors(server):
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["type"] == "http_error"
    response = httpx.get(f"{server.url}/v1/images")
    assert response.status_code == 405 and "error" in response.json()


def test_bad_input_never_stops_the_server_from_answering_good_requests(server):
    for payload, *_ in BAD_BODIES[:8]:
        post(server.url, payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    assert post(server.url, body()).status_code == 200
    assert server.process.poll() is None


# ---------------------------------------------------------------- schema, metrics, readiness


def test_openapi_schema_documents_every_field_with_its_limits(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    request = schema["paths"]["/v1/images"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    fields = request["properties"]
    assert set(fields) == {"prompt", "negative_prompt", "n", "steps", "guidance_scale", "eta", "seed", "height",
                           "width"}
    assert request["required"] == ["prompt"] and request["additionalProperties"] is False
    assert all(field.get("description") for field in fields.values())
    assert (fields["steps"]["minimum"], fields["steps"]["maximum"]) == (1, 999)
    assert fields["n"]["maximum"] == 4 and fields["prompt"]["maxLength"] == 1000
    assert fields["height"]["anyOf"][0]["multipleOf"] == 4
    assert {"422", "429", "503"} <= set(schema["paths"]["/v1/images"]["post"]["responses"])


def test_metrics_report_queue_batches_latency_steps_and_outcomes(server):
    steps_before = server.metric("ldm_serve_sample_steps_total")
    post(server.url, body())
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("ldm_serve_queue_depth", "ldm_serve_batch_size_bucket", "ldm_serve_request_latency_seconds_bucket",
                 "ldm_serve_sample_steps_total", 'ldm_serve_requests_total{outcome="ok"}',
                 'ldm_serve_requests_total{outcome="invalid"}'):
        assert name in text, name
    # steps per second is Prometheus's rate() of this counter: the request's own steps are in it
    assert server.metric("ldm_serve_sample_steps_total") - steps_before >= body()["steps"]
    assert server.metric('ldm_serve_requests_total{outcome="ok"}') >= 1


# ---------------------------------------------------------------- the text-encoding cache


class CountingTextEngine:
    def __init__(self, engine):
        self.engine, self.info, self.calls = engine, engine.info, []

    def encode_text(self, prompts):
        self.calls.append(list(prompts))
        return self.engine.encode_text(prompts)


def test_text_cache_gives_the_engine_rows_bit_for_bit_and_encodes_each_prompt_once(engine_dir, rng):
    from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
    from ldm_runtime.serve.text_cache import TextEncodingCache

    engine = OnnxRuntimeEngine(engine_dir, intra_op_threads=1, device="cpu")
    counting = CountingTextEngine(engine)
    cache = TextEncodingCache(counting, capacity=3)
    prompts = [f"{PROMPTS[i % 4]} {int(rng.integers(1000))}" for i in range(4)]
    for batch in ([prompts[0], ""], ["", prompts[1], prompts[0]], [prompts[2], prompts[3], prompts[2]]):
        context, mask = cache.encode_text(batch)
        expected_context, expected_mask = engine.encode_text(batch)
        assert np.array_equal(context, expected_context) and np.array_equal(mask, expected_mask)
    assert counting.calls == [[prompts[0], ""], [prompts[1]], [prompts[2], prompts[3]]]
    cache.encode_text([prompts[0]])  # among the 3 most recently used: still remembered
    assert len(counting.calls) == 3
    cache.encode_text([""])  # the least recently used: evicted
    assert counting.calls[-1] == [""]


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("flags, message", [
    (["--model", "{missing}"], "does not exist"),
    (["--model", "{engine}", "--max-batch", "99"], "--max-batch is 99; expected an integer from 1 to 4"),
    (["--model", "{engine}", "--port", "70000"], "--port is 70000; expected an integer from 0 to 65535"),
    (["--model", "{engine}", "--batching", "huge"], "invalid choice: 'huge'"),
    (["--model", "{engine}", "--api-key-file", "{missing}"], "cannot be read"),
])
def test_bad_flags_exit_2_with_one_line_and_no_traceback(engine_dir, tmp_path, flags, message):
    flags = [flag.format(missing=tmp_path / "missing", engine=engine_dir) for flag in flags]
    result = subprocess.run([sys.executable, "-m", "ldm_runtime.serve.cli", *flags], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr.startswith("ldm-serve: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
