"""``ldm-serve`` end to end: the real server started as a subprocess on a free loopback port, serving the tiny
engine dir (tests/ldm_export/tiny_checkpoint.py), exercised over HTTP with httpx: batch invariance of the images,
step-level joining, backpressure, disconnects, timeouts, SIGTERM drain, auth, metrics, and every bad input.

No test depends on the machine's speed: where work must be queued, running or late, the test holds the server's
worker with its step gate (``LDM_SERVE_STEP_GATE``) and waits on ``/metrics`` for the state it needs."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from ldm_runtime.config import CACHE_SCHEDULES, DEFAULT_SAMPLER, DEFAULT_STEPS, OTHER_SAMPLER_STEPS
from ldm_runtime.schedulers import SAMPLER_NAMES
from ldm_serve.request_schema import ServeLimits, base64_chars, body_limits, largest_upload_bytes
from ldm_serve.server import API_KEY_ENV
from tests.ldm_serve.gated_server import JSON, PROMPTS, STATE_TIMEOUT_S, Server, body, post, post_all

# the tiny engine's sides go up to 32: /v1/images admits a request without images and two uploads of that size
IMAGES_BODY_LIMIT = body_limits(ServeLimits(max_size=32, max_upload_bytes=largest_upload_bytes(32)))["/v1/images"]


@pytest.fixture(scope="module")
def server(engine_dir):
    """Step-level batching of up to 4 images; long requests allowed (for the join and disconnect tests)."""
    running = Server(engine_dir, "--max-steps", "999", "--max-queue", "256").wait_ready()
    yield running
    running.stop()


def random_edit_fields(rng: np.random.Generator, height: int, width: int, masked: bool) -> dict:
    """An edit's fields: a random init image (base64 PNG), a strength from 0 to 1 (0: no step to run, 1: all of
    them) and, if ``masked``, a random mask (white: repaint)."""
    def b64_png(pixels: np.ndarray) -> str:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    fields = {"init_image": b64_png(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)),
              "strength": float(rng.choice([0.0, 0.3, 0.5, 0.8, 1.0]))}
    if masked:
        fields["mask"] = b64_png((rng.random((height, width)) < 0.5).astype(np.uint8) * 255)
    return fields


def random_bodies(rng: np.random.Generator, count: int, cache_intervals: tuple[int, ...] = (1,)) -> list[dict]:
    """Requests that differ in everything a request can set, one shared batch's worth of variety: text to image,
    image to image and inpainting (one request in three each)."""
    bodies = []
    for index in range(count):
        eta = float(rng.choice([0.0, 0.6]))
        interval = [None, [0.0, 1.0], [0.5, 5.0]][int(rng.integers(3))]  # None: the server's default (everywhere)
        height, width = (20, 24) if index % 5 == 4 else (16, 16)
        edit = random_edit_fields(rng, height, width, masked=index % 3 == 2) if index % 3 else {}
        steps = int(rng.integers(2, 9))
        if edit and 0 < edit["strength"] and int(steps * edit["strength"]) == 0:
            edit["strength"] = 0.5  # a strength that runs none of the steps is refused (0 asks for no step)
        bodies.append(body(
            prompt=PROMPTS[index % len(PROMPTS)], seed=int(rng.integers(0, 2**62)), steps=steps,
            guidance_scale=float(rng.choice([1.0, 2.5, 5.0])), eta=eta, negative_prompt=["", "blurry"][index % 2],
            n=int(rng.integers(1, 3)), **({"sampler": "ddim"} if eta else {}),  # eta is DDIM's
            **({"guidance_interval": interval} if interval else {}), cache_schedule=str(rng.choice(CACHE_SCHEDULES)),
            cache_interval=int(rng.choice(cache_intervals)),
            **({"height": 20, "width": 24} if index % 5 == 4 else {}), **edit))
    return bodies


# ---------------------------------------------------------------- images


def test_the_worker_warms_up_every_batch_bucket_before_it_is_ready():
    # Engines compile or prepare each power-of-two batch bucket on its first call (openvino's SD-sized graphs take
    # seconds there), so the warm-up makes one call of each before the server says it is ready.
    from ldm_serve.batcher import Batcher, BatcherConfig, warm_up_batch_sizes

    calls = []

    class RecordingPipeline:
        def generate(self, requests, batch_size=None):
            calls.append((len(requests), batch_size, len({request.seed for request in requests})))
            return []

    Batcher(pipeline=RecordingPipeline(), config=BatcherConfig(max_batch=8))._warm_up()
    assert calls == [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)]
    assert warm_up_batch_sizes(6) == [1, 2, 4, 6] and warm_up_batch_sizes(1) == [1]


def test_an_engine_that_fails_its_warm_up_is_not_ready_and_takes_no_request():
    from ldm_serve.batcher import Batcher, BatcherConfig, Job, NotAccepting
    from ldm_serve.routes import readiness

    class FailingPipeline:
        def generate(self, requests, batch_size=None):
            raise RuntimeError("Wrong value for property key INFERENCE_NUM_THREADS")

    warmed_up = threading.Event()  # the worker prepares the previews right after its warm-up: a hook to wait on
    batcher = Batcher(pipeline=FailingPipeline(), config=BatcherConfig(max_batch=2), make_previewer=warmed_up.set)
    batcher.start()
    try:
        assert warmed_up.wait(STATE_TIMEOUT_S), "the worker never finished its warm-up"
        problem = readiness(batcher)
        assert problem is not None and problem.status == 503 and problem.type == "engine_failed"
        assert "RuntimeError: Wrong value for property key INFERENCE_NUM_THREADS" in problem.message
        with pytest.raises(NotAccepting) as refused:
            batcher.submit(Job.__new__(Job))
        assert refused.value.reason == "engine_failed"
    finally:
        batcher.stop()


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
    """Batch invariance: 24 different requests at once (text to image, image to image and inpainting; different
    steps, strengths, guidance, guidance intervals, feature caching where the engine has it, eta, negative prompts,
    n and sizes share UNet calls at different steps) answer exactly what each answers alone."""
    bodies = random_bodies(rng, 24, (1, 2, 3) if max_cache_interval(server) >= 3 else (1,))

    async def send_all_while_held() -> list[httpx.Response]:
        with server.held():
            sending = asyncio.ensure_future(post_all(server.url, bodies))
            # every request is in the server before any step runs, so the batch is as full as it can be
            await asyncio.to_thread(server.wait_for, "ldm_serve_requests_in_flight", lambda value: value == 24,
                                    "the 24 requests never all arrived")
            rows_before = server.metric("ldm_serve_batch_size_sum")
            calls_before = server.metric("ldm_serve_batch_size_count")
        responses = await sending
        return responses, (server.metric("ldm_serve_batch_size_sum") - rows_before) / (
            server.metric("ldm_serve_batch_size_count") - calls_before)

    together, mean_rows = asyncio.run(send_all_while_held())
    assert [response.status_code for response in together] == [200] * len(bodies), together[0].text
    assert mean_rows > 1  # the UNet calls did hold several images
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
    async def run() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            with server.held():
                long = asyncio.ensure_future(client.post(f"{server.url}/v1/images", headers=JSON,
                                                         content=json.dumps(body(steps=50))))
                await asyncio.to_thread(server.wait_for, "ldm_serve_queue_depth", lambda value: value == 1,
                                        "the long request never queued")
                server.hold(more_calls=1)  # the long request starts and takes one step alone
                await asyncio.to_thread(server.wait_for, "ldm_serve_sample_steps_total", lambda value: value >= 1,
                                        "the long request never took its first step")
                assert (await client.get(f"{server.url}/healthz")).status_code == 200  # answered while it runs
                short = asyncio.ensure_future(client.post(f"{server.url}/v1/images", headers=JSON,
                                                          content=json.dumps(body(steps=3))))
                await asyncio.to_thread(server.wait_for, "ldm_serve_queue_depth", lambda value: value == 1,
                                        "the short request never queued")
                server.hold(more_calls=3)  # the short request joins and takes its 3 steps beside the long one
                short_response = await short
                assert short_response.status_code == 200, short_response.text
                assert not long.done()  # held after 4 of its 50 steps
                assert server.metric("ldm_serve_active_images") == 1
            long_response = await long
            assert long_response.status_code == 200
            assert short_response.json()["timings"]["compute_ms"] < long_response.json()["timings"]["compute_ms"]
    asyncio.run(run())


def test_requests_with_different_samplers_and_steps_share_one_unet_call_and_each_image_is_its_own(server, rng):
    """A ddim request and one of each other sampler (as many as a UNet call holds), with different step counts,
    held until all are queued: the next UNet call holds every one of them, and each image is what that request gives
    alone, which for the other samplers is not the ddim image of the same request."""
    max_batch = httpx.get(f"{server.url}/readyz").json()["max_batch"]
    names = ["ddim", *[name for name in SAMPLER_NAMES if name != "ddim"]][:max_batch]
    assert len(names) >= 2
    bodies = [body(prompt=PROMPTS[index % len(PROMPTS)], seed=int(rng.integers(0, 2**62)), sampler=name,
                   steps=int(rng.integers(2, 7))) for index, name in enumerate(names)]

    together, first_call_rows, _, _ = server.send_held(bodies)
    assert [response.status_code for response in together] == [200] * len(bodies), together[0].text
    assert first_call_rows == len(bodies)  # one UNet call served every sampler
    for payload, response in zip(bodies, together):
        png = base64.b64decode(response.json()["images"][0])
        assert json.loads(Image.open(io.BytesIO(png)).text["parameters"])["sampler"] == payload["sampler"]
        assert post(server.url, payload).json()["images"] == response.json()["images"], payload
        if payload["sampler"] != "ddim":
            as_ddim = post(server.url, {**payload, "sampler": "ddim"}).json()["images"]
            assert as_ddim != response.json()["images"], payload


def test_text_to_image_image_to_image_and_inpainting_share_each_unet_call_and_each_image_is_its_own(server, rng):
    """Text to image (4 steps), image to image at strength 0.5 (its last 2 steps) and inpainting at strength 1 (4
    steps), held until all are queued: 4 UNet calls serve them all, the first holding all three (each at its own
    timestep), and each image is what that request gives alone."""
    seeds = [int(seed) for seed in rng.integers(0, 2**62, 3)]
    bodies = [body(prompt=PROMPTS[0], seed=seeds[0], steps=4),
              body(prompt=PROMPTS[1], seed=seeds[1], steps=4, **{**random_edit_fields(rng, 16, 16, masked=False),
                                                                 "strength": 0.5}),
              body(prompt=PROMPTS[2], seed=seeds[2], steps=4, **{**random_edit_fields(rng, 16, 16, masked=True),
                                                                 "strength": 1.0})]

    together, first_call_rows, unet_calls, rows = server.send_held(bodies)
    assert [response.status_code for response in together] == [200] * len(bodies), together[0].text
    assert (first_call_rows, unet_calls, rows) == (3, 4, 4 + 2 + 4)  # alone, they would take 10 calls
    for payload, response in zip(bodies, together):
        assert post(server.url, payload).json()["images"] == response.json()["images"], payload.keys()


def test_a_request_naming_another_sampler_and_no_steps_gets_that_samplers_default_steps(server, rng):
    """The server's default steps are its default sampler's; ddim without steps gets OTHER_SAMPLER_STEPS (at most
    --max-steps), as ldm-sample does, and the PNG records the steps it was sampled with."""
    seed = int(rng.integers(0, 2**62))
    unnamed = {key: value for key, value in body(seed=seed, sampler="ddim").items() if key != "steps"}
    answer = post(server.url, unnamed)
    assert answer.status_code == 200, answer.text
    png = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    assert json.loads(png.text["parameters"])["steps"] == OTHER_SAMPLER_STEPS
    assert post(server.url, {**unnamed, "steps": OTHER_SAMPLER_STEPS}).json()["images"] == answer.json()["images"]
    plain = {key: value for key, value in body(seed=seed).items() if key not in ("steps", "sampler")}
    png = Image.open(io.BytesIO(base64.b64decode(post(server.url, plain).json()["images"][0])))
    assert (json.loads(png.text["parameters"])["sampler"], json.loads(png.text["parameters"])["steps"]) == (
        DEFAULT_SAMPLER, DEFAULT_STEPS)


def parameters_of(response: httpx.Response, index: int = 0) -> dict:
    """The settings the server recorded in image ``index``'s PNG text chunk."""
    png = base64.b64decode(response.json()["images"][index])
    return json.loads(Image.open(io.BytesIO(png)).text["parameters"])


def max_cache_interval(running: Server) -> int:
    """The largest cache_interval the server's schema allows: 1 where its engine cannot cache the UNet's features."""
    schema = httpx.get(f"{running.url}/openapi.json", headers=running.auth).json()
    request = schema["paths"]["/v1/images"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return request["properties"]["cache_interval"]["maximum"]


def pixels_of(response: httpx.Response, index: int = 0) -> np.ndarray:
    """Image ``index``'s pixels (the PNG bytes also hold its settings, which differ between the requests compared)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][index]))))


def test_a_guidance_interval_reaches_the_sampler_and_the_png_records_it(server, rng):
    """An interval that holds no UNet call's noise level is guidance off: the image of guidance scale 1; one that
    holds every call is the image without an interval; the PNG records each as sent (and null for none)."""
    request = body(seed=int(rng.integers(0, 2**62)), steps=4, guidance_scale=5.0)
    guided, unguided = post(server.url, request), post(server.url, {**request, "guidance_scale": 1.0})
    nowhere = post(server.url, {**request, "guidance_interval": [1e5, 1e6]})
    everywhere = post(server.url, {**request, "guidance_interval": [0, 1e6]})
    assert [answer.status_code for answer in (guided, unguided, nowhere, everywhere)] == [200] * 4, nowhere.text
    assert not np.array_equal(pixels_of(guided), pixels_of(unguided))
    assert np.array_equal(pixels_of(nowhere), pixels_of(unguided))
    assert np.array_equal(pixels_of(everywhere), pixels_of(guided))
    assert parameters_of(nowhere)["guidance_interval"] == [1e5, 1e6]
    assert parameters_of(everywhere)["guidance_interval"] == [0, 1e6]
    assert parameters_of(guided)["guidance_interval"] is None  # the server's default: every call
    assert post(server.url, {**request, "guidance_interval": None}).json()["images"] == guided.json()["images"]


def test_cache_interval_1_and_either_cache_schedule_are_taken_and_recorded(server, rng):
    """Interval 1 runs the whole UNet at every step whatever the schedule: the image of a request naming neither."""
    request = body(seed=int(rng.integers(0, 2**62)), steps=3)
    plain = post(server.url, request)
    assert parameters_of(plain)["cache_interval"] == 1 and parameters_of(plain)["cache_schedule"] == "uniform"
    for schedule in CACHE_SCHEDULES:
        named = post(server.url, {**request, "cache_interval": 1, "cache_schedule": schedule})
        assert named.status_code == 200, named.text
        assert np.array_equal(pixels_of(named), pixels_of(plain))
        assert (parameters_of(named)["cache_interval"], parameters_of(named)["cache_schedule"]) == (1, schedule)


def test_a_cache_interval_above_1_is_refused_naming_it_where_the_engine_cannot_cache(engine_dir_without_deep_cache,
                                                                                      tmp_path):
    """An engine dir without the shallow UNet graph: the schema allows cache_interval 1 only, a request for 2 gets a
    4xx naming cache_interval on both routes (and 1 is served), and --cache-interval 2 is one line, exit 2."""
    running = Server(engine_dir_without_deep_cache, "--max-steps", "8").wait_ready()
    try:
        assert max_cache_interval(running) == 1
        refused = post(running.url, body(cache_interval=2))
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"] == {"type": "invalid_request", "field": "cache_interval",
                                           "message": f"cache_interval is 2; {CACHE_ONLY_1}"}
        openai = httpx.post(f"{running.url}/v1/images/generations", headers=JSON, timeout=60,
                            content=json.dumps({"prompt": "a red circle", "cache_interval": 2}))
        assert openai.status_code == 400 and openai.json()["error"]["param"] == "cache_interval", openai.text
        assert post(running.url, body(cache_interval=1)).status_code == 200
    finally:
        running.stop()
    result = subprocess.run([sys.executable, "-m", "ldm_serve.cli", "--model", str(engine_dir_without_deep_cache),
                             "--cache-interval", "2"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("ldm-serve: error: ")]
    assert result.returncode == 2 and len(errors) == 1 and result.stderr.endswith(errors[0] + "\n"), result.stderr
    assert errors[0].startswith("ldm-serve: error: --cache-interval 2 cannot serve a request that names no "
                                "cache_interval: cache_interval is 2; the "), result.stderr
    assert "engine cannot cache the UNet's features across steps" in errors[0] and "Traceback" not in result.stderr


def check_cache_interval_2_is_batch_invariant_and_recorded(running: Server) -> None:
    """cache_interval 2 requests (each schedule) held until they and two others are all queued, so that they share
    UNet calls: each image is what its request gives alone, differs from the whole UNet's at every step, and its PNG
    records the interval and the schedule."""
    cached = [body(prompt=PROMPTS[index], seed=index, steps=6, cache_interval=2, cache_schedule=schedule)
              for index, schedule in enumerate(CACHE_SCHEDULES)]
    payloads = cached + [body(prompt=PROMPTS[2], seed=5, steps=5),
                         body(prompt=PROMPTS[3], seed=6, steps=4, cache_interval=3, guidance_interval=[0, 1])]

    async def send_together() -> list[httpx.Response]:
        with running.held():
            sending = asyncio.ensure_future(post_all(running.url, payloads))
            await asyncio.to_thread(running.wait_for, "ldm_serve_queue_depth", lambda value: value == len(payloads),
                                    "the requests never all queued")
        return await sending

    together = asyncio.run(send_together())
    assert [answer.status_code for answer in together] == [200] * len(payloads), together[0].text
    for payload, answer in zip(payloads, together):
        assert post(running.url, payload).json()["images"] == answer.json()["images"], payload
    for payload, answer in zip(cached, together):
        assert (parameters_of(answer)["cache_interval"], parameters_of(answer)["cache_schedule"]) == (
            2, payload["cache_schedule"])
        whole = post(running.url, {**payload, "cache_interval": 1})
        assert whole.status_code == 200 and not np.array_equal(pixels_of(whole), pixels_of(answer)), payload


def test_cache_interval_2_on_the_engine_dir_is_batch_invariant_and_recorded(server):
    if max_cache_interval(server) == 1:
        pytest.skip("the engine dir has no shallow UNet graph: its engine cannot cache the UNet's features")
    check_cache_interval_2_is_batch_invariant_and_recorded(server)


def test_cache_interval_2_on_the_torch_engine_is_batch_invariant_and_recorded(tiny_checkpoint):
    from ldm_runtime.engines import load_engine

    if not getattr(load_engine(tiny_checkpoint, engine="torch", device="cpu"), "deep_cache", False):
        pytest.skip("the torch engine cannot cache the UNet's features across steps (it has no deep_cache)")
    running = Server(tiny_checkpoint, "--engine", "torch", "--device", "cpu", "--max-steps", "8").wait_ready()
    try:
        assert max_cache_interval(running) > 1
        check_cache_interval_2_is_batch_invariant_and_recorded(running)
    finally:
        running.stop()


def test_the_servers_guidance_interval_and_cache_flags_are_what_a_request_naming_none_gets(engine_dir, rng):
    """--guidance-interval, --cache-interval and --cache-schedule are the settings of a request that names none (or
    null for the interval): the schema's defaults, the serving line and the PNG say them, and an interval that
    holds no UNet call's noise level gives the unguided image."""
    running = Server(engine_dir, "--guidance-interval", "100000,1000000", "--cache-interval", "1",
                     "--cache-schedule", "quadratic").wait_ready()
    try:
        schema = httpx.get(f"{running.url}/openapi.json").json()
        fields = schema["paths"]["/v1/images"]["post"]["requestBody"]["content"]["application/json"]["schema"][
            "properties"]
        assert fields["guidance_interval"]["default"] == [1e5, 1e6]
        assert (fields["cache_interval"]["default"], fields["cache_schedule"]["default"]) == (1, "quadratic")
        assert "guided in (100000, 1e+06]" in running.log
        request = body(seed=int(rng.integers(0, 2**62)), steps=3, guidance_scale=5.0)
        plain = post(running.url, request)
        assert plain.status_code == 200, plain.text
        recorded = parameters_of(plain)
        assert (recorded["guidance_interval"], recorded["cache_interval"], recorded["cache_schedule"]) == (
            [1e5, 1e6], 1, "quadratic")
        assert np.array_equal(pixels_of(post(running.url, {**request, "guidance_scale": 1.0})), pixels_of(plain))
        assert post(running.url, {**request, "guidance_interval": None}).json()["images"] == plain.json()["images"]
        everywhere = post(running.url, {**request, "guidance_interval": [0, 1e6]})
        assert parameters_of(everywhere)["guidance_interval"] == [0, 1e6]
        assert not np.array_equal(pixels_of(everywhere), pixels_of(plain))
    finally:
        running.stop()


def test_a_model_naming_guidance_1_is_served_unguided_unless_a_request_names_a_scale(tmp_path, rng):
    """A model distilled with its guidance in it (ldm-train lcm's model.json: default_sampler.guidance_scale 1) is
    what a request naming no guidance_scale gets: the schema's default, the serving line and the PNG say it."""
    import dataclasses

    from ldm_runtime.config import SamplerDefaults
    from ldm_train.checkpoint import write_random_checkpoint
    from tests.ldm_export.tiny_checkpoint import TINY_CONFIG

    folder = tmp_path / "distilled"
    write_random_checkpoint(folder, dataclasses.replace(TINY_CONFIG, default_sampler=SamplerDefaults(
        name="lcm", steps=2, guidance_scale=1.0)))
    running = Server(folder, "--engine", "torch", "--device", "cpu", "--max-steps", "8").wait_ready()
    try:
        schema = httpx.get(f"{running.url}/openapi.json").json()
        fields = schema["paths"]["/v1/images"]["post"]["requestBody"]["content"]["application/json"]["schema"][
            "properties"]
        assert fields["guidance_scale"]["default"] == 1.0 and " guidance 1" in running.log
        request = body(seed=int(rng.integers(0, 2**62)))
        unnamed = post(running.url, request)
        assert unnamed.status_code == 200, unnamed.text
        assert (parameters_of(unnamed)["guidance_scale"], parameters_of(unnamed)["sampler"]) == (1.0, "lcm")
        assert post(running.url, {**request, "guidance_scale": 1.0}).json()["images"] == unnamed.json()["images"]
        guided = post(running.url, {**request, "guidance_scale": 4.0})
        assert parameters_of(guided)["guidance_scale"] == 4.0
        assert not np.array_equal(pixels_of(guided), pixels_of(unnamed))
    finally:
        running.stop()


# ---------------------------------------------------------------- disconnects and timeouts


def raw_request(url: str, payload: dict) -> socket.socket:
    """Send one POST /v1/images on a socket of its own and return the open socket (closing it is a disconnect)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    content = json.dumps(payload).encode()
    connection = socket.create_connection((host, int(port)), timeout=30)
    connection.sendall(b"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       + f"Content-Length: {len(content)}\r\n\r\n".encode() + content)
    return connection


def test_a_disconnected_client_is_dropped_from_the_batch_and_frees_its_slot(server):
    steps_before = server.metric("ldm_serve_sample_steps_total")
    disconnected_before = server.metric('ldm_serve_requests_total{outcome="disconnected"}')
    with server.held():
        connection = raw_request(server.url, body(steps=999, n=4))
        server.wait_for("ldm_serve_queue_depth", lambda value: value == 1, "the request never queued")
        server.hold(more_calls=2)  # it starts and takes two steps of its 999, then is held
        server.wait_for("ldm_serve_sample_steps_total", lambda value: value == steps_before + 2 * 4,
                        "the two allowed steps never ran")
        connection.close()
        server.wait_for('ldm_serve_requests_total{outcome="disconnected"}', lambda value: value > disconnected_before,
                        "the server never noticed the disconnect")
        server.wait_for("ldm_serve_active_images", lambda value: value == 0, "the dropped request still holds its rows")
    assert post(server.url, body(n=4, steps=4)).status_code == 200
    # the steps counted are the gone request's two and the new one's: nothing more ran for the gone client
    assert server.metric("ldm_serve_sample_steps_total") == steps_before + 2 * 4 + 4 * 4


# ---------------------------------------------------------------- backpressure, auth, timeouts


@pytest.fixture(scope="module")
def small_server(engine_dir):
    """No batching, two queue slots and an API key: easy to fill."""
    running = Server(engine_dir, "--batching", "none", "--max-queue", "2", "--max-steps", "999",
                     env={"LDM_SERVE_API_KEY": "sesame"}).wait_ready()
    yield running
    running.stop()


AUTH = {**JSON, "Authorization": "Bearer sesame"}


def test_a_full_queue_answers_429_with_retry_after_and_every_request_is_answered(small_server):
    refused_before = small_server.metric('ldm_serve_requests_total{outcome="queue_full"}')

    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        with small_server.held():
            queued = asyncio.ensure_future(post_all(small_server.url, [body(seed=1), body(seed=2)], headers=AUTH))
            await asyncio.to_thread(small_server.wait_for, "ldm_serve_queue_depth", lambda value: value == 2,
                                    "the first two requests never queued")
            refused = await post_all(small_server.url, [body(seed=i) for i in range(3, 10)], headers=AUTH)
        return await queued, refused

    accepted, refused = asyncio.run(run())
    assert [response.status_code for response in refused] == [429] * 7
    assert all(int(response.headers["retry-after"]) >= 1 for response in refused)
    assert refused[0].json()["error"]["type"] == "queue_full"
    assert [response.status_code for response in accepted] == [200] * 2
    assert small_server.metric('ldm_serve_requests_total{outcome="queue_full"}') == refused_before + 7


def test_requests_past_their_timeout_get_503_with_retry_after_and_leave_the_queue(engine_dir):
    server = Server(engine_dir, "--batching", "none", "--max-queue", "2", "--request-timeout", "1").wait_ready()
    try:
        with server.held():  # both wait in the queue past their deadline
            queued = asyncio.run(post_all(server.url, [body(seed=1), body(seed=2)]))
            server.hold(more_calls=1)  # this one starts, takes a step and passes its deadline while running
            running = post(server.url, body(seed=3, steps=4))
        responses = [*queued, running]
        assert [response.status_code for response in responses] == [503] * 3, [r.text for r in responses]
        assert all(response.json()["error"]["type"] == "timeout" for response in responses)
        assert all(int(response.headers["retry-after"]) >= 1 for response in responses)
        server.wait_for("ldm_serve_active_images", lambda value: value == 0, "a timed-out request still runs")
        assert server.metric("ldm_serve_queue_depth") == 0
        assert httpx.get(f"{server.url}/readyz").json()["queue_depth"] == 0
        assert server.metric('ldm_serve_requests_total{outcome="timeout"}') == 3
        assert post(server.url, body()).status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "sesame", "Basic c2VzYW1l"])
def test_requests_without_the_right_api_key_get_401(small_server, authorization):
    headers = dict(JSON) if authorization is None else {**JSON, "Authorization": authorization}
    response = post(small_server.url, body(), headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["field"] == "authorization" and "sesame" not in response.text


def test_health_probes_need_no_api_key_and_metrics_and_the_schema_do(small_server):
    assert httpx.get(f"{small_server.url}/healthz").status_code == 200
    assert httpx.get(f"{small_server.url}/readyz").status_code == 200
    for path in ("/metrics", "/openapi.json", "/docs"):
        refused = httpx.get(f"{small_server.url}{path}")
        assert refused.status_code == 401 and refused.json()["error"]["field"] == "authorization", path
        assert httpx.get(f"{small_server.url}{path}", headers=AUTH).status_code == 200, path
    assert "ldm_serve_queue_depth" in httpx.get(f"{small_server.url}/metrics", headers=AUTH).text


# ---------------------------------------------------------------- drain


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(engine_dir):
    server = Server(engine_dir, "--max-steps", "999").wait_ready()
    results: list[httpx.Response] = []

    def send(seed: int) -> None:
        results.append(post(server.url, body(seed=seed, steps=20)))

    senders = [threading.Thread(target=send, args=(seed,)) for seed in range(3)]
    try:
        with server.held():
            for sender in senders:
                sender.start()
            server.wait_for("ldm_serve_queue_depth", lambda value: value == 3, "the three requests never queued")
            server.process.send_signal(signal.SIGTERM)
            host, port = server.url.removeprefix("http://").rsplit(":", 1)
            deadline = time.monotonic() + STATE_TIMEOUT_S
            while True:  # the listening socket closes while the three requests are still held in the queue
                try:
                    socket.create_connection((host, int(port)), timeout=5).close()
                except OSError:
                    break
                assert time.monotonic() < deadline, "the listening socket stayed open after SIGTERM"
                time.sleep(0.01)
            assert server.process.poll() is None and not results
        for sender in senders:
            sender.join(STATE_TIMEOUT_S)
        assert server.process.wait(STATE_TIMEOUT_S) == 0, server.log
    finally:
        server.stop()
    assert [response.status_code for response in results] == [200] * 3
    assert "drained and stopped" in server.log and "Traceback" not in server.log


# ---------------------------------------------------------------- bad input

INTERVAL = ("expected two noise levels [low, high] with 0 <= low < high, or null for the server's default "
            "(guidance at every UNet call)")
CACHE_ONLY_1 = "expected 1 (this server's engine cannot cache the UNet's features across steps)"
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
    ({"prompt": "a", "sampler": "heun"}, 422, "sampler",
     f'sampler is "heun"; expected one of {", ".join(SAMPLER_NAMES)}'),
    ({"prompt": "a", "sampler": None}, 422, "sampler", "sampler is null; expected one of"),
    ({"prompt": "a", "sampler": SAMPLER_NAMES[1], "eta": 0.5}, 422, "eta",
     f"eta is 0.5; expected 0 for the {SAMPLER_NAMES[1]} sampler"),
    ({"prompt": "a", "guidance_interval": [5, 1]}, 422, "guidance_interval",
     f"guidance_interval is [5, 1]; {INTERVAL}"),
    ({"prompt": "a", "guidance_interval": [2, 2]}, 422, "guidance_interval", "guidance_interval is [2, 2]"),
    ({"prompt": "a", "guidance_interval": [-1, 2]}, 422, "guidance_interval", "guidance_interval is [-1, 2]"),
    ({"prompt": "a", "guidance_interval": [1]}, 422, "guidance_interval", "guidance_interval is [1]"),
    ({"prompt": "a", "guidance_interval": [0, 1, 2]}, 422, "guidance_interval", "guidance_interval is [0, 1, 2]"),
    ({"prompt": "a", "guidance_interval": "0,1"}, 422, "guidance_interval", 'guidance_interval is "0,1"'),
    ({"prompt": "a", "guidance_interval": [0, "1"]}, 422, "guidance_interval", 'guidance_interval is [0, "1"]'),
    ({"prompt": "a", "guidance_interval": {"low": 0, "high": 1}}, 422, "guidance_interval", "guidance_interval is {"),
    ({"prompt": "a", "cache_interval": 0}, 422, "cache_interval", "cache_interval is 0; expected "),
    ({"prompt": "a", "cache_interval": 101}, 422, "cache_interval", "cache_interval is 101; expected "),
    ({"prompt": "a", "cache_interval": 1.5}, 422, "cache_interval", "cache_interval is 1.5"),
    ({"prompt": "a", "cache_interval": None}, 422, "cache_interval", "cache_interval is null"),
    ({"prompt": "a", "cache_schedule": "cubic"}, 422, "cache_schedule",
     'cache_schedule is "cubic"; expected one of uniform, quadratic'),
    ({"prompt": "a", "cache_schedule": None}, 422, "cache_schedule", "cache_schedule is null"),
    ({"prompt": "a", "seed": -1}, 422, "seed", "seed is -1"),
    ({"prompt": "a", "seed": 2**63}, 422, "seed", "seed is 9223372036854775808"),
    ({"prompt": "a", "seed": 1.5}, 422, "seed", "seed is 1.5"),
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
    (json.dumps({"prompt": "a" * 300000}).encode(), 413, "body", f"the body is over {IMAGES_BODY_LIMIT} bytes"),
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
        for _ in range(IMAGES_BODY_LIMIT // 1024 + 1):
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
    assert set(fields) == {"prompt", "negative_prompt", "n", "sampler", "steps", "guidance_scale",
                           "guidance_interval", "cache_interval", "cache_schedule", "eta", "seed", "height", "width",
                           "stream", "previews", "init_image", "mask", "strength", "lora"}
    assert (fields["stream"]["default"], fields["previews"]["default"]) == (False, 0)
    assert (fields["lora"]["default"], fields["lora"]["maxItems"]) == ([], 0)  # this server loaded no adapters
    assert fields["init_image"]["anyOf"][0]["maxLength"] == fields["mask"]["anyOf"][0]["maxLength"] == (
        base64_chars(largest_upload_bytes(32)))  # the tiny engine's largest side
    assert (fields["strength"]["anyOf"][0]["minimum"], fields["strength"]["anyOf"][0]["maximum"]) == (0, 1)
    assert fields["previews"]["maximum"] == 999  # --max-steps: at most one preview a step
    interval = fields["guidance_interval"]["anyOf"][0]
    assert (interval["minItems"], interval["maxItems"], interval["items"]["minimum"]) == (2, 2, 0)
    assert fields["guidance_interval"]["default"] is None
    assert (fields["cache_schedule"]["enum"], fields["cache_schedule"]["default"]) == (list(CACHE_SCHEDULES), "uniform")
    assert (fields["sampler"]["enum"], fields["sampler"]["default"]) == (list(SAMPLER_NAMES), DEFAULT_SAMPLER)
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
    from ldm_serve.text_cache import TextEncodingCache

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
    (["--model", "{engine}", "--sampler", "heun"], "argument --sampler: invalid choice: 'heun'"),
    (["--model", "{engine}", "--guidance-interval", "3,1"],
     "argument --guidance-interval: '3,1' is not an interval with 0 <= LOW < HIGH"),
    (["--model", "{engine}", "--guidance-interval", "1"], "argument --guidance-interval: '1' is not two numbers"),
    (["--model", "{engine}", "--cache-interval", "0"], "--cache-interval is 0; expected an integer from 1 to 100"),
    (["--model", "{engine}", "--cache-interval", "two"], "argument --cache-interval: invalid int value: 'two'"),
    (["--model", "{engine}", "--cache-schedule", "cubic"], "argument --cache-schedule: invalid choice: 'cubic'"),
    (["--model", "{engine}", "--api-key-file", "{missing}"], "cannot be read"),
    (["--model", "{engine}", "--header-timeout", "nan"], "argument --header-timeout: 'nan' is not a finite number"),
    (["--model", "{engine}", "--drain-timeout", "0"], "--drain-timeout is 0.0; expected seconds above 0"),
    (["--model", "{engine}", "--allowed-hosts", "example.com:8000"],
     "--allowed-hosts is 'example.com:8000'; expected a host name"),
    (["--model", "{engine}", "--allowed-hosts", "http://example.com"], "--allowed-hosts is 'http://example.com'"),
    (["--model", "{engine}", "--cors-origin", "https://example.com/"],
     "--cors-origin is 'https://example.com/'; expected an origin"),
    (["--model", "{engine}", "--cors-origin", "example.com"], "--cors-origin is 'example.com'"),
    (["--model", "{engine}", "--cors-origin", "https://EXAMPLE.com:99999"], "a port from 1 to 65535"),
    (["--model", "{engine}", "--threads", "2147483648"], "--threads is 2147483648; expected an integer from 1 to 1024"),
    (["--model", "{engine}", "--batching", "none", "--max-wait-ms", "50"],
     "--max-wait-ms applies to --batching dynamic only; this server batches with --batching none"),
    (["--model", "{engine}", "--batching", "dynamic", "--max-wait-ms", "-1"],
     "--max-wait-ms is -1.0; expected a number from 0 to 10000"),
    (["--model", "{engine}", "--api-key-file", "{two_lines}"],
     "holds a key with a line break or another control character; expected a key of one line"),
])
def test_bad_flags_exit_2_with_one_line_and_no_traceback(engine_dir, tmp_path, flags, message):
    (tmp_path / "two_lines").write_text("k1\nk2\n")
    flags = [flag.format(missing=tmp_path / "missing", engine=engine_dir, two_lines=tmp_path / "two_lines")
             for flag in flags]
    result = subprocess.run([sys.executable, "-m", "ldm_serve.cli", *flags], capture_output=True, text=True,
                            timeout=120, env={**{name: value for name, value in os.environ.items()
                                                 if name != API_KEY_ENV}, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr.startswith("ldm-serve: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize("key, flags, message", [
    ("  ", [], "LDM_SERVE_API_KEY is empty; expected the key (unset LDM_SERVE_API_KEY"),
    ("sesame", ["--api-key-file", "{key_file}"], "both --api-key-file and LDM_SERVE_API_KEY give an API key"),
])
def test_an_api_key_from_the_environment_that_cannot_serve_is_one_line(engine_dir, tmp_path, key, flags, message):
    (tmp_path / "key").write_text("sesame")
    flags = [flag.format(key_file=tmp_path / "key") for flag in flags]
    result = subprocess.run([sys.executable, "-m", "ldm_serve.cli", "--model", str(engine_dir), *flags],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1", API_KEY_ENV: key})
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_max_n_defaults_to_the_batch_where_that_is_smaller(engine_dir):
    from ldm_serve.cli import build_parser
    from ldm_serve.server import build_app

    for flags, max_n in ((["--max-batch", "2"], 2), ([], 4), (["--max-batch", "2", "--max-n", "1"], 1)):
        app, _, _, _ = build_app(build_parser().parse_args(["--model", str(engine_dir), "--threads", "1", *flags]))
        assert app.state.images_route.limits.max_n == max_n, flags


def test_ctrl_c_while_the_engine_loads_is_one_line_and_exit_130(monkeypatch, capsys):
    import ldm_serve.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ldm_serve.cli, "prepare_server", interrupted)
    assert ldm_serve.cli.main(["--model", "anything"]) == 130
    assert capsys.readouterr().err == "ldm-serve: interrupted before serving\n"
