"""The try-it page (``GET /``) in a real headless browser: Python Playwright driving Debian's Chromium
(``/usr/bin/chromium``; ``playwright install`` is never used). A prompt typed and Generate clicked gives the image
``/v1/images`` makes for the same request, with its seed and timing; a bad value shows the server's own message; the
queue depth follows the server's queue; a request streams its place in the queue, a progress bar and its previews
into its figure, and its Cancel button cancels it; and the page asks nothing of any host but the server (it works
offline) and runs under its strict Content-Security-Policy without a violation.

Without Chromium or Playwright the tests skip, unless ``LDM_REQUIRE_BROWSER=1`` (as ``.ci/run`` sets it), when they
fail instead."""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from pathlib import Path

import pytest

from ldm_runtime.config import DEFAULT_SAMPLER
from ldm_runtime.schedulers import SAMPLER_NAMES
from ldm_serve.server import API_KEY_ENV
from tests.ldm_serve.gated_server import JSON, Server, post, post_all

CHROMIUM = Path("/usr/bin/chromium")
REQUIRE_ENV = "LDM_REQUIRE_BROWSER"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
API_KEY = "sesame"
WAIT_MS = 60_000  # how long the browser waits for a state the test has set up


def browser_or_skip():
    """Playwright's sync API, or a skip (a failure with LDM_REQUIRE_BROWSER=1) when it or Chromium is missing."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed"
    if missing is None and not CHROMIUM.is_file():
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    if missing is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{missing}, and {REQUIRE_ENV}=1 requires the browser tests to run")
        pytest.skip(missing)
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = browser_or_skip()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def page_server(engine_dir):
    running = Server(engine_dir, "--max-steps", "8", "--default-steps", "2",
                     env={API_KEY_ENV: API_KEY}).wait_ready()
    yield running
    running.stop()


@pytest.fixture
def page(browser, page_server):
    """A fresh page on the server, every request it makes recorded in ``page.requested`` and every console message
    (a Content-Security-Policy violation among them) in ``page.console``."""
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    opened = context.new_page()
    opened.requested, opened.console = [], []
    opened.on("request", lambda request: opened.requested.append(request.url))
    opened.on("console", lambda message: opened.console.append(message.text))
    opened.goto(f"{page_server.url}/")
    yield opened
    context.close()


def image_bytes(page, index: int = 0) -> bytes:
    source = page.locator("#images figure.done img").nth(index).get_attribute("src")
    assert source.startswith("data:image/png;base64,")
    return base64.b64decode(source.removeprefix("data:image/png;base64,"))


def test_a_typed_prompt_gives_the_servers_image_with_its_seed_and_timing(page, page_server, rng):
    seed = int(rng.integers(2**53, 2**63 - 1))  # past what a JavaScript number holds exactly
    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#steps", "3")
    page.fill("#seed", str(seed))
    page.fill("#api-key", API_KEY)
    page.click("#generate")
    page.locator("#images figure.done img").first.wait_for(timeout=WAIT_MS)
    caption = page.locator("#images figure.done figcaption").first.inner_text()
    assert caption.startswith(f"seed {seed} · ") and " ms on the server" in caption
    alone = post(page_server.url, {"prompt": "a red circle on a blue background", "steps": 3, "seed": seed},
                 headers={**JSON, "Authorization": f"Bearer {API_KEY}", "Accept": "image/png"})
    assert image_bytes(page) == alone.content
    assert page.locator("#images img").first.evaluate("image => image.naturalWidth") == 16
    assert page.locator("#error").is_hidden()
    page.locator("#server-status").filter(has_text="ready").wait_for(timeout=WAIT_MS)
    # The page polls /readyz once a second: a poll made while either request was queued shows 1 until the next one.
    page.wait_for_function("() => document.getElementById('queue-depth').textContent === '0'", timeout=WAIT_MS)
    offline = all(url.startswith((page_server.url, "data:")) for url in page.requested)
    assert page.requested and offline, page.requested
    assert "'none'" in page.evaluate("() => fetch('/').then(answer => answer.headers.get('content-security-policy'))")
    assert not [text for text in page.console if "Content Security Policy" in text], page.console


def test_the_sampler_choice_lists_the_servers_samplers_and_gives_the_chosen_samplers_image(page, page_server, rng):
    assert page.locator("#sampler option").all_inner_texts() == list(SAMPLER_NAMES)
    assert page.input_value("#sampler") == DEFAULT_SAMPLER  # the server's default: the model names none
    sampler, seed = SAMPLER_NAMES[-1], int(rng.integers(0, 2**62))
    page.fill("#prompt", "two yellow stars")
    page.select_option("#sampler", sampler)
    page.fill("#steps", "3")
    page.fill("#seed", str(seed))
    page.fill("#api-key", API_KEY)
    page.click("#generate")
    page.locator("#images figure.done img").first.wait_for(timeout=WAIT_MS)
    alone = post(page_server.url, {"prompt": "two yellow stars", "steps": 3, "seed": seed, "sampler": sampler},
                 headers={**JSON, "Authorization": f"Bearer {API_KEY}", "Accept": "image/png"})
    assert alone.status_code == 200, alone.text
    assert image_bytes(page) == alone.content
    assert not [text for text in page.console if "Content Security Policy" in text], page.console


def test_the_guidance_and_cache_interval_fields_give_the_servers_image_for_them(page, page_server, rng):
    """Beside the sampler: "LOW, HIGH" is sent as the JSON array [LOW, HIGH], the cache interval as a number."""
    seed = int(rng.integers(0, 2**62))
    page.fill("#prompt", "a small green triangle")
    page.fill("#steps", "3")
    page.fill("#seed", str(seed))
    page.fill("#guidance-interval", " 0.5, 1e6 ")
    page.fill("#cache-interval", "1")
    page.fill("#api-key", API_KEY)
    with page.expect_request(lambda request: request.url.endswith("/v1/images")) as sent:
        page.click("#generate")
    assert '"guidance_interval": [0.5, 1e6]' in sent.value.post_data and '"cache_interval": 1' in sent.value.post_data
    page.locator("#images figure.done img").first.wait_for(timeout=WAIT_MS)
    alone = post(page_server.url, {"prompt": "a small green triangle", "steps": 3, "seed": seed,
                                   "guidance_interval": [0.5, 1e6], "cache_interval": 1},
                 headers={**JSON, "Authorization": f"Bearer {API_KEY}", "Accept": "image/png"})
    assert alone.status_code == 200, alone.text
    assert image_bytes(page) == alone.content
    assert not [text for text in page.console if "Content Security Policy" in text], page.console


@pytest.mark.parametrize("field, value, message", [
    ("#steps", "1000", "steps is 1000; expected an integer from 1 to 8"),
    ("#seed", "a lucky one", 'seed is "a lucky one"; expected an integer from 0 to 2**63 - 1, or null'),
    ("#width", "18", "width is 18; expected a multiple of 4 from 16 to 32, or null"),
    ("#guidance-interval", "5, 1", "guidance_interval is [5, 1]; expected two noise levels [low, high] with "
                                   "0 <= low < high, or null for the server's default (guidance at every UNet call)"),
    ("#guidance-interval", "high", 'guidance_interval is "high"; expected two noise levels [low, high] with '
                                   "0 <= low < high, or null for the server's default (guidance at every UNet call)"),
    ("#api-key", "wrong", "the request has a wrong API key; expected the header Authorization: Bearer <key>"),
])
def test_a_bad_value_shows_the_servers_error_message(page, field, value, message):
    page.fill("#prompt", "a red circle")
    page.fill("#api-key", API_KEY)
    page.fill(field, value)
    page.click("#generate")
    error = page.locator("#error")
    error.filter(has_text=message).wait_for(timeout=WAIT_MS)
    assert error.inner_text() == message
    assert page.locator("#images figure.failed").count() == 1 and page.locator("#images img").count() == 0


def test_a_bad_cache_interval_shows_the_message_the_server_gives_for_it(page, page_server):
    refused = post(page_server.url, {"prompt": "a red circle", "cache_interval": 0},
                   headers={**JSON, "Authorization": f"Bearer {API_KEY}"})
    message = refused.json()["error"]["message"]  # the range depends on whether the engine caches UNet features
    assert refused.status_code == 422 and message.startswith("cache_interval is 0; expected "), refused.text
    page.fill("#prompt", "a red circle")
    page.fill("#api-key", API_KEY)
    page.fill("#cache-interval", "0")
    page.click("#generate")
    page.locator("#error").filter(has_text=message).wait_for(timeout=WAIT_MS)
    assert page.locator("#error").inner_text() == message


def test_the_queue_depth_follows_the_server_and_images_arrive_when_it_runs(page, page_server):
    page.fill("#prompt", "two yellow stars")
    page.fill("#api-key", API_KEY)
    page.fill("#count", "3")
    page.fill("#seed", "40")
    with page_server.held():
        page.click("#generate")
        page.locator("#queue-depth").filter(has_text="3").wait_for(timeout=WAIT_MS)
        assert page.locator("#images figure.waiting").count() == 3 and page.locator("#images img").count() == 0
    page.locator("#images figure.done").nth(2).wait_for(timeout=WAIT_MS)
    captions = page.locator("#images figure.done figcaption").all_inner_texts()
    assert [caption.split(" · ")[0] for caption in captions] == ["seed 40", "seed 41", "seed 42"]  # in seed order
    assert len({image_bytes(page, index) for index in range(3)}) == 3
    page.locator("#queue-depth").filter(has_text="0").wait_for(timeout=WAIT_MS)


def test_a_page_of_another_site_cannot_frame_the_page(browser, page_server):
    context = browser.new_context()
    try:
        framing = context.new_page()
        with framing.expect_console_message(lambda message: "frame-ancestors" in message.text, timeout=WAIT_MS):
            framing.set_content(f'<iframe src="{page_server.url}/"></iframe>')
        assert all(frame.query_selector("#generate") is None for frame in framing.frames)
    finally:
        context.close()


def test_the_page_shows_the_queue_position_then_a_progress_bar_and_previews_then_the_servers_image(page, page_server,
                                                                                                rng):
    seed = int(rng.integers(0, 2**62))
    auth = {**JSON, "Authorization": f"Bearer {API_KEY}"}
    page.fill("#prompt", "a blue square on the left")
    page.fill("#api-key", API_KEY)
    page.fill("#steps", "6")
    page.fill("#seed", str(seed))
    page.fill("#previews", "3")  # after steps 2, 3 and 4 of 6
    figure = page.locator("#images figure").first
    with page_server.held():
        ahead = threading.Thread(target=lambda: asyncio.run(post_all(page_server.url, [
            {"prompt": "two yellow stars", "n": 4, "steps": 2, "seed": index} for index in range(2)], headers=auth)))
        ahead.start()  # two requests of four images each: each fills the batch of four
        page_server.wait_for("ldm_serve_queue_depth", lambda value: value == 2, "the two requests never queued")
        page.click("#generate")
        figure.locator("figcaption").filter(has_text="queued, 2 requests ahead").wait_for(timeout=WAIT_MS)
        calls = page_server.metric("ldm_serve_unet_calls_total")
        page_server.hold(more_calls=2)  # the first request ahead runs its two steps
        figure.locator("figcaption").filter(has_text="queued, 1 request ahead").wait_for(timeout=WAIT_MS)
        # the request ahead leaves the queue before its first step: the gate is moved on only once both ran
        page_server.wait_for("ldm_serve_unet_calls_total", lambda value: value == calls + 2,
                             "the first request ahead never ran its two steps")
        assert figure.locator("img").count() == 0 and figure.locator("progress").get_attribute("value") == "0"
        page_server.hold(more_calls=2 + 3)  # the second runs its two, then the page's request three of its six
        figure.locator("figcaption").filter(has_text="step 3 of 6").wait_for(timeout=WAIT_MS)
        progress = figure.locator("progress")
        assert (progress.get_attribute("value"), progress.get_attribute("max")) == ("3", "6")
        assert figure.locator("img").get_attribute("alt") == "preview at step 3"
        preview = base64.b64decode(figure.locator("img").get_attribute("src").removeprefix("data:image/png;base64,"))
    ahead.join(WAIT_MS / 1000)
    page.locator("#images figure.done img").first.wait_for(timeout=WAIT_MS)
    assert figure.locator("progress").count() == 0 and figure.locator("button").count() == 0
    alone = post(page_server.url, {"prompt": "a blue square on the left", "steps": 6, "seed": seed},
                 headers={**auth, "Accept": "image/png"})
    assert image_bytes(page) == alone.content and preview != alone.content
    assert not [text for text in page.console if "Content Security Policy" in text], page.console


def test_the_cancel_button_cancels_the_request_and_the_server_drops_it(page, page_server):
    cancelled_before = page_server.metric('ldm_serve_requests_total{outcome="cancelled"}')
    page.fill("#prompt", "a small green triangle")
    page.fill("#api-key", API_KEY)
    page.fill("#steps", "8")
    figure = page.locator("#images figure").first
    with page_server.held():
        page.click("#generate")
        figure.locator("figcaption").filter(has_text="queued, next to start").wait_for(timeout=WAIT_MS)
        page_server.hold(more_calls=1)
        figure.locator("figcaption").filter(has_text="step 1 of 8").wait_for(timeout=WAIT_MS)
        figure.locator("button.cancel").click()
        page.locator("#images figure.cancelled").wait_for(timeout=WAIT_MS)
        assert figure.locator("figcaption").inner_text() == "cancelled"
        page_server.wait_for("ldm_serve_active_images", lambda value: value == 0, "the cancelled request still runs")
    assert page_server.metric('ldm_serve_requests_total{outcome="cancelled"}') == cancelled_before + 1
    assert page.locator("#error").is_hidden()


def test_an_uploaded_image_with_a_painted_stroke_is_inpainted_as_the_request_carrying_that_mask(page, page_server,
                                                                                                 tmp_path, rng):
    """A generated PNG uploaded through the file input, a stroke painted across the canvas over it, Generate: the
    request carries the file's bytes as init_image and a mask of the image's size, white along the stroke only; the
    image shown is what /v1/images gives for that request, its pixels outside the mask the upload's own."""
    import io
    import json

    import numpy as np
    from PIL import Image

    seed = int(rng.integers(0, 2**62))
    auth = {**JSON, "Authorization": f"Bearer {API_KEY}", "Accept": "image/png"}
    generated = post(page_server.url, {"prompt": "a red circle", "steps": 2, "seed": seed, "width": 24,
                                       "height": 16}, headers=auth)
    assert generated.status_code == 200, generated.text
    upload = tmp_path / "generated.png"
    upload.write_bytes(generated.content)
    posted = []
    page.on("request", lambda request: posted.append(request.post_data) if request.method == "POST" else None)
    page.fill("#prompt", "a blue square")
    page.fill("#steps", "2")
    page.fill("#seed", str(seed))
    page.fill("#strength", "0.9")
    page.fill("#api-key", API_KEY)
    page.set_input_files("#init-image", str(upload))
    page.locator("#editor").wait_for(state="visible", timeout=WAIT_MS)
    box = page.locator("#mask").bounding_box()
    page.mouse.move(box["x"] + 0.2 * box["width"], box["y"] + 0.5 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.6 * box["width"], box["y"] + 0.5 * box["height"], steps=8)
    page.mouse.up()
    page.click("#generate")
    page.locator("#images figure.done img").first.wait_for(timeout=WAIT_MS)
    sent = json.loads(posted[-1])
    assert sent["init_image"] == base64.b64encode(generated.content).decode("ascii") and sent["strength"] == 0.9
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(sent["mask"]))).convert("L"))
    painted = mask >= 128
    assert mask.shape == (16, 24) and painted[8, 5:14].all(), painted.astype(int)  # along the stroke
    assert not painted[:, :3].any() and not painted[:, 17:].any() and not painted[:4].any()  # nowhere else
    alone = post(page_server.url, {"prompt": "a blue square", "steps": 2, "seed": seed, "strength": 0.9,
                                   "init_image": sent["init_image"], "mask": sent["mask"]}, headers=auth)
    assert alone.status_code == 200, alone.text
    assert image_bytes(page) == alone.content
    shown = np.asarray(Image.open(io.BytesIO(image_bytes(page))).convert("RGB"))
    original = np.asarray(Image.open(io.BytesIO(generated.content)).convert("RGB"))
    assert np.array_equal(shown[~painted], original[~painted]) and not np.array_equal(shown, original)
    assert page.locator("#error").is_hidden()
    assert not [text for text in page.console if "Content Security Policy" in text], page.console
