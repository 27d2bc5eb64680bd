"""``ldm-serve`` against other web pages in the operator's browser (``ldm_serve.browser``): a body a page of another
site can send without a CORS preflight (no Content-Type, text/plain, a form) is refused with 415 before any image is
made; a Host header the server does not answer (DNS rebinding) gets a JSON 400 while loopback names, the bound address
and ``--allowed-hosts`` are served, with or without a port; CORS answers only ``--cors-origin``'s origins; and every
answer carries the security headers, the page a Content-Security-Policy that allows its own inline script and
style and nothing else."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import httpx
import pytest

from ldm_serve.errors import ApiError
from ldm_serve.request_schema import ServeLimits, openai_request_model, parse_body
from tests.ldm_serve.gated_server import JSON, Server, body, post

ALLOWED_NAME = "images.example"
APP_ORIGIN = "https://app.example"
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}


@pytest.fixture(scope="module")
def default_server(engine_dir):
    running = Server(engine_dir, "--max-steps", "8", "--default-steps", "2").wait_ready()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def configured_server(engine_dir):
    """Bound to 127.0.0.2, a loopback address none of the loopback names spell, with a name and an origin added."""
    running = Server(engine_dir, "--host", "127.0.0.2", "--allowed-hosts", ALLOWED_NAME, "--cors-origin",
                     APP_ORIGIN, "--max-steps", "8", "--default-steps", "2").wait_ready()
    yield running
    running.stop()


def port_of(server: Server) -> str:
    return server.url.rsplit(":", 1)[1]


# ---------------------------------------------------------------- bodies a page of another site can send


@pytest.mark.parametrize("headers, shown", [
    ({}, "a body without a Content-Type"),
    ({"Content-Type": "text/plain;charset=UTF-8"}, 'content type "text/plain"'),
    ({"Content-Type": "application/x-www-form-urlencoded"}, 'content type "application/x-www-form-urlencoded"'),
    ({"Content-Type": "multipart/form-data; boundary=x"}, 'content type "multipart/form-data"'),
])
@pytest.mark.parametrize("route", ["/v1/images", "/v1/images/generations"])
def test_a_json_body_without_a_json_content_type_gets_415_and_makes_no_image(default_server, route, headers, shown):
    calls_before = default_server.metric("ldm_serve_unet_calls_total")
    response = httpx.post(f"{default_server.url}{route}", content=json.dumps(body(n=4)), headers=headers, timeout=60)
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    message = error["message"]
    assert (error.get("field") or error.get("param")) == "content-type"
    assert message == f"{shown} is not supported; expected application/json", message
    assert default_server.metric("ldm_serve_unet_calls_total") == calls_before
    assert post(default_server.url, body(steps=1)).status_code == 200  # with the header, the same body is served


def test_parse_body_refuses_a_missing_content_type_and_takes_json_ones(rng):
    limits = ServeLimits()
    model = openai_request_model(limits)
    prompt = f"a red circle {int(rng.integers(1000))}"
    raw = json.dumps({"prompt": prompt}).encode()
    for content_type in ("", "text/plain"):
        with pytest.raises(ApiError) as raised:
            parse_body(raw, content_type, limits, model)
        assert raised.value.status == 415
    for content_type in ("application/json", "Application/JSON; charset=utf-8", "application/merge-patch+json"):
        assert parse_body(raw, content_type, limits, model).prompt == prompt


# ---------------------------------------------------------------- the OpenAI route's model and user


@pytest.mark.parametrize("field", ["model", "user"])
def test_a_257_character_openai_model_or_user_is_refused_naming_the_256_limit(field, rng):
    limits = ServeLimits()
    model = openai_request_model(limits)
    letters = "".join(chr(ord("a") + int(index)) for index in rng.integers(0, 26, 257))
    assert getattr(parse_body(json.dumps({"prompt": "a", field: letters[:256]}).encode(), "application/json",
                              limits, model), field) == letters[:256]
    with pytest.raises(ApiError) as raised:
        parse_body(json.dumps({"prompt": "a", field: letters}).encode(), "application/json", limits, model)
    assert (raised.value.status, raised.value.field) == (422, field)
    assert raised.value.message == f"{field} has 257 characters; expected at most 256"


# ---------------------------------------------------------------- Host names


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example", "[::2]:{port}",
                                  "localhost.evil.example", "127.0.0.3"])
def test_a_host_the_server_does_not_answer_gets_400_in_one_json_line_and_makes_no_image(configured_server, host):
    host = host.format(port=port_of(configured_server))
    calls_before = configured_server.metric("ldm_serve_unet_calls_total")
    for response in (post(configured_server.url, body(), headers={**JSON, "Host": host}),
                     httpx.get(f"{configured_server.url}/", headers={"Host": host}),
                     httpx.get(f"{configured_server.url}/metrics", headers={"Host": host})):
        assert response.status_code == 400, response.text
        assert "\n" not in response.text and response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["type"] == "host_not_allowed" and error["field"] == "host"
        assert error["message"].startswith(f'the Host header is "{host}"; expected one of ')
        assert ALLOWED_NAME in error["message"] and "--allowed-hosts" in error["message"]
    assert configured_server.metric("ldm_serve_unet_calls_total") == calls_before
    assert httpx.get(f"{configured_server.url}/healthz", headers={"Host": host}).status_code == 200  # probes


@pytest.mark.parametrize("host", ["127.0.0.2", "127.0.0.2:{port}", ALLOWED_NAME, f"{ALLOWED_NAME.upper()}:{{port}}",
                                  "localhost", "localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}"])
def test_loopback_names_the_bound_address_and_allowed_hosts_are_served(configured_server, host):
    response = post(configured_server.url, body(steps=1), headers={**JSON, "Host": host.format(
        port=port_of(configured_server))})
    assert response.status_code == 200, response.text
    assert len(response.json()["images"]) == 1


def test_allowed_hosts_star_answers_any_host(engine_dir):
    server = Server(engine_dir, "--allowed-hosts", "*").wait_ready()
    try:
        assert post(server.url, body(steps=1), headers={**JSON, "Host": "anything.example"}).status_code == 200
    finally:
        server.stop()


# ---------------------------------------------------------------- CORS


def test_cors_headers_are_absent_by_default(default_server):
    response = post(default_server.url, body(steps=1), headers={**JSON, "Origin": APP_ORIGIN})
    assert response.status_code == 200
    assert not [name for name in response.headers if name.startswith("access-control-")]
    preflight = httpx.options(f"{default_server.url}/v1/images", headers={
        "Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers


def test_cors_answers_the_configured_origin_only(configured_server):
    allowed = post(configured_server.url, body(steps=1), headers={**JSON, "Origin": APP_ORIGIN})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "x-seed" in allowed.headers["access-control-expose-headers"].lower()
    other = post(configured_server.url, body(steps=1), headers={**JSON, "Origin": "https://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    ok = httpx.options(f"{configured_server.url}/v1/images", headers={"Origin": APP_ORIGIN, **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    refused = httpx.options(f"{configured_server.url}/v1/images",
                            headers={"Origin": "https://evil.example", **preflight})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    assert refused.json()["error"]["type"] == "cors_refused"


# ---------------------------------------------------------------- security headers


def policy_of(response: httpx.Response) -> dict[str, str]:
    """The response's Content-Security-Policy as ``{directive: sources}``."""
    return dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))


def inline_hash(html: str, element: str) -> str:
    text = re.search(rf"<{element}>(.*?)</{element}>", html, re.DOTALL).group(1)
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_every_answer_has_the_security_headers_and_the_page_allows_only_its_own_script_and_style(default_server):
    answers = {"page": httpx.get(f"{default_server.url}/"), "docs": httpx.get(f"{default_server.url}/docs"),
               "image": post(default_server.url, body(steps=1)),
               "png": post(default_server.url, body(steps=1), headers={**JSON, "Accept": "image/png"}),
               "error": post(default_server.url, {"prompt": ""}), "unknown": httpx.get(f"{default_server.url}/x"),
               "health": httpx.get(f"{default_server.url}/healthz"),
               "metrics": httpx.get(f"{default_server.url}/metrics")}
    for name, response in answers.items():
        for header, value in SECURITY_HEADERS.items():
            assert response.headers.get(header) == value, (name, header)
        policy = policy_of(response)
        assert policy["frame-ancestors"] == "'none'" and policy["default-src"] == "'none'", name
        if name not in ("page", "docs"):
            assert set(policy) == {"default-src", "base-uri", "form-action", "frame-ancestors"}, name
    page = answers["page"]
    policy = policy_of(page)
    assert policy["script-src"] == inline_hash(page.text, "script")
    assert policy["style-src"] == inline_hash(page.text, "style")
    assert (policy["connect-src"], policy["img-src"]) == ("'self'", "data:")
