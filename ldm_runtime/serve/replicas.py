"""``ldm-serve --replicas N``: the same app as ``ldm-serve`` in N Ray Serve replicas behind Ray Serve's HTTP proxy.

Each replica is a Ray actor that loads the engine and builds the app exactly as one ``ldm-serve`` process does
(``cli.build_app``): its own step-level batcher, queue, limits, errors, API key and metrics. Ray Serve's proxy
listens on ``--host``/``--port`` and spreads requests over the replicas; a request that a replica's own queue
cannot take is answered 429 by that replica, as today. ``--ray-address`` joins an existing Ray cluster (``ray
start --head`` on one machine, ``ray start --address`` on the others, the engine dir on storage they all
read); without it a local Ray instance is started. SIGTERM or SIGINT shuts Ray Serve down, which lets every
replica finish its ongoing requests first (Ray Serve's graceful shutdown).

Ray is the ``ray`` extra (``pip install 'ldm-runtime[ray]'``), imported only here.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys

import ray
from ray import serve

from ldm_runtime.serve.cli import LISTENING_LINE, build_app

DEPLOYMENT_NAME = "ldm-serve"


REPLICA_HEADER = "X-Ldm-Replica"  # which replica answered: Ray Serve's id of it
WARM_UP_POLL_S = 0.05


class LdmServeReplica:
    """One replica: the ``ldm-serve`` app of ``args``, built when Ray Serve starts the replica (the engine is loaded
    in the replica's process, never pickled); every answer names the replica in ``X-Ldm-Replica``."""

    def __init__(self, args: argparse.Namespace, api_key: str | None):
        self.args = args
        self.api_key = api_key

    def __serve_build_asgi_app__(self):
        app, batcher, _, _ = build_app(self.args, api_key=self.api_key)
        replica = str(serve.get_replica_context().replica_id.unique_id).encode("ascii")

        async def send_named(send, message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REPLICA_HEADER.lower().encode("ascii"), replica)]}
            await send(message)

        async def send_when_warm(send, message: dict) -> None:
            # Ray Serve routes to a replica once its startup is complete: not before the engine is warm, so that no
            # request meets a replica still warming up while another is ready
            if message["type"] == "lifespan.startup.complete":
                while not batcher.ready:
                    await asyncio.sleep(WARM_UP_POLL_S)
            await send(message)

        async def replica_app(scope: dict, receive, send) -> None:
            wrap = {"http": send_named, "lifespan": send_when_warm}.get(scope["type"])
            await app(scope, receive, functools.partial(wrap, send) if wrap else send)

        return replica_app


def serve_replicas(args: argparse.Namespace, api_key: str | None, description: str) -> int:
    """Run ``args.replicas`` replicas on Ray Serve until SIGTERM or SIGINT; returns 0 once Ray Serve has shut down."""
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # Ray's threads inherit the mask; sigwait takes them below
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=args.log_level == "debug",
             logging_level=logging.WARNING)
    serve.start(http_options={"host": args.host, "port": args.port})
    deployment = serve.deployment(serve.ingress()(LdmServeReplica), name=DEPLOYMENT_NAME,
                                  num_replicas=args.replicas, max_ongoing_requests=args.max_queue,
                                  # a replica's threads are --threads; Ray's CPU count would cap replicas per machine
                                  ray_actor_options={"num_cpus": 0})
    serve.run(deployment.bind(args, api_key), name=DEPLOYMENT_NAME, route_prefix="/", blocking=False)
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"{LISTENING_LINE} {description}, {args.replicas} Ray Serve replicas, on http://{shown_host}:{args.port}",
          file=sys.stderr, flush=True)
    signal.sigwait(signals)
    serve.shutdown()
    ray.shutdown()
    return 0
