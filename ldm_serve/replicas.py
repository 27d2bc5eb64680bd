"""``ldm-serve --replicas N``: the same app as ``ldm-serve`` in N Ray Serve replicas behind Ray Serve's HTTP proxy.

Each replica is a Ray actor that loads the engine and builds the app exactly as one ``ldm-serve`` process does
(``server.build_app``): its own step-level batcher, queue, limits, errors, API key and metrics; every answer it gives
names it in ``X-Ldm-Replica``. Ray Serve's proxy listens on ``--host``/``--port`` and routes each request to the
least loaded of two replicas it samples (Ray Serve's power-of-two-choices router).

What Ray Serve is told, so that a client sees what one ``ldm-serve`` process gives:

- Ray Serve sends a replica at most ``max(--max-queue, --max-batch)`` requests at once, running or waiting
  (``max_ongoing_requests``): its own queue never overflows, and a full batch fits. Beyond that requests wait in
  the proxy for a replica, at most ``--max-queue`` of them (``max_queued_requests``), and the rest are answered
  429 with ``Retry-After`` by Ray Serve's back-pressure, as a full queue is answered by one process.
- ``--min-replicas``/``--max-replicas`` let Ray Serve's autoscaler scale on ongoing requests, aiming at one full
  batch per replica (``target_ongoing_requests`` = ``--max-batch``).
- Ray Serve's health check calls ``LdmServeReplica.check_health``, the readiness ``/readyz`` answers with
  (``routes.readiness``): a replica whose worker thread has died is replaced.
- A replica takes requests once its engine is warm: its ASGI startup completes only then, and Ray Serve routes to
  a replica once its startup is complete.
- An answer no replica gave (a replica that died with requests on it, no replica up yet) is a 503 with
  ``Retry-After`` in the route's error shape (``ReplicaFailureAs503``, a middleware of Ray Serve's proxy), never a
  bare 500: the client retries and another replica answers.
- ``DELETE /v1/images/{id}`` reaches whichever replica Ray Serve picks, and a request lives in one replica: each
  replica tells a relay (``CancelRelay``, one Ray actor per ``ldm-serve``) the ids of the requests it holds, a
  replica that does not hold the id passes the DELETE to the relay, and the holder, which waits on the relay for
  such ids, cancels it; the client gets the answer one process gives. Closing a stream reaches the holder itself.
  A request's id is the one Ray Serve's proxy gives it (and puts in the answer's ``X-Request-Id``: the client's
  own when it sent one), so that the answer names it once.
- SIGTERM or SIGINT drains: the application is deleted, so new requests get 503 with ``Retry-After`` while every
  replica finishes its ongoing ones within ``--drain-timeout`` (Ray Serve's ``graceful_shutdown_timeout_s``);
  then each proxy stops listening and answers what it has accepted (``ReplicaFailureAs503``'s close request, as
  uvicorn's own graceful shutdown does), and only then Ray Serve stops and the process exits 0 (``_shut_down``).

``--ray-address`` joins an existing Ray cluster (``ray start --head`` on one machine, ``ray start --address`` on the
others, the model folder at the same path on each, on storage they all read); without it a local Ray instance is
started and stopped with the process. Ray is the ``ray`` extra (``pip install 'ldm-runtime[ray]'``), imported only
here.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.client
import logging
import gc
import json
import os
import secrets
import signal
import sys
import time

import ray
import uvicorn
from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.middleware import Middleware

from ldm_serve.browser import SECURITY_HEADERS
from ldm_serve.errors import ApiError, error_body, error_status
from ldm_serve.routes import readiness
from ldm_serve.server import LISTENING_LINE, ServeError, build_app

DEPLOYMENT_NAME = "ldm-serve"
logger = logging.getLogger(__name__)
REPLICA_HEADER = "x-ldm-replica"  # which replica answered: Ray Serve's id of it
PROXY_REQUEST_ID_HEADER = "x-request-id"  # Ray Serve's proxy names each request in it, to the replica and on the answer
WARM_UP_POLL_S = 0.05
BACKPRESSURE_RETRY_AFTER_S = 1  # a request Ray Serve's proxy cannot queue: try again in a second
FAILURE_RETRY_AFTER_S = 1  # a request whose replica died: another one answers the retry
START_TIMEOUT_S = 600.0  # Ray, the proxy and every replica (each loading and warming the engine) up, on a busy host
START_POLL_S = 0.5
HEALTH_CHECK_PERIOD_S = 10.0
HEALTH_CHECK_TIMEOUT_S = 60.0  # a replica busy with a batch on shared cores answers its health check late
RELAY_NAMESPACE = "ldm-serve"  # the Ray namespace of the CancelRelay actors
CANCEL_WAIT_S = 30.0  # how long a replica's wait on the relay lasts before it asks again
CANCEL_RETRY_S = 1.0  # after the relay failed to answer

# Closing a proxy at the end of the drain (ReplicaFailureAs503): the driver POSTs to this path on each proxy with
# the token only it and the proxies know (in their environment), and the proxy stops listening, lets connections it
# has just accepted send their request (PROXY_IDLE_GRACE_S), closes idle ones, and answers once every other
# connection is answered and closed, or after PROXY_CLOSE_WAIT_S (only 503s are left to send by then).
PROXY_CLOSE_PATH = "/-/ldm-close"
PROXY_CLOSE_TOKEN_ENV = "LDM_SERVE_PROXY_CLOSE_TOKEN"
PROXY_CLOSE_TOKEN_HEADER = "x-ldm-close-token"
PROXY_CLOSE_WAIT_HEADER = "x-ldm-close-wait-s"
PROXY_CLOSE_WAIT_S = 5.0
PROXY_IDLE_GRACE_S = 0.5
PROXY_CLOSE_POLL_S = 0.02

# Ray Serve's own limits that a busy machine exceeds while Ray, the proxy and the replicas start at once: by default
# the controller gives the proxy 5 s to report ready and 10 s per health check, and kills it otherwise. A value the
# user set in the environment is kept. The last one installs ReplicaFailureAs503 in the proxy.
RAY_SERVE_ENV = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": f"{__name__}.proxy_middlewares",
}


@ray.remote(num_cpus=0)
class CancelRelay:
    """Which replica holds which request, and the DELETEs waiting for each: ``held``/``let_go`` as a replica takes
    and answers a request, ``cancel(id)`` from the replica a DELETE reached (True: the holder will cancel it),
    ``cancels_for(replica)`` from the holder, which waits in it until there is something to cancel."""

    def __init__(self):
        self.holders: dict[str, str] = {}
        self.pending: dict[str, list[str]] = {}
        self.wakeups: dict[str, asyncio.Event] = {}

    async def held(self, request_id: str, replica: str) -> None:
        self.holders[request_id] = replica

    async def let_go(self, request_id: str) -> None:
        self.holders.pop(request_id, None)

    async def cancel(self, request_id: str) -> bool:
        replica = self.holders.pop(request_id, None)
        if replica is None:
            return False
        self.pending.setdefault(replica, []).append(request_id)
        self.wakeups.setdefault(replica, asyncio.Event()).set()
        return True

    async def cancels_for(self, replica: str, wait_s: float) -> list[str]:
        wakeup = self.wakeups.setdefault(replica, asyncio.Event())
        if not self.pending.get(replica):
            try:
                await asyncio.wait_for(wakeup.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        wakeup.clear()
        return self.pending.pop(replica, [])


class CancelPeers:
    """A replica's side of the relay, as ``ImagesRoute.peers``: it tells the relay what it holds, passes it the
    DELETEs for requests it does not hold, and (``take_cancels``, a task of the replica's event loop for its
    life) cancels the requests the others pass on for it."""

    def __init__(self, relay, replica: str):
        self.relay = relay
        self.replica = replica

    def held(self, request_id: str) -> None:
        self.relay.held.remote(request_id, self.replica)

    def let_go(self, request_id: str) -> None:
        self.relay.let_go.remote(request_id)

    async def cancel(self, request_id: str) -> bool:
        try:
            return await self.relay.cancel.remote(request_id)
        except Exception:  # the relay is gone (Ray stopping): the request is then unknown here, a 404
            logger.warning("the cancel relay did not answer", exc_info=True)
            return False

    async def take_cancels(self, route) -> None:
        failing = False
        while True:
            try:
                request_ids = await self.relay.cancels_for.remote(self.replica, CANCEL_WAIT_S)
            except Exception:
                if not failing:  # once until it answers again, not once a second
                    logger.warning("the cancel relay did not answer; asking again every %g s", CANCEL_RETRY_S,
                                   exc_info=True)
                failing = True
                await asyncio.sleep(CANCEL_RETRY_S)
                continue
            failing = False
            for request_id in request_ids:
                route.cancel_held(request_id)


class LdmServeReplica:
    """One replica: the ``ldm-serve`` app of ``args``, built when Ray Serve starts the replica (the engine is loaded
    in the replica's process, never pickled); every answer names the replica in ``X-Ldm-Replica``. ``relay_name``:
    the ``CancelRelay`` actor it shares with the other replicas (None: a DELETE stays in the replica it reaches)."""

    def __init__(self, args: argparse.Namespace, api_key: str | None, relay_name: str | None = None):
        self.args = args
        self.api_key = api_key
        self.relay_name = relay_name
        self.batcher = None
        self._taking_cancels = None

    def __serve_build_asgi_app__(self):
        app, batcher, _, _ = build_app(self.args, api_key=self.api_key)
        self.batcher = batcher
        replica = str(serve.get_replica_context().replica_id.unique_id).encode("ascii")
        route = app.state.images_route
        peers = None
        if self.relay_name is not None:
            peers = CancelPeers(ray.get_actor(self.relay_name, namespace=RELAY_NAMESPACE), replica.decode())
            route.peers = peers

        async def send_named(send, message: dict) -> None:
            if message["type"] == "http.response.start":  # the proxy adds the request's id, the one used here
                headers = [(name, value) for name, value in message.get("headers", [])
                           if name.lower() != PROXY_REQUEST_ID_HEADER.encode()]
                message = {**message, "headers": [*headers, (REPLICA_HEADER.encode(), replica)]}
            await send(message)

        async def send_when_warm(send, message: dict) -> None:
            # Ray Serve routes to a replica once its startup is complete: not before the engine is warm, so that no
            # request meets a replica still warming up while another is ready
            if message["type"] == "lifespan.startup.complete":
                while not batcher.ready and batcher.alive:
                    await asyncio.sleep(WARM_UP_POLL_S)
            await send(message)

        async def replica_app(scope: dict, receive, send) -> None:
            if peers is not None and self._taking_cancels is None:
                self._taking_cancels = asyncio.ensure_future(peers.take_cancels(route))
            wrap = {"http": send_named, "lifespan": send_when_warm}.get(scope["type"])
            await app(scope, receive, functools.partial(wrap, send) if wrap else send)

        return replica_app

    def check_health(self) -> None:
        """Ray Serve's health check: the replica's readiness, as ``/readyz`` answers it; draining counts as healthy
        (the replica is finishing its requests), anything else unready makes Ray Serve replace the replica."""
        if self.batcher is None:
            return  # the app is still being built; Ray Serve does not check a replica before its startup completes
        problem = readiness(self.batcher)
        if problem is not None and problem.type != "draining":
            raise RuntimeError(f"replica not ready: {problem.message}")


class ReplicaFailureAs503:
    """ASGI middleware in Ray Serve's proxy: an error answer that no replica gave (the proxy's 500 after a replica
    died with the request on it, its 503 while no replica is up, its 404 while the application is being deleted
    during the drain, as every path is the application's) becomes 503 with ``Retry-After`` and the error body the
    route would give, so a client sees the same answers as from one process and retries. Like Envoy's and
    Ray Serve's own retry-after answers for an upstream that went away.

    It also closes the proxy gracefully at the end of the drain (``close_proxy``): Ray Serve stops a proxy by
    killing its process, which would cut every connection it holds; the driver first POSTs ``PROXY_CLOSE_PATH``
    with the proxies' token, and only a request carrying it is taken here (any other goes to the application)."""

    closing = False  # this proxy has stopped listening: every answer closes its connection

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("path") == PROXY_CLOSE_PATH and scope.get("method") == "POST" and _close_token_matches(scope):
            await close_proxy(scope, send)
            return
        started = replaced = False

        async def guarded_send(message: dict) -> None:
            nonlocal started, replaced
            if replaced:
                return  # the rest of the answer that was replaced
            if message["type"] == "http.response.start":
                started = True
                headers = message.get("headers", [])
                if (message["status"] >= 500 or message["status"] == 404) and not any(
                        key.lower() == REPLICA_HEADER.encode() for key, _ in headers):
                    replaced = True
                    await _send_unavailable(send, scope.get("path", ""))
                    return
                if ReplicaFailureAs503.closing:
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception:
            if started:
                raise
            started = True
            await _send_unavailable(send, scope.get("path", ""))
        if not started:
            await _send_unavailable(send, scope.get("path", ""))


def _close_token_matches(scope: dict) -> bool:
    expected = os.environ.get(PROXY_CLOSE_TOKEN_ENV, "")
    given = dict(scope.get("headers", [])).get(PROXY_CLOSE_TOKEN_HEADER.encode(), b"")
    return bool(expected) and secrets.compare_digest(given, expected.encode())


def _uvicorn_servers() -> list[uvicorn.Server]:
    """The uvicorn servers of this process that are serving (in Ray Serve's proxy: its HTTP server, which Ray
    Serve starts and keeps no handle to that a middleware can reach)."""
    return [item for item in gc.get_objects()  # by type: reading __class__ of every object can warn or fail
            if issubclass(type(item), uvicorn.Server) and item.started and hasattr(item, "servers")]


async def close_proxy(scope: dict, send) -> None:
    """Answer the driver's close request: stop listening (a client that connects now is refused, as by a
    stopped server), give the connections just accepted ``PROXY_IDLE_GRACE_S`` to send their request, ask every
    connection to close after its answer (uvicorn's own graceful shutdown: an idle one closes at once), and answer
    ``{"open_connections": N}`` once no other connection is open, or after the wait the request names (at most
    ``PROXY_CLOSE_WAIT_S``). Answers 501 where no uvicorn server is found."""
    servers = _uvicorn_servers()
    if not servers:
        await _send_json(send, 501, {"error": "no uvicorn server found in this proxy process"})
        return
    try:
        wait_s = float(dict(scope.get("headers", [])).get(PROXY_CLOSE_WAIT_HEADER.encode(), b""))
    except ValueError:
        wait_s = PROXY_CLOSE_WAIT_S
    wait_s = min(max(wait_s, 0.0), PROXY_CLOSE_WAIT_S) if wait_s == wait_s else PROXY_CLOSE_WAIT_S
    ReplicaFailureAs503.closing = True
    for server in servers:
        for listening in server.servers:
            listening.close()
    await asyncio.sleep(PROXY_IDLE_GRACE_S)
    for server in servers:
        for connection in list(server.server_state.connections):
            connection.shutdown()  # this request's too: it closes once this answer is sent
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s

    def others_open() -> int:
        return max(sum(len(server.server_state.connections) for server in servers) - 1, 0)

    while others_open() and loop.time() < deadline:
        await asyncio.sleep(PROXY_CLOSE_POLL_S)
    await _send_json(send, 200, {"open_connections": others_open()})


async def _send_json(send, status: int, content: dict) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


async def _send_unavailable(send, path: str) -> None:
    error = ApiError(503, "replica_unavailable", "no replica could answer this request (one stopped while it "
                     "held it, or none is up yet); retry it", None)
    body = error_body(error, path)
    await send({"type": "http.response.start", "status": error_status(error, path),
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(FAILURE_RETRY_AFTER_S).encode()), *SECURITY_HEADERS,
                            *([(b"connection", b"close")] if ReplicaFailureAs503.closing else [])]})
    await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list:
    """What Ray Serve's proxy calls through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``."""
    return [Middleware(ReplicaFailureAs503)]


def deployment_options(args: argparse.Namespace, max_batch: int,
                       counts: tuple[int, int | None, int | None]) -> dict:
    """The options of the Ray Serve deployment of ``args`` with ``counts`` replicas (``cli.replica_counts``: initial,
    and min and max when autoscaling; see the module's docstring)."""
    initial, low, high = counts
    options = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": max(args.max_queue, max_batch),
        "max_queued_requests": args.max_queue,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=BACKPRESSURE_RETRY_AFTER_S),
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": args.drain_timeout,
        "graceful_shutdown_wait_loop_s": 0.5,
        # a replica's threads are --threads; Ray's CPU count would cap replicas per machine
        "ray_actor_options": {"num_cpus": 0},
    }
    if low is None:
        options["num_replicas"] = initial
    else:
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": initial,
                                         "target_ongoing_requests": max_batch, "upscale_delay_s": 3.0,
                                         "downscale_delay_s": 60.0}
    return options


def serve_replicas(args: argparse.Namespace, api_key: str | None, description: str, max_batch: int,
                   counts: tuple[int, int | None, int | None]) -> int:
    """Run the replicas on Ray Serve until SIGTERM or SIGINT; returns 0 once Ray Serve has shut down, or raises a
    ``ServeError`` naming what kept Ray Serve from starting."""
    options = deployment_options(args, max_batch, counts)
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # Ray's threads inherit the mask; sigwait takes them below
    env = {name: os.environ.get(name, value) for name, value in RAY_SERVE_ENV.items()}
    env[PROXY_CLOSE_TOKEN_ENV] = secrets.token_hex(32)
    os.environ.update(env)  # a local Ray instance's processes inherit them
    try:
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=args.log_level == "debug",
                 logging_level=logging.WARNING, configure_logging=args.log_level == "debug")
    except Exception as error:  # Ray raises ConnectionError, RuntimeError, ValueError... naming the address
        raise ServeError(f"cannot start or join Ray at {args.ray_address or 'a local instance'} "
                         f"({_first_line(error)}); expected a running Ray cluster's address from 'ray start --head', "
                         f"or no --ray-address") from None
    try:
        serve.start(http_options={"host": args.host, "port": args.port},
                    controller_options={"runtime_env": {"env_vars": env}})
        relay_name = f"{DEPLOYMENT_NAME}-cancels-{secrets.token_hex(8)}"
        # held here (an actor without a handle is stopped) until the process leaves Ray; up before any replica
        relay = CancelRelay.options(name=relay_name, namespace=RELAY_NAMESPACE).remote()
        ray.get(relay.let_go.remote(""), timeout=START_TIMEOUT_S)
        deployment = serve.deployment(serve.ingress()(LdmServeReplica), **options)
        serve.run(deployment.bind(args, api_key, relay_name), name=DEPLOYMENT_NAME, route_prefix="/",
                  blocking=False)
        _wait_until_serving(args.host, args.port, signals)
    except (Exception, KeyboardInterrupt) as error:
        _shut_down(args)
        raise ServeError(f"Ray Serve did not start ({_first_line(error)}); expected it to serve on "
                         f"{args.host}:{args.port}") from None
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    initial, low, high = counts
    shown = f"{initial} Ray Serve replicas" if low is None else f"{initial} Ray Serve replicas ({low} to {high})"
    print(f"{LISTENING_LINE} {description}, {shown}, on http://{shown_host}:{args.port}", file=sys.stderr,
          flush=True)
    signal.sigwait(signals)
    print("ldm-serve: draining the replicas", file=sys.stderr, flush=True)
    closed = _shut_down(args)
    print(f"ldm-serve: drained and stopped ({closed} {'proxy' if closed == 1 else 'proxies'} closed gracefully)",
          file=sys.stderr, flush=True)
    return 0


def _wait_until_serving(host: str, port: int, signals: set[signal.Signals]) -> None:
    """Until the proxy answers ``/-/healthz`` (the application is running, the proxy listening); a SIGTERM or
    SIGINT meanwhile stops the wait."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if signal.sigpending() & signals:
            raise InterruptedError("stopped by a signal while starting")
        status = serve.status().applications.get(DEPLOYMENT_NAME)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(_first_line(status.message or "the deployment failed"))
        try:
            connection = http.client.HTTPConnection(host, port, timeout=10)
            connection.request("GET", "/-/healthz")
            response = connection.getresponse()
            response.read()
            connection.close()
            if response.status == 200 and status is not None and status.status == "RUNNING":
                return
            last = f"the proxy answered {response.status}"
        except OSError as error:
            last = str(error)
        time.sleep(START_POLL_S)
    raise TimeoutError(f"not serving after {START_TIMEOUT_S:.0f} s: {last}")


def _shut_down(args: argparse.Namespace) -> int:
    """Drain, then stop: deleting the application first takes the replicas out of the proxy's routes (a new request
    gets 503 with ``Retry-After``) while each finishes its ongoing requests (Ray Serve's graceful shutdown, at
    most ``--drain-timeout``) and the proxy, still up, delivers their answers; then each proxy stops listening and
    answers the requests it has accepted (``_close_proxies``); only then Ray Serve's controller and proxies stop
    (``serve.shutdown`` kills a proxy at once, cutting whatever it still holds). Then the process leaves Ray: a
    local instance stops with it. Returns how many proxies closed gracefully."""
    try:
        try:
            serve.delete(DEPLOYMENT_NAME)
            return _close_proxies(args)
        finally:
            serve.shutdown()
    finally:
        ray.shutdown()


def _proxy_hosts(args: argparse.Namespace) -> list[str]:
    """Where the proxies listen, as the driver reaches them: ``--host`` itself, or on a wildcard address every
    alive node of the cluster (Ray Serve runs a proxy on each)."""
    if args.host not in ("0.0.0.0", "::", ""):
        return [args.host]
    loopback = "::1" if args.host == "::" else "127.0.0.1"
    local = ray.util.get_node_ip_address()
    others = [node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")]
    return [loopback, *dict.fromkeys(address for address in others if address != local)]


def _close_proxies(args: argparse.Namespace) -> int:
    """Close every proxy gracefully (``close_proxy``); one that cannot be is named in one line and left to
    ``serve.shutdown``. A refused connection is a proxy that is not there (no listener: nothing to close).
    Returns how many closed with no connection left open."""
    closed = 0
    token = os.environ.get(PROXY_CLOSE_TOKEN_ENV, "")
    wait_s = min(args.drain_timeout, PROXY_CLOSE_WAIT_S)
    for host in _proxy_hosts(args):
        shown = f"[{host}]:{args.port}" if ":" in host else f"{host}:{args.port}"
        try:
            connection = http.client.HTTPConnection(host, args.port, timeout=wait_s + 30.0)
            connection.request("POST", PROXY_CLOSE_PATH, headers={PROXY_CLOSE_TOKEN_HEADER: token,
                                                                 PROXY_CLOSE_WAIT_HEADER: f"{wait_s:g}"})
            response = connection.getresponse()
            answer = response.read()
            connection.close()
        except ConnectionRefusedError:
            continue
        except OSError as error:
            print(f"ldm-serve: could not close Ray Serve's proxy on {shown} gracefully ({error}); stopping it",
                  file=sys.stderr, flush=True)
            continue
        if response.status != 200:
            print(f"ldm-serve: could not close Ray Serve's proxy on {shown} gracefully (it answered "
                  f"{response.status}: {answer[:200].decode(errors='replace')}); stopping it", file=sys.stderr,
                  flush=True)
        elif (still_open := json.loads(answer).get("open_connections", 0)) > 0:
            print(f"ldm-serve: Ray Serve's proxy on {shown} still had {still_open} open connection(s) after "
                  f"{wait_s:g} s; stopping it", file=sys.stderr, flush=True)
        else:
            closed += 1
    return closed


def _first_line(error: BaseException | str) -> str:
    """The first line of ``error``'s text, at most 300 characters (Ray's errors run to pages of tracebacks)."""
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__
