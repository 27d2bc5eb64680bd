"""``ldm-serve`` against hostile and careless clients (issue 11 §2): every request gets a valid answer or a 4xx,
never a 500; an error leaves the keep-alive connection usable; half-sent headers and bodies time out; SIGTERM
ends within the drain time whatever clients do; the queue gauge returns to 0; the API key works as UTF-8 bytes on
every route but the health probes; and under 200 clients at once every request is answered 200 or 429.

Raw sockets speak HTTP/1.1 here where the test is about the connection itself (``exchange`` reads one response and
leaves the socket open for the next request). As in test_serve.py, the step gate and ``/metrics`` decide when work
is queued or running, never a sleep."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.ldm_serve.gated_server import JSON, STATE_TIMEOUT_S, Server, body, post

GET_HEALTH = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=STATE_TIMEOUT_S)


def post_bytes(content: bytes, headers: bytes = b"Content-Type: application/json\r\n") -> bytes:
    return (b"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers
            + f"Content-Length: {len(content)}\r\n\r\n".encode() + content)


def exchange(connection: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` and read one whole response from the same socket: status, headers (lower-case), body."""
    connection.sendall(request)
    response = http.client.HTTPResponse(connection)
    response.begin()
    return response.status, {name.lower(): value for name, value in response.getheaders()}, response.read()


def read_until_closed(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails after STATE_TIMEOUT_S)."""
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def parse_raw(response: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, content = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in header_lines)}
    return int(status_line.split()[1]), headers, json.loads(content)


@pytest.fixture(scope="module")
def roomy_server(engine_dir):
    """Bodies up to 200 kB, so that 10 000-deep nesting reaches the JSON parser instead of the body limit."""
    running = Server(engine_dir, "--max-body-bytes", "200000", "--max-steps", "8", "--default-steps", "2").wait_ready()
    yield running
    running.stop()


# ---------------------------------------------------------------- hostile bodies: 4xx naming the field


def nested(opening: bytes, closing: bytes, depth: int, inner: bytes = b"1") -> bytes:
    return opening * depth + inner + closing * depth


HOSTILE_BODIES = [
    # nesting past the parser's recursion limit, at the top and under a field
    (nested(b"[", b"]", 10_000, b""), 400, "body", "nests arrays or objects too deeply"),
    (nested(b'{"a":', b"}", 10_000), 400, "body", "nests arrays or objects too deeply"),
    (b'{"prompt": "a", "eta": ' + nested(b"[", b"]", 10_000) + b"}", 400, "body", "too deeply"),
    (b'{"prompt": "a", "negative_prompt": ' + nested(b'{"x":', b"}", 10_000) + b"}", 400, "body", "too deeply"),
    # nesting the parser reads but no field takes
    (nested(b"[", b"]", 500), 422, "body", "the body is an array nested 500 deep; expected a JSON object"),
    (b'{"prompt": "a", "seed": ' + nested(b"[", b"]", 500) + b"}", 422, "seed", "seed is an array or object "
                                                                                  "nested 500 deep"),
    (b'{"prompt": ' + nested(b'{"x":', b"}", 500) + b"}", 422, "prompt", "nested 500 deep"),
    # lone surrogates (valid JSON escapes, not Unicode) in each string field, in keys and inside values
    (b'{"prompt": "\\ud800"}', 422, "prompt", 'prompt is "\\ud800", which is not valid Unicode'),
    (b'{"prompt": "a red \\udfff circle"}', 422, "prompt", "not valid Unicode"),
    (b'{"prompt": "a", "negative_prompt": "\\ud83d"}', 422, "negative_prompt", "not valid Unicode"),
    (b'{"prompt": "a", "\\ud800": 1}', 422, "\\ud800", 'the field name "\\ud800" is not valid Unicode'),
    (b'{"\\udc00prompt": "a"}', 422, "\\udc00prompt", "not valid Unicode"),
    (b'{"prompt": "a", "eta": ["\\ud800"]}', 422, "eta", 'eta is ["\\ud800"]; expected a number from 0 to 1'),
    (b'{"prompt": {"\\ud800": "\\udfff"}}', 422, "prompt", 'prompt is {"\\ud800": "\\udfff"}'),
    (b'{"prompt": "a", "seed": "\\ud800"}', 422, "seed", "not valid Unicode"),
    # numbers no field holds
    (b'{"prompt": "a", "steps": 1e400}', 422, "steps", "steps is 1E+400; expected an integer from 1 to 8"),
    (b'{"prompt": "a", "n": -1e400}', 422, "n", "n is -1E+400"),
    (b'{"prompt": "a", "seed": 1' + b"0" * 400 + b"}", 422, "seed", "seed is 1000000"),
    (b'{"prompt": "a", "seed": 1' + b"0" * 5000 + b"}", 422, "seed", "expected an integer from 0 to 2**63 - 1"),
    (b'{"prompt": "a", "height": 1e999999999}', 422, "height", "height is 1E+999999999"),
    (b'{"prompt": "a", "width": 16.5}', 422, "width", "width is 16.5"),
    (b'{"prompt": "a", "guidance_scale": 1e400}', 422, "guidance_scale", "guidance_scale is 1E+400"),
    (b'{"prompt": "a", "eta": -1e400}', 422, "eta", "eta is -1E+400"),
    (b'{"prompt": "a", "eta": Infinity}', 400, "body", "Infinity is not valid JSON"),
    # exponents past what Decimal holds (about 10**18), anywhere in the body
    (b'{"prompt": "a", "steps": 1e1000000000000000000}', 422, "steps",
     "steps is 1e1000000000000000000; expected an integer from 1 to 8"),
    (b'{"prompt": "a", "eta": [-1e-9999999999999999999]}', 422, "eta", "expected a number from 0 to 1"),
    (b'{"prompt": "a", "unknown": [1E+1000000000000000000]}', 422, "unknown", "unknown is not a field"),
    (b'{"prompt": "a", "": 1}', 422, "", 'the field name "" is not a field of this request'),
    # bytes that are not UTF-8, an encoded surrogate among them
    (b'{"prompt": "\xed\xa0\x80"}', 400, "body", "the body is not UTF-8 (byte 12)"),
    (b'\xef\xbb\xbf{"prompt": "a"}', 400, "body", "the body starts with a byte order mark; expected a JSON object"),
]


@pytest.mark.parametrize("content, status, field, message", HOSTILE_BODIES,
                         ids=[f"{case[2]}-{index}" for index, case in enumerate(HOSTILE_BODIES)])
def test_hostile_bodies_get_a_4xx_naming_the_field_and_the_connection_stays_usable(roomy_server, content, status,
                                                                                    field, message):
    with connect(roomy_server) as connection:
        answered, headers, answer = exchange(connection, post_bytes(content))
        assert answered == status, answer
        error = json.loads(answer)["error"]
        assert error["field"] == field and message in error["message"], error
        assert "\n" not in error["message"] and len(error["message"]) < 400
        assert headers.get("connection") != "close"
        assert exchange(connection, GET_HEALTH)[0] == 200  # the same connection answers the next request
    assert "Traceback" not in roomy_server.log and "Exception" not in roomy_server.log


def test_odd_but_valid_unicode_reaches_the_tokenizer_and_the_png_text_chunk(roomy_server):
    from PIL import Image
    import io

    prompt = "un c\u0153ur \U0001f600 \u0000 \u202e\u200b\u0301 \ufffe \U0010ffff"
    negative_prompt = "\t\u3000\u2028"
    as_png = post(roomy_server.url, body(prompt=prompt, negative_prompt=negative_prompt, steps=2),
                  headers={**JSON, "Accept": "image/png"})
    assert as_png.status_code == 200, as_png.text
    parameters = json.loads(Image.open(io.BytesIO(as_png.content)).text["parameters"])
    assert (parameters["prompt"], parameters["negative_prompt"]) == (prompt, negative_prompt)
    as_json = post(roomy_server.url, body(prompt=prompt, negative_prompt=negative_prompt, steps=2))
    assert as_json.status_code == 200, as_json.text


def test_whole_number_floats_are_integers_and_seeds_wrap_at_2_63(roomy_server):
    """JSON Schema's "integer" is any whole number (2.0, 2e0), so the server takes them as the schema says; the
    seeds of n images from the largest seed wrap to 0 instead of being refused."""
    as_ints = post(roomy_server.url, body(steps=2, seed=5, n=2, height=16))
    as_floats = post(roomy_server.url, b'{"prompt": "a red circle", "steps": 2.0, "seed": 5e0, "n": 2.0, '
                                       b'"height": 16.0}')
    assert as_floats.status_code == 200, as_floats.text
    assert as_floats.json()["images"] == as_ints.json()["images"] and as_floats.json()["seeds"] == [5, 6]
    wrapped = post(roomy_server.url, body(steps=2, seed=2**63 - 1, n=2))
    assert wrapped.status_code == 200, wrapped.text
    assert wrapped.json()["seeds"] == [2**63 - 1, 0]
    assert wrapped.json()["images"][1] == post(roomy_server.url, body(steps=2, seed=0)).json()["images"][0]


def test_weird_headers_get_a_4xx_or_are_ignored(roomy_server):
    with connect(roomy_server) as connection:
        status, _, answer = exchange(connection, post_bytes(b'{"prompt": "a"}', b"Content-Type: text/\xff\xfe\r\n"))
        assert status == 415 and json.loads(answer)["error"]["field"] == "content-type"
        status, headers, _ = exchange(connection, post_bytes(json.dumps(body(steps=1)).encode(),
                                                             b"Content-Type: application/json\r\n"
                                                             b"Accept: image/png;q=nan, */*;q=1e400, \xff\r\n"))
        assert status == 200 and headers["content-type"] == "application/json"
    with connect(roomy_server) as connection:  # not HTTP at all: a JSON 400, then the connection closes
        connection.sendall(b"GARBAGE \x00\r\n\r\n")
        status, headers, answer = parse_raw(read_until_closed(connection))
        assert status == 400 and headers["connection"] == "close" and answer["error"]["type"] == "malformed_request"
    assert "Traceback" not in roomy_server.log


@pytest.mark.parametrize("headers, field, message", [
    ({"Content-Encoding": "gzip"}, "content-encoding", 'content encoding "gzip" is not supported; expected a body '
                                                       "sent as it is"),
    ({"Content-Type": "application/json; charset=utf-16"}, "content-type",
     'charset "utf-16" is not supported; expected UTF-8'),
])
def test_an_encoded_body_or_another_charset_gets_415_naming_the_header(roomy_server, headers, field, message):
    answer = post(roomy_server.url, body(steps=1), headers={**JSON, **headers})
    assert answer.status_code == 415 and answer.json()["error"]["field"] == field, answer.text
    assert message in answer.json()["error"]["message"]
    assert post(roomy_server.url, body(steps=1), headers={"Content-Type": 'application/json; charset="UTF-8"',
                                                          "Content-Encoding": "identity"}).status_code == 200


def test_head_answers_as_get_without_the_body_and_no_path_redirects(roomy_server):
    url = roomy_server.url
    for path in ("/", "/healthz", "/readyz", "/metrics", "/openapi.json"):
        got, head = httpx.get(f"{url}{path}"), httpx.head(f"{url}{path}")
        assert (head.status_code, head.content) == (got.status_code, b""), path
        assert head.headers["content-type"] == got.headers["content-type"], path
    assert httpx.head(f"{url}/v1/images").status_code == 405
    for method, path in (("DELETE", "/v1/images/"), ("GET", "/metrics/"), ("POST", "/v1/images/")):
        answer = httpx.request(method, f"{url}{path}", headers={"Host": "127.0.0.1:9999"})
        assert answer.status_code == 404 and "location" not in answer.headers, (method, path, answer.text)
        assert f'path "{path}" does not exist' in answer.json()["error"]["message"]


def test_a_body_with_both_transfer_encoding_and_content_length_is_400_and_the_connection_closes(roomy_server):
    content = json.dumps(body(steps=1)).encode()
    chunked = f"{len(content):x}\r\n".encode() + content + b"\r\n0\r\n\r\n"
    request = (b"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n" + chunked + GET_HEALTH)
    with connect(roomy_server) as connection:
        connection.sendall(request)
        answered = read_until_closed(connection)  # the health request sent behind it is never answered
    assert answered.count(b"HTTP/1.1 ") == 1, answered
    status, headers, answer = parse_raw(answered)
    assert status == 400 and headers["connection"] == "close", answered
    assert answer["error"]["field"] == "content-length" and "both Transfer-Encoding and Content-Length" in (
        answer["error"]["message"])


# ---------------------------------------------------------------- an unexpected error keeps the connection


def test_an_unexpected_exception_answers_a_json_500_and_leaves_the_connection_usable():
    """Whatever escapes the app (a bug) is logged with its traceback and answered with a JSON 500 on a connection
    that stays open; uvicorn alone would drop it without ``Connection: close``."""
    import uvicorn
    from fastapi import FastAPI

    from ldm_serve.middleware import ErrorSafetyMiddleware
    from ldm_serve.protocol import GuardedH11Protocol

    app = FastAPI()
    failures = []

    @app.get("/fails")
    async def fails() -> dict:
        raise RuntimeError("a bug")

    @app.get("/works")
    async def works() -> dict:
        return {"ok": True}

    app.add_middleware(ErrorSafetyMiddleware, on_error=lambda: failures.append(1))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    protocol = lambda *args, **kwargs: GuardedH11Protocol(*args, header_timeout_s=30, body_timeout_s=30,  # noqa
                                                          **kwargs)
    server = uvicorn.Server(uvicorn.Config(app, http=protocol, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + STATE_TIMEOUT_S
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.01)
        with socket.create_connection(listener.getsockname(), timeout=STATE_TIMEOUT_S) as connection:
            status, headers, answer = exchange(connection, b"GET /fails HTTP/1.1\r\nHost: test\r\n\r\n")
            assert status == 500 and headers.get("connection") != "close"
            assert json.loads(answer)["error"]["type"] == "internal" and b"a bug" not in answer
            assert exchange(connection, b"GET /works HTTP/1.1\r\nHost: test\r\n\r\n")[:3:2] == (200, b'{"ok":true}')
        assert failures == [1]
    finally:
        server.should_exit = True
        thread.join(STATE_TIMEOUT_S)


# ---------------------------------------------------------------- read timeouts and the drain


@pytest.fixture(scope="module")
def impatient_server(engine_dir):
    """Two seconds for a header and two for a body: short enough to wait for, long for any client that sends."""
    running = Server(engine_dir, "--header-timeout", "2", "--body-timeout", "2").wait_ready()
    yield running
    running.stop()


def test_half_sent_headers_and_bodies_get_408_and_are_closed_while_other_clients_are_served(impatient_server):
    started = time.monotonic()
    half_header = connect(impatient_server)
    half_header.sendall(b"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
    half_body = connect(impatient_server)
    half_body.sendall(post_bytes(json.dumps(body()).encode())[:-10])
    silent = connect(impatient_server)
    kept_alive = connect(impatient_server)
    assert exchange(kept_alive, GET_HEALTH)[0] == 200
    kept_alive.sendall(b"GET /heal")  # half the header of its second request
    assert post(impatient_server.url, body(steps=2)).status_code == 200  # served while the four wait
    for connection, field in ((half_header, None), (half_body, "body"), (kept_alive, None)):
        status, headers, answer = parse_raw(read_until_closed(connection))
        assert status == 408 and headers["connection"] == "close", answer
        assert answer["error"]["type"] == "request_timeout" and answer["error"]["field"] == field
    assert read_until_closed(silent) == b""  # not a byte of a request: closed without an answer
    assert time.monotonic() - started >= 2
    for connection in (half_header, half_body, silent, kept_alive):
        connection.close()
    assert impatient_server.process.poll() is None and "Traceback" not in impatient_server.log


def send_half_a_body(server: Server) -> socket.socket:
    """A POST whose body stops half-way, once the server is reading it (its 100 Continue has arrived)."""
    connection = connect(server)
    content = json.dumps(body()).encode()
    connection.sendall(b"POST /v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Expect: 100-continue\r\n" + f"Content-Length: {len(content)}\r\n\r\n".encode())
    assert connection.recv(1024).startswith(b"HTTP/1.1 100 ")
    connection.sendall(content[:len(content) // 2])
    return connection


@pytest.mark.slow
def test_sigterm_with_a_half_sent_body_and_a_stuck_request_exits_0_within_the_drain_time(engine_dir):
    """The half-sent body is answered 503 at once; the request the step gate holds for ever gets 503 when the
    drain time (3 s) is up; then the process exits 0. Read timeouts are long, so only the drain ends them."""
    server = Server(engine_dir, "--drain-timeout", "3", "--header-timeout", "600", "--body-timeout", "600")
    server.wait_ready()
    results: list[httpx.Response] = []
    try:
        server.hold()
        stuck = threading.Thread(target=lambda: results.append(post(server.url, body())))
        stuck.start()
        server.wait_for("ldm_serve_queue_depth", lambda value: value == 1, "the request never queued")
        half = send_half_a_body(server)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        status, headers, answer = parse_raw(read_until_closed(half))
        assert status == 503 and answer["error"]["type"] == "draining" and int(headers["retry-after"]) >= 1
        assert server.process.wait(STATE_TIMEOUT_S) == 0, server.log
        stuck.join(STATE_TIMEOUT_S)
        assert time.monotonic() - signalled >= 3  # the stuck request had the whole drain time
    finally:
        server.release()
        server.stop()
    assert [response.status_code for response in results] == [503]
    assert results[0].json()["error"]["type"] == "draining" and "retry-after" in results[0].headers
    assert "drained and stopped" in server.log and "Traceback" not in server.log


# ---------------------------------------------------------------- the queue gauge


@pytest.fixture(scope="module")
def held_server(engine_dir):
    running = Server(engine_dir, "--max-queue", "8").wait_ready()
    yield running
    running.stop()


def test_a_queued_request_whose_client_leaves_leaves_the_queue_gauge(held_server):
    """Jobs withdrawn by the event loop (the client went while queued) leave the gauge as well as the queue."""
    left_before = held_server.metric('ldm_serve_requests_total{outcome="disconnected"}')
    with held_server.held():
        connections = [connect(held_server) for _ in range(3)]
        for seed, connection in enumerate(connections):
            connection.sendall(post_bytes(json.dumps(body(seed=seed)).encode()))
        held_server.wait_for("ldm_serve_queue_depth", lambda value: value == 3, "the requests never queued")
        for connection in connections[:2]:
            connection.close()
        held_server.wait_for('ldm_serve_requests_total{outcome="disconnected"}',
                             lambda value: value == left_before + 2, "the server never noticed the two leave")
        assert held_server.metric("ldm_serve_queue_depth") == 1
        assert httpx.get(f"{held_server.url}/readyz").json()["queue_depth"] == 1
    response = http.client.HTTPResponse(connections[2])
    response.begin()
    assert response.status == 200
    connections[2].close()
    held_server.wait_for("ldm_serve_queue_depth", lambda value: value == 0, "the gauge stayed above 0")


# ---------------------------------------------------------------- the API key


NON_ASCII_KEY = "cl\u00e9-\U0001f511-s\u00e9same"


@pytest.fixture(scope="module", params=["file", "environment"])
def keyed_server(engine_dir, tmp_path_factory, request):
    if request.param == "file":
        key_file = tmp_path_factory.mktemp("key") / "key.txt"
        key_file.write_text(f"  {NON_ASCII_KEY}\n", encoding="utf-8")
        running = Server(engine_dir, "--api-key-file", str(key_file))
        running.auth = {"Authorization": b"Bearer " + NON_ASCII_KEY.encode("utf-8")}
    else:
        running = Server(engine_dir, env={"LDM_SERVE_API_KEY": NON_ASCII_KEY})
    yield running.wait_ready()
    running.stop()


def test_a_non_ascii_api_key_matches_as_utf_8_and_nothing_else_does(keyed_server):
    url = keyed_server.url
    right = keyed_server.auth
    assert post(url, body(steps=1), headers={**JSON, **right}).status_code == 200
    assert httpx.get(f"{url}/metrics", headers=right).status_code == 200
    wrong = [b"Bearer " + NON_ASCII_KEY.encode("utf-8", "replace")[:-1],
             b"Bearer cl\xe9-s\xe9same",  # Latin-1 bytes of a similar key
             b"Bearer \xff\xfe\xed\xa0\x80",  # not UTF-8 at all
             b"Basic " + NON_ASCII_KEY.encode("utf-8"),
             NON_ASCII_KEY.encode("utf-8")]
    for authorization in wrong:
        for response in (post(url, body(), headers={**JSON, "Authorization": authorization}),
                         httpx.get(f"{url}/openapi.json", headers={"Authorization": authorization})):
            assert response.status_code == 401, (authorization, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["field"] == "authorization" and "s\u00e9same" not in response.text
    two_keys = post_bytes(b"{}", b"Content-Type: application/json\r\nAuthorization: " + right["Authorization"]
                          + b"\r\nAuthorization: Bearer x\r\n")
    with connect(keyed_server) as connection:
        assert exchange(connection, two_keys)[0] == 401
    right_twice = post_bytes(b"{}", b"Content-Type: application/json\r\nAuthorization: " + right["Authorization"]
                             + b"\r\nAuthorization: " + right["Authorization"] + b"\r\n")
    with connect(keyed_server) as connection:
        status, _, answer = exchange(connection, right_twice)
        assert status == 401 and "the request has 2 Authorization headers" in json.loads(answer)["error"]["message"]
    assert httpx.get(f"{url}/healthz").status_code == 200 and httpx.get(f"{url}/readyz").status_code == 200
    assert "Traceback" not in keyed_server.log


def test_the_schema_declares_the_bearer_key_on_every_route_but_the_health_probes(keyed_server):
    schema = httpx.get(f"{keyed_server.url}/openapi.json", headers=keyed_server.auth).json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "The API key ldm-serve was started with."}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            if path in ("/healthz", "/readyz"):
                assert operation["security"] == [], path
            else:
                assert operation["security"] == [{"bearer": []}] and "401" in operation["responses"], path


def test_help_says_which_routes_the_api_key_protects_and_lists_the_timeouts():
    result = subprocess.run([sys.executable, "-m", "ldm_serve.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert ("on every route but the page /, /healthz and /readyz: /v1/images, /v1/images/generations, "
            "/v1/images/edits, /metrics, /openapi.json and /docs") in text
    for flag in ("--header-timeout", "--body-timeout", "--drain-timeout"):
        assert flag in text


# ---------------------------------------------------------------- 200 clients at once, then SIGTERM


@pytest.mark.slow
def test_200_clients_against_a_short_queue_get_200_or_429_and_sigterm_drains_past_a_half_sent_body(engine_dir):
    """With the worker held, 200 concurrent clients meet a queue of 4: four wait, 196 get 429 with Retry-After at
    once; SIGTERM with a half-sent body pending answers that one 503, the four finish when the gate opens, and the
    process exits 0. Nothing is lost: every client has exactly one answer."""
    server = Server(engine_dir, "--max-queue", "4", "--drain-timeout", "60").wait_ready()
    clients = 200

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=STATE_TIMEOUT_S * 2, limits=limits) as client:
            with server.held():
                sending = asyncio.gather(*(client.post(f"{server.url}/v1/images", headers=JSON,
                                                       content=json.dumps(body(seed=seed, steps=2)))
                                           for seed in range(clients)), return_exceptions=True)
                sending = asyncio.ensure_future(sending)
                await asyncio.to_thread(server.wait_for, 'ldm_serve_requests_total{outcome="queue_full"}',
                                        lambda value: value == clients - 4, "the 196 refusals never all came")
                assert server.metric("ldm_serve_queue_depth") == 4
                half = await asyncio.to_thread(send_half_a_body, server)
                server.process.send_signal(signal.SIGTERM)
                status, _, answer = parse_raw(await asyncio.to_thread(read_until_closed, half))
                assert status == 503 and answer["error"]["type"] == "draining"
                half.close()
            return await sending

    try:
        responses = asyncio.run(run())
        assert server.process.wait(STATE_TIMEOUT_S) == 0, server.log
    finally:
        server.stop()
    errors = [response for response in responses if not isinstance(response, httpx.Response)]
    assert not errors, errors[:3]
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * 4 + [429] * (clients - 4)
    assert all(int(response.headers["retry-after"]) >= 1 for response in responses if response.status_code == 429)
    assert "drained and stopped" in server.log and "Traceback" not in server.log
