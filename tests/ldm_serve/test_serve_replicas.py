"""``ldm-serve --replicas N`` on a real local Ray instance on loopback: two replicas answer concurrent requests,
both take work, and every image is byte for byte the one single-process ``ldm-serve`` makes; Ray Serve's
back-pressure answers 429 with ``Retry-After``; a replica killed while it holds requests is replaced and every
request gets an image or a 503 with ``Retry-After``; SIGTERM lets the held requests finish and ends with status 0;
``--min-replicas``/``--max-replicas`` scale up under load; a streamed request hears its place and steps through
Ray Serve's proxy as they happen, gets the bytes it gets unstreamed, and a ``DELETE`` that reaches the replica not
holding it still cancels it. Bad replica flags, and ``--replicas`` without Ray, are
one line each.

No test depends on the machine's speed: every replica holds its requests at the step gate (``LDM_SERVE_STEP_GATE``,
which the replicas inherit) until the test has seen that they hold what it needs, in the reports their held workers
write beside the gate (``StepGate.report``), one per replica process. Each answer names
its replica in ``X-Ldm-Replica``, which is how the test tells the replicas apart behind Ray Serve's proxy.

The Ray tests skip where Ray is not installed, unless ``LDM_REQUIRE_RAY=1`` (as ``.ci/run`` sets it, after
installing the ``ray`` extra), when they fail instead. They run in one xdist group, one Ray instance at a time."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ldm_tools.serve_process import free_port
from tests.ldm_serve.gated_server import JSON, Server, StreamedRequest, body, post_all

REQUIRE_ENV = "LDM_REQUIRE_RAY"
RAY_START_TIMEOUT_S = 600  # a local Ray instance and two replicas, each loading the engine, on two busy cores
STATE_TIMEOUT_S = 300  # for a state that needs Ray to act: a replica replaced, one added by the autoscaler
REPLICA_PROCESS = "ServeReplica:ldm-serve"  # in the process title Ray gives a replica of the deployment

RAY_TEST_TIMEOUT_S = 1800  # pytest-timeout's limit for a Ray test: Ray starting on busy cores takes minutes


def ray_test(test):
    """A test on a local Ray instance: in the Ray xdist group, slow, and with Ray's time limit."""
    return pytest.mark.xdist_group("ray")(pytest.mark.slow(pytest.mark.timeout(RAY_TEST_TIMEOUT_S)(test)))


def require_ray() -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"ray is not installed, and {REQUIRE_ENV}=1 requires the replica tests to run")
        pytest.skip("ray is not installed (pip install 'ldm-runtime[ray]')")


class Replicas(Server):
    """``ldm-serve`` with replicas on a local Ray instance. ``hold_all()`` holds every replica before its first
    step; ``wait_for_held`` waits on what each replica's held worker reports it holds (``StepGate.report``),
    by process id."""

    def __init__(self, model: Path, *flags: str):
        super().__init__(model, "--port", str(free_port()), *flags, start_timeout_s=RAY_START_TIMEOUT_S)

    def hold_all(self) -> None:
        for report in self.gate.parent.glob(f"{self.gate.name}.held-*"):
            report.unlink()
        partial = self.gate.with_suffix(".partial")
        partial.write_text("0")
        partial.replace(self.gate)

    def held_counts(self) -> dict[int, int]:
        """``{replica's process id: requests it holds, queued and running}`` as the held replicas report them."""
        counts = {}
        for report in self.gate.parent.glob(f"{self.gate.name}.held-*"):
            if not report.name.endswith(".partial"):
                queued, running = report.read_text().split()
                counts[int(report.name.rsplit("-", 1)[1])] = int(queued) + int(running)
        return counts

    def wait_for_held(self, total: int) -> dict[int, int]:
        deadline = time.monotonic() + STATE_TIMEOUT_S
        while sum((counts := self.held_counts()).values()) < total:
            assert self.process.poll() is None, self.log
            assert time.monotonic() < deadline, f"the replicas hold {counts}, not {total} requests\n{self.log}"
            time.sleep(0.02)
        return counts

    def replica_of(self) -> str | None:
        response = httpx.get(f"{self.url}/healthz", timeout=60)
        assert self.process.poll() is None, self.log
        return response.headers.get("x-ldm-replica")

    def wait_for_replicas(self, predicate, what: str) -> set[str]:
        """Poll ``/healthz`` until the set of replicas that answered in the last 40 polls satisfies ``predicate``."""
        recent: list[str] = []
        deadline = time.monotonic() + STATE_TIMEOUT_S
        while not predicate(set(recent)):
            assert time.monotonic() < deadline, f"{what}: recent replicas {set(recent)}\n{self.log}"
            replica = self.replica_of()
            if replica is not None:
                recent = [*recent[-39:], replica]
            time.sleep(0.02)
        return set(recent)


def replica_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if REPLICA_PROCESS in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


async def answered_while_held(url: str, payloads: list[dict], answers_first: int, release) -> list[httpx.Response]:
    """Send ``payloads`` at once; once ``answers_first`` of them are answered (those refused while the replicas
    hold their requests), call ``release()``, then wait for the rest (those that waited in Ray Serve's proxy)."""
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=len(payloads) + 1)) as client:
        sent = [asyncio.ensure_future(client.post(f"{url}/v1/images", json=payload)) for payload in payloads]
        deadline = time.monotonic() + STATE_TIMEOUT_S
        while sum(task.done() for task in sent) < answers_first:
            assert time.monotonic() < deadline, f"only {sum(task.done() for task in sent)} answered while held"
            await asyncio.sleep(0.02)
        release()
        return await asyncio.gather(*sent)


async def post_all_retrying(url: str, payloads: list[dict]) -> list[httpx.Response]:
    """``payloads`` at once, each retried after ``Retry-After`` while it is answered 429, as a client of a busy
    server does: Ray Serve's proxy may refuse a few of a burst that arrives at once even below its limits (its
    count of waiting requests is approximate), which these tests do not test."""
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=len(payloads) + 1)) as client:
        async def post_one(payload: dict) -> httpx.Response:
            deadline = time.monotonic() + STATE_TIMEOUT_S
            while (response := await client.post(f"{url}/v1/images", json=payload)).status_code == 429:
                assert time.monotonic() < deadline, response.text
                await asyncio.sleep(int(response.headers["retry-after"]))
            return response

        return await asyncio.gather(*(post_one(payload) for payload in payloads))


def retry_or_image(response: httpx.Response) -> bool:
    return response.status_code == 200 or (response.status_code == 503 and int(response.headers["retry-after"]) >= 1)


def test_replicas_without_ray_say_what_to_install_in_one_line(engine_dir):
    hide_ray = ("import sys; sys.modules['ray'] = None; from ldm_serve.cli import main; "
                f"sys.exit(main(['--model', {str(engine_dir)!r}, '--replicas', '2']))")
    result = subprocess.run([sys.executable, "-c", hide_ray], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("ldm-serve: error: --replicas needs Ray Serve, which is not installed; expected pip "
                             "install 'ldm-runtime[ray]'\n")


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "0"], "--replicas is 0; expected an integer >= 1"),
    (["--min-replicas", "0", "--max-replicas", "2"], "--min-replicas is 0; expected an integer >= 1"),
    (["--min-replicas", "3", "--max-replicas", "2"],
     "--max-replicas is 2; expected an integer >= 3 (--min-replicas)"),
    (["--min-replicas", "2"], "--min-replicas is 2 without --max-replicas; expected both"),
    (["--replicas", "5", "--min-replicas", "1", "--max-replicas", "2"],
     "--replicas is 5; expected an integer from 1 to 2 (from --min-replicas to --max-replicas)"),
    (["--replicas", "2", "--port", "0"], "--port is 0 with --replicas; expected a fixed port"),
    (["--ray-address", "10.0.0.1:6379"], "--ray-address is 10.0.0.1:6379 without --replicas; expected --replicas N"),
])
def test_bad_replica_flags_are_one_line_before_any_work(engine_dir, flags, message):
    result = subprocess.run([sys.executable, "-m", "ldm_serve.cli", "--model", str(engine_dir), *flags],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"ldm-serve: error: {message}") and result.stderr.count("\n") == 1, result.stderr


def test_a_worker_that_stopped_is_unready_and_fails_the_replica_health_check(monkeypatch):
    from ldm_serve.routes import readiness
    from ldm_serve.batcher import Batcher, BatcherConfig

    monkeypatch.setattr(Batcher, "_run", lambda self: None)  # the worker thread ends at once, as if it had died
    batcher = Batcher(pipeline=None, config=BatcherConfig())
    assert batcher.alive and readiness(batcher).type == "warming_up"  # not started yet
    batcher.start()
    batcher._thread.join(STATE_TIMEOUT_S)
    problem = readiness(batcher)
    assert not batcher.alive and problem.status == 503 and problem.type == "worker_stopped"
    require_ray()
    from ldm_serve.replicas import LdmServeReplica

    replica = LdmServeReplica(args=None, api_key=None)
    replica.check_health()  # before the app is built: nothing to check yet
    replica.batcher = batcher
    with pytest.raises(RuntimeError, match="the engine's worker thread has stopped"):
        replica.check_health()
    batcher.drain()
    replica.check_health()  # draining: finishing its requests, healthy


def test_the_proxy_close_stops_listening_then_answers_what_it_accepted_before_it_answers(monkeypatch):
    """The end of a drain, in the proxy's middleware on a plain uvicorn server: the driver's close request (with
    the token) makes the server refuse new connections at once, close an idle keep-alive connection, and answer
    only after the request it was holding is answered (with ``Connection: close``); a close request without the
    token is the application's, like any other path."""
    require_ray()
    import threading

    import uvicorn

    from ldm_serve import replicas

    monkeypatch.setenv(replicas.PROXY_CLOSE_TOKEN_ENV, "the-token")
    monkeypatch.setattr(replicas.ReplicaFailureAs503, "closing", False)
    monkeypatch.setattr(replicas, "PROXY_CLOSE_WAIT_S", STATE_TIMEOUT_S)  # the held request decides, not a clock
    held, release = threading.Event(), threading.Event()

    async def application(scope, receive, send):
        if scope["path"] == "/held":
            held.set()
            await asyncio.to_thread(release.wait, STATE_TIMEOUT_S)
        status, body = (200, b"image") if scope["path"] == "/held" else (404, b"not found")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(body)).encode()), (b"x-ldm-replica", b"r1")]})
        await send({"type": "http.response.body", "body": body})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(replicas.ReplicaFailureAs503(application), host="127.0.0.1", port=port,
                                           lifespan="off", log_level="warning"))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    try:
        deadline = time.monotonic() + STATE_TIMEOUT_S
        while not server.started:
            assert serving.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)

        def post(path: str, token: str | None = None, **extra: str) -> tuple[int, dict, bytes]:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=STATE_TIMEOUT_S)
            headers = {**extra, **({replicas.PROXY_CLOSE_TOKEN_HEADER: token} if token is not None else {})}
            connection.request("POST", path, headers=headers)
            response = connection.getresponse()
            answer = response.status, {key.lower(): value for key, value in response.getheaders()}, response.read()
            connection.close()
            return answer

        assert post(replicas.PROXY_CLOSE_PATH)[0] == 404  # no token: the application's path
        assert post(replicas.PROXY_CLOSE_PATH, "another-token")[0] == 404
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=STATE_TIMEOUT_S)
        idle.request("GET", "/anything")
        assert idle.getresponse().read() == b"not found"  # answered; the connection stays open, idle

        answers: dict[str, tuple] = {}
        held_request = threading.Thread(target=lambda: answers.setdefault("held", post("/held")))
        held_request.start()
        assert held.wait(STATE_TIMEOUT_S)
        closing = threading.Thread(target=lambda: answers.setdefault("close", post(
            replicas.PROXY_CLOSE_PATH, "the-token", **{replicas.PROXY_CLOSE_WAIT_HEADER: "1e9"})))
        closing.start()
        while True:  # the listener closes: a new client is refused, as by a stopped server
            try:
                socket.create_connection(("127.0.0.1", port), timeout=STATE_TIMEOUT_S).close()
            except ConnectionRefusedError:
                break
            except ConnectionResetError:  # it reached the backlog of the listener being closed: try again
                pass
            assert time.monotonic() < deadline and closing.is_alive(), answers
            time.sleep(0.01)
        assert idle.sock.recv(1) == b""  # the idle keep-alive connection is closed (blocks until it is)
        assert closing.is_alive() and held_request.is_alive(), answers  # the close waits for the held request
        release.set()
        held_request.join(STATE_TIMEOUT_S)
        closing.join(STATE_TIMEOUT_S)
        status, headers, body = answers["held"]
        assert (status, body, headers["connection"]) == (200, b"image", "close")
        status, _, body = answers["close"]
        assert status == 200 and json.loads(body) == {"open_connections": 0}, body
    finally:
        release.set()
        server.should_exit = True
        serving.join(STATE_TIMEOUT_S)


def test_replicas_on_a_port_in_use_are_one_line_before_ray_starts(engine_dir):
    require_ray()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "ldm_serve.cli", "--model", str(engine_dir),
                                 "--replicas", "2", "--port", str(port)], capture_output=True, text=True,
                                timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"ldm-serve: error: cannot listen on 127.0.0.1:{port} (Address already in use); "
                             f"expected a free port on a local address\n")


@ray_test
def test_the_autoscaler_adds_a_replica_under_load_and_every_request_is_answered(engine_dir):
    require_ray()
    replicas = Replicas(engine_dir, "--min-replicas", "1", "--max-replicas", "2", "--max-queue", "16")
    try:
        replicas.wait_ready()
        first = replicas.wait_for_replicas(lambda seen: len(seen) == 1, "no replica answers")
        replicas.hold_all()

        async def load() -> list[httpx.Response]:
            # 12 requests against a target of 4 ongoing per replica: the autoscaler wants 2 replicas (its maximum)
            sent = asyncio.ensure_future(post_all(replicas.url, [body(seed=seed) for seed in range(12)]))
            await asyncio.to_thread(replicas.wait_for_replicas, lambda seen: len(seen | first) == 2,
                                    "no second replica was started")
            replicas.release()
            return await sent

        responses = asyncio.run(load())
        assert [response.status_code for response in responses] == [200] * 12, [r.text for r in responses]
    finally:
        replicas.release()
        assert replicas.stop(timeout_s=120) == 0, replicas.log


@pytest.fixture(scope="module")
def two_replicas_started(engine_dir):
    """Two replicas (a queue of 8 each) on one local Ray instance, shared by the tests below as Ray takes minutes to
    start on busy cores: a function that returns them running, started again if a test has stopped them. The
    SIGTERM test stops them, so it comes last; the autoscaler test comes before, so one Ray instance runs at a time."""
    started: list[Replicas] = []

    def running() -> Replicas:
        if not started or started[-1].process.poll() is not None:
            started.append(Replicas(engine_dir, "--replicas", "2", "--max-queue", "8", "--max-steps", "999"))
            started[-1].wait_ready()
        return started[-1]

    yield running
    for replicas in started:
        replicas.release()
        replicas.stop(timeout_s=120)


@pytest.fixture
def two_replicas(two_replicas_started):
    require_ray()
    replicas = two_replicas_started()
    yield replicas
    replicas.release()


@ray_test
def test_both_replicas_take_work_from_concurrent_requests(two_replicas, rng):
    bodies = [body(seed=int(rng.integers(0, 2**62)), steps=2, n=1 + index % 2) for index in range(16)]
    responses = asyncio.run(post_all_retrying(two_replicas.url, bodies))
    assert [response.status_code for response in responses] == [200] * len(bodies), responses[0].text
    assert len({response.headers["x-ldm-replica"] for response in responses}) == 2


@ray_test
def test_the_replicas_give_the_bytes_one_process_gives(two_replicas, engine_dir, rng):
    bodies = [body(seed=int(rng.integers(0, 2**62)), steps=2, n=1 + index % 2) for index in range(8)]
    together = asyncio.run(post_all_retrying(two_replicas.url, bodies))
    single = Server(engine_dir).wait_ready()
    try:
        alone = asyncio.run(post_all(single.url, bodies))
    finally:
        single.stop()
    assert [response.status_code for response in together + alone] == [200] * 2 * len(bodies), together[0].text
    assert [response.json()["images"] for response in together] == [response.json()["images"] for response in alone]


@ray_test
def test_a_stream_through_the_proxy_hears_each_event_as_it_happens_and_gets_the_unstreamed_bytes(two_replicas, rng):
    payload = body(seed=int(rng.integers(0, 2**62)), steps=3, n=2)
    two_replicas.hold_all()
    streamed = StreamedRequest(two_replicas.url, {**payload, "stream": True})
    try:
        assert streamed.response.status_code == 200 and "x-ldm-replica" in streamed.response.headers
        name, first = streamed.next()  # while its replica holds it: the proxy passes each event on as it comes
        assert name == "queued" and first["id"] == streamed.response.headers["x-request-id"]
        two_replicas.release()
        events = streamed.rest()
    finally:
        streamed.close()
    assert [data["step"] for name, data in events if name == "progress"] == [0, 1, 2]
    completed = [data for name, data in events if name == "completed"]
    unstreamed = asyncio.run(post_all_retrying(two_replicas.url, [payload]))[0]
    assert unstreamed.status_code == 200, unstreamed.text
    assert completed and completed[0]["images"] == unstreamed.json()["images"]


@ray_test
def test_a_delete_that_reaches_the_replica_not_holding_the_request_cancels_it(two_replicas, rng):
    # Ray Serve routes each DELETE to either replica (the less busy of the two it samples: most often the one not
    # holding the request): held requests are cancelled one by one until a DELETE has reached the other replica
    crossed = 0
    two_replicas.hold_all()
    for seed in range(20):
        chosen = f"client-{rng.integers(0, 2**62):x}"  # a client's own X-Request-Id is the request's id
        streamed = StreamedRequest(two_replicas.url, body(seed=seed, steps=999, stream=True),
                                   headers={**JSON, "X-Request-Id": chosen})
        try:
            request_id = streamed.next()[1]["id"]
            assert request_id == chosen == streamed.response.headers["x-request-id"]
            holder = streamed.response.headers["x-ldm-replica"]
            cancelled = httpx.delete(f"{two_replicas.url}/v1/images/{request_id}", timeout=60)
            assert cancelled.status_code == 200, cancelled.text
            assert cancelled.json() == {"id": request_id, "status": "cancelled"}
            error = streamed.rest()
            assert [name for name, _ in error] == ["error"] and error[0][1]["error"]["type"] == "cancelled", error
            again = httpx.delete(f"{two_replicas.url}/v1/images/{request_id}", timeout=60)
            assert again.status_code == 404 and again.json()["error"]["field"] == "id", again.text
        finally:
            streamed.close()
        crossed += cancelled.headers["x-ldm-replica"] != holder
        if crossed:
            break
    assert crossed, "every DELETE reached the replica holding its request"
    unknown = httpx.delete(f"{two_replicas.url}/v1/images/{'0' * 24}", timeout=60)
    assert unknown.status_code == 404, unknown.text


@ray_test
def test_a_burst_past_the_queues_gets_429_with_retry_after_from_ray_serve_and_the_rest_finish(two_replicas):
    # 40 requests at once while the replicas hold theirs: each replica takes 8 (its queue), about 8 more wait in the
    # proxy (Ray Serve's count of them is approximate), and Ray Serve answers the others 429 with Retry-After; once
    # the first 429 is in, the held and waiting ones are let go and finish. (Nothing polls /metrics here: through
    # the proxy it too would wait for a free slot.)
    two_replicas.hold_all()
    burst = asyncio.run(answered_while_held(two_replicas.url, [body(seed=seed) for seed in range(100, 140)], 1,
                                            two_replicas.release))
    refused = [response for response in burst if response.status_code == 429]
    assert refused and len(refused) + [r.status_code for r in burst].count(200) == 40, \
        [(r.status_code, r.text) for r in burst if r.status_code not in (200, 429)]
    assert all("x-ldm-replica" not in response.headers for response in refused)  # Ray Serve's, not a replica's
    assert all(int(response.headers["retry-after"]) >= 1 for response in refused)


@ray_test
def test_a_replica_killed_holding_requests_answers_each_with_an_image_or_503_and_is_replaced(two_replicas, rng):
    bodies = [body(seed=int(rng.integers(0, 2**62)), steps=2) for _ in range(4)]
    first = asyncio.run(post_all_retrying(two_replicas.url, bodies))
    before = two_replicas.wait_for_replicas(lambda seen: len(seen) == 2, "the two replicas do not both answer")
    two_replicas.hold_all()

    async def kill_one() -> list[httpx.Response]:
        sent = asyncio.ensure_future(post_all_retrying(two_replicas.url, [body(seed=seed, steps=3)
                                                                          for seed in range(6)]))
        held = await asyncio.to_thread(two_replicas.wait_for_held, 6)
        busiest = max(held, key=held.get)
        assert busiest in replica_pids(), (held, replica_pids())
        os.kill(busiest, signal.SIGKILL)
        two_replicas.release()
        return await sent

    after_kill = asyncio.run(kill_one())
    assert all(retry_or_image(response) for response in after_kill), [(r.status_code, r.text) for r in after_kill]
    assert 200 in {response.status_code for response in after_kill}
    if any(response.status_code == 503 for response in after_kill):
        assert next(r for r in after_kill if r.status_code == 503).json()["error"]["type"] == "replica_unavailable"
    two_replicas.wait_for_replicas(lambda seen: len(seen) == 2 and seen - before, "the killed replica was not replaced")
    again = asyncio.run(post_all_retrying(two_replicas.url, bodies))
    assert [response.json()["images"] for response in again] == [response.json()["images"] for response in first]


@ray_test
def test_sigterm_lets_the_held_requests_finish_answers_late_ones_503_or_an_image_and_exits_0(two_replicas):
    two_replicas.hold_all()

    async def drain() -> tuple[list[httpx.Response], httpx.Response]:
        sent = asyncio.ensure_future(post_all(two_replicas.url, [body(seed=seed, steps=3) for seed in range(4)]))
        await asyncio.to_thread(two_replicas.wait_for_held, 4)
        two_replicas.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STATE_TIMEOUT_S
        while "draining the replicas" not in two_replicas.log:
            assert time.monotonic() < deadline, two_replicas.log
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(timeout=120) as client:  # sent while the drain waits for the held ones
            late = asyncio.ensure_future(client.post(f"{two_replicas.url}/v1/images", json=body(seed=99)))
            # it is answered 503 at once, or reached a replica before the routes changed and is held there
            while not late.done() and sum(two_replicas.held_counts().values()) < 5:
                assert time.monotonic() < deadline, two_replicas.log
                await asyncio.sleep(0.02)
            two_replicas.release()
            return await sent, await late

    drained, late = asyncio.run(drain())
    assert [response.status_code for response in drained] == [200] * 4, [r.text for r in drained]
    assert retry_or_image(late), (late.status_code, late.text)
    assert two_replicas.process.wait(STATE_TIMEOUT_S) == 0, two_replicas.log
    assert "Traceback" not in two_replicas.log, two_replicas.log
    # the proxy stopped listening and answered what it held before Ray Serve stopped it
    assert "drained and stopped (1 proxy closed gracefully)" in two_replicas.log, two_replicas.log
