"""Streamed requests and cancel on ``POST /v1/images``, end to end against the real server (the tiny engine dir):
the events a streamed request gets (its id and queue position, each step's progress, the previews it asked for,
then the very bytes it gets unstreamed), ``DELETE /v1/images/{id}`` on a queued and on a running request, and a
client closing its stream; each frees the request's rows at the next step and is counted in ``/metrics``.

Read with a plain server-sent-events client (``gated_server.StreamedRequest``). As in test_serve.py, the step
gate decides what is queued or running and ``/metrics`` says when the server got there: no sleeps."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from ldm_runtime.previews import PREVIEW_FILE, LatentPreview, save_latent_preview
from tests.ldm_serve.gated_server import JSON, PROMPTS, Server, StreamedRequest, body, post

CANCELLED = 'ldm_serve_requests_total{outcome="cancelled"}'
DISCONNECTED = 'ldm_serve_requests_total{outcome="disconnected"}'


@pytest.fixture(scope="module")
def server(engine_dir):
    """Step-level batching of up to 4 images, long requests allowed."""
    running = Server(engine_dir, "--max-steps", "999", "--max-queue", "16").wait_ready()
    yield running
    running.stop()


def named(events: list[tuple[str, dict]], name: str) -> list[dict]:
    return [data for event, data in events if event == name]


def pixels_of(b64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))))


def test_a_streamed_request_hears_its_place_its_steps_and_its_previews_then_gets_the_unstreamed_bytes(server, rng):
    seed, steps = int(rng.integers(0, 2**62)), 7
    streamed_body = body(prompt=PROMPTS[1], seed=seed, steps=steps, n=2, guidance_scale=2.5, stream=True, previews=3)
    with server.held():
        ahead = StreamedRequest(server.url, body(n=4, steps=3, stream=True))  # fills the batch of 4 when it runs
        streamed = StreamedRequest(server.url, streamed_body)
        assert streamed.response.status_code == 200, streamed.response.read()
        assert streamed.response.headers["content-type"].startswith("text/event-stream")
        first = streamed.next()
        request_id = streamed.response.headers["x-request-id"]
        assert first == ("queued", {"id": request_id, "position": 1})
        server.hold(more_calls=3)  # the request ahead runs its three steps and leaves; this one moves up
        assert streamed.next() == ("queued", {"id": request_id, "position": 0})
        assert named(ahead.rest(), "completed")
    events = streamed.rest()
    progress = named(events, "progress")
    assert [event["step"] for event in progress] == list(range(steps)) and {event["steps"] for event in progress} == {7}
    previews = named(events, "preview")
    assert [(event["image"], event["index"], event["step"]) for event in previews] == [
        (image, index, step) for index, step in enumerate((2, 4, 5)) for image in (0, 1)]
    for preview in previews:
        pixels = pixels_of(preview["b64_png"])
        assert pixels.shape == (16, 16, 3) and pixels.std() > 0
    assert [event for event, _ in events][-1] == "completed" and all(data["id"] == request_id for _, data in events)
    completed = named(events, "completed")[0]
    unstreamed = post(server.url, {**streamed_body, "stream": False, "previews": 0})
    assert unstreamed.status_code == 200, unstreamed.text
    assert completed["images"] == unstreamed.json()["images"] and completed["seeds"] == [seed, seed + 1]
    assert set(completed["timings"]) == {"queue_ms", "compute_ms", "total_ms"}
    ahead.close()
    streamed.close()


def test_delete_cancels_a_running_streamed_request_frees_its_rows_at_the_next_step_and_counts_it(server):
    steps_before = server.metric("ldm_serve_sample_steps_total")
    cancelled_before = server.metric(CANCELLED)
    with server.held():
        streamed = StreamedRequest(server.url, body(steps=999, n=4, stream=True))
        request_id = streamed.next()[1]["id"]
        server.hold(more_calls=2)  # it starts and takes two of its 999 steps, then is held
        assert streamed.next() == ("progress", {"id": request_id, "step": 0, "steps": 999})
        assert streamed.next() == ("progress", {"id": request_id, "step": 1, "steps": 999})
        assert streamed.next() == ("progress", {"id": request_id, "step": 2, "steps": 999})
        cancelled = httpx.delete(f"{server.url}/v1/images/{request_id}", timeout=30)
        assert cancelled.status_code == 200 and cancelled.json() == {"id": request_id, "status": "cancelled"}
        error = streamed.rest()
        assert [name for name, _ in error] == ["error"] and error[0][1]["error"]["type"] == "cancelled"
        assert request_id in error[0][1]["error"]["message"]
        server.wait_for("ldm_serve_active_images", lambda value: value == 0, "the cancelled request holds its rows")
        again = httpx.delete(f"{server.url}/v1/images/{request_id}", timeout=30)
        assert again.status_code == 404 and again.json()["error"]["field"] == "id", again.text
    streamed.close()
    assert server.metric(CANCELLED) == cancelled_before + 1
    assert post(server.url, body(n=4, steps=4)).status_code == 200
    # the steps counted are the cancelled request's two and the next one's: nothing more ran for it
    assert server.metric("ldm_serve_sample_steps_total") == steps_before + 2 * 4 + 4 * 4


def test_delete_cancels_a_queued_request_and_the_one_behind_it_moves_up(server):
    calls_before = server.metric("ldm_serve_unet_calls_total")
    with server.held():
        first = StreamedRequest(server.url, body(seed=3, stream=True))
        second = StreamedRequest(server.url, body(seed=4, stream=True))
        first_id = first.next()[1]["id"]
        assert second.next()[1]["position"] == 1
        cancelled = httpx.delete(f"{server.url}/v1/images/{first_id}", timeout=30)
        assert cancelled.status_code == 200, cancelled.text
        assert [name for name, _ in first.rest()] == ["error"]
        assert second.next()[1]["position"] == 0
        server.wait_for("ldm_serve_queue_depth", lambda value: value == 1, "the cancelled request still queues")
        assert server.metric("ldm_serve_unet_calls_total") == calls_before
    assert named(second.rest(), "completed")
    first.close()
    second.close()


def test_closing_the_stream_frees_the_rows_at_the_next_step_and_counts_a_disconnect(server):
    steps_before = server.metric("ldm_serve_sample_steps_total")
    disconnected_before = server.metric(DISCONNECTED)
    with server.held():
        streamed = StreamedRequest(server.url, body(steps=999, n=4, stream=True))
        streamed.next()
        server.hold(more_calls=1)
        server.wait_for("ldm_serve_sample_steps_total", lambda value: value == steps_before + 4, "no step ran")
        streamed.close()
        server.wait_for(DISCONNECTED, lambda value: value > disconnected_before, "the server never saw it go")
        server.wait_for("ldm_serve_active_images", lambda value: value == 0, "the closed stream holds its rows")
        assert server.metric("ldm_serve_requests_in_flight") == 0
    assert server.metric("ldm_serve_sample_steps_total") == steps_before + 4


def test_a_request_not_streamed_gets_its_id_and_delete_of_an_unknown_id_is_404(server):
    answer = post(server.url, body(seed=5))
    assert answer.status_code == 200 and len(answer.headers["x-request-id"]) == 24
    unknown = httpx.delete(f"{server.url}/v1/images/{'0' * 24}", timeout=30)
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["error"]["message"] == (f'no queued or running request has id "{"0" * 24}"; expected the id '
                                                  f"of one (its X-Request-Id header, or its stream's first event)")


def test_a_request_not_streamed_is_cancelled_by_the_id_its_client_named(server):
    cancelled_before = server.metric(CANCELLED)
    named_id = "client-7.a_b~c:d"
    answers: list[httpx.Response] = []
    with server.held():
        waiting = threading.Thread(target=lambda: answers.append(
            post(server.url, body(seed=6), headers={**JSON, "X-Request-Id": named_id})))
        waiting.start()
        server.wait_for("ldm_serve_requests_in_flight", lambda value: value == 1, "the request never arrived")
        server.wait_for("ldm_serve_queue_depth", lambda value: value == 1, "the request never queued")
        again = post(server.url, body(seed=7), headers={**JSON, "X-Request-Id": named_id})
        assert again.status_code == 409 and again.json()["error"]["field"] == "X-Request-Id", again.text
        assert "the id of a request still in flight" in again.json()["error"]["message"]
        cancelled = httpx.delete(f"{server.url}/v1/images/{named_id}", timeout=30)
        assert cancelled.status_code == 200 and cancelled.json() == {"id": named_id, "status": "cancelled"}
        waiting.join(30)
    assert [answer.status_code for answer in answers] == [409], [answer.text for answer in answers]
    assert answers[0].json()["error"]["type"] == "cancelled"
    assert server.metric(CANCELLED) == cancelled_before + 1
    reused = post(server.url, body(seed=6, steps=1), headers={**JSON, "X-Request-Id": named_id})
    assert reused.status_code == 200 and reused.headers["x-request-id"] == named_id  # free again once answered
    for bad in ("a/b", "a b", "x" * 201, ""):
        refused = post(server.url, body(), headers={**JSON, "X-Request-Id": bad})
        assert refused.status_code == 400 and refused.json()["error"]["field"] == "X-Request-Id", (bad, refused.text)
        assert "expected 1 to 200 letters, digits" in refused.json()["error"]["message"]


def test_a_stream_goes_to_a_client_that_accepts_png_and_events(server):
    streamed = StreamedRequest(server.url, body(n=2, steps=2, stream=True),
                               headers={**JSON, "Accept": "image/png, text/event-stream"})
    assert streamed.response.status_code == 200, streamed.response.read()
    assert len(named(streamed.rest(), "completed")[0]["images"]) == 2
    streamed.close()


@pytest.mark.parametrize("fields, field, message", [
    ({"previews": 2}, "previews", "previews is 2 but stream is false; expected stream: true for previews, or "
                                  "previews 0"),
    ({"stream": "yes"}, "stream", 'stream is "yes"; expected true or false'),
    ({"stream": True, "previews": -1}, "previews", "previews is -1; expected an integer from 0 to 999"),
    ({"stream": True, "previews": 1000}, "previews", "previews is 1000; expected an integer from 0 to 999"),
])
def test_bad_stream_fields_get_422_naming_the_field(server, fields, field, message):
    response = post(server.url, body(**fields))
    assert response.status_code == 422, response.text
    assert response.json()["error"] == {"type": "invalid_request", "field": field, "message": message}


def test_a_stream_for_a_client_that_accepts_no_event_stream_is_406(server):
    response = post(server.url, body(stream=True), headers={**JSON, "Accept": "application/json"})
    assert response.status_code == 406 and response.json()["error"]["field"] == "stream", response.text


def test_a_streamed_request_the_queue_cannot_take_gets_429_before_any_event(engine_dir):
    full = Server(engine_dir, "--max-queue", "1", "--batching", "none").wait_ready()
    try:
        with full.held():
            queued = StreamedRequest(full.url, body(stream=True))
            assert queued.next()[0] == "queued"
            refused = post(full.url, body(stream=True), headers={**JSON, "Accept": "text/event-stream"})
            assert refused.status_code == 429 and refused.headers["content-type"] == "application/json"
            assert int(refused.headers["retry-after"]) >= 1
        assert named(queued.rest(), "completed")
        queued.close()
    finally:
        full.stop()


def test_the_model_folders_preview_map_makes_the_previews_and_a_broken_one_stops_the_server_in_one_line(
        engine_dir, tmp_path, rng):
    folder = tmp_path / "engine"
    shutil.copytree(engine_dir, folder)
    (folder / PREVIEW_FILE).write_text('{"format": 1, "factor": 2, "weights": [[0, 0, 0]]}')
    result = subprocess.run([sys.executable, "-m", "ldm_serve.cli", "--model", str(folder)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"ldm-serve: error: {folder / PREVIEW_FILE} is not a latent preview map of this "
                                     f"model; expected "), result.stderr
    weights = rng.normal(0, 0.5, size=(5, 3)).astype(np.float32)
    save_latent_preview(folder, LatentPreview(weights=weights, factor=2))
    served = Server(folder, "--max-steps", "8").wait_ready()
    try:
        assert f"previews from {PREVIEW_FILE}" in served.log
        streamed = StreamedRequest(served.url, body(steps=6, stream=True, previews=2))
        previews = [pixels_of(event["b64_png"]) for event in named(streamed.rest(), "preview")]
        streamed.close()
    finally:
        served.stop()
    assert len(previews) == 2
    for pixels in previews:  # the map's colours, one per latent pixel, each shown as a 2 x 2 block
        assert pixels.shape == (16, 16, 3) and pixels.std() > 0
        assert all((pixels[row::2, column::2] == pixels[::2, ::2]).all() for row in (0, 1) for column in (0, 1))
