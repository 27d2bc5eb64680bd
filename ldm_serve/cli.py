"""``ldm-serve``: text-to-image over HTTP from one model folder, with step-level batching.

    ldm-serve --model runs/engine --port 8000
    curl -s localhost:8000/v1/images -H 'Accept: image/png' -d '{"prompt": "a red circle", "seed": 7}' -o out.png

``http://localhost:8000/`` is a page to try it in a browser; ``/v1/images/generations`` speaks the OpenAI images
API, so that OpenAI's clients work with ``base_url="http://localhost:8000/v1"``.

The engine is loaded before the server binds, so a bad folder or flag is one line ``ldm-serve: error: ...``
on stderr and exit status 2. Then the server listens at once (``/healthz`` answers) while a worker thread
warms the engine up (``/readyz`` answers 503 until it is done). SIGTERM or SIGINT drains: the listening
socket closes, requests still arriving or newly arrived get 503, queued and running requests finish, and the
process exits 0; whatever is left when ``--drain-timeout`` runs out gets 503 then, so the process exits
within the drain time whatever clients do. A request's header and body must arrive within
``--header-timeout`` and ``--body-timeout`` (``serve.protocol``), else 408 and the connection closes.
An API key is required when ``--api-key-file`` is given or ``LDM_SERVE_API_KEY`` is set: then every route
but the page, ``/healthz`` and ``/readyz`` needs it (``serve.app``).

``--replicas N`` (or ``--min-replicas``/``--max-replicas``, autoscaled) runs the same app in Ray Serve replicas
behind Ray Serve's HTTP proxy instead, on a local Ray instance or the cluster at ``--ray-address``
(``serve.replicas``, the ``ray`` extra).

``LDM_SERVE_STEP_GATE=FILE`` holds the worker at step boundaries while FILE exists (``batcher.StepGate``): the
tests use it to keep requests queued or running for as long as they need, whatever the machine's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

import uvicorn

from ldm_runtime.command_line import OneLineArgumentParser, finite_float, report_user_error
from ldm_runtime.engines import ENGINE_NAMES, THREADED_ENGINES, engine_for_flags, load_engine
from ldm_runtime.errors import UserError
from ldm_serve.app import ServeLimits, ServeMetrics, create_app, largest_request_bytes
from ldm_serve.batcher import BATCHING_MODES, Batcher, BatcherConfig, StepGate
from ldm_serve.protocol import GuardedH11Protocol
from ldm_serve.text_cache import DEFAULT_CAPACITY, TextEncodingCache

PROG = "ldm-serve"
API_KEY_ENV = "LDM_SERVE_API_KEY"
STEP_GATE_ENV = "LDM_SERVE_STEP_GATE"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
LISTENING_LINE = f"{PROG}: serving"  # the start of the line that says the server listens (and where)
LIMIT_DEFAULTS = ServeLimits()
BATCHER_DEFAULTS = BatcherConfig()
HEADER_TIMEOUT_S = 20.0  # Apache httpd's mod_reqtimeout starts from 20 s for the header and for the body
BODY_TIMEOUT_S = 20.0
DRAIN_TIMEOUT_S = 30.0  # Triton Inference Server's --exit-timeout-secs
ABORT_GRACE_S = 1.0  # after the drain time: for the 503s to go out before connections are cut


class ServeError(UserError):
    """A flag of ``ldm-serve`` that cannot work (a range, an unreadable key file, a port in use)."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=PROG,
                                   description="Serve text-to-image requests over HTTP from one model folder.")
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="an engine dir (written by ldm-export) or a checkpoint dir (written by ldm-train)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--batching", choices=BATCHING_MODES, default=BATCHER_DEFAULTS.mode,
                        help="none: one request at a time; dynamic: batches formed while idle; step: requests join "
                             "the running batch at every step (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=None, metavar="B",
                        help="images per UNet call (default: half the engine's UNet batch, as guidance doubles it)")
    parser.add_argument("--max-queue", type=int, default=BATCHER_DEFAULTS.max_queue, metavar="Q",
                        help="requests waiting to start; beyond it 429 (default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=finite_float, default=BATCHER_DEFAULTS.max_wait_s * 1000,
                        help="dynamic batching: how long a request waits for company (default: %(default)s)")
    parser.add_argument("--request-timeout", type=finite_float, default=LIMIT_DEFAULTS.request_timeout_s, metavar="S",
                        help="seconds from arrival after which a request is dropped with 503 (default: %(default)s)")
    parser.add_argument("--max-n", type=int, default=LIMIT_DEFAULTS.max_n,
                        help="most images per request (default: %(default)s, at most --max-batch)")
    parser.add_argument("--max-steps", type=int, default=LIMIT_DEFAULTS.max_steps,
                        help="most DDIM steps per request (default: %(default)s)")
    parser.add_argument("--default-steps", type=int, default=LIMIT_DEFAULTS.default_steps,
                        help="steps of a request that names none (default: %(default)s)")
    parser.add_argument("--max-size", type=int, default=None,
                        help="largest image side in pixels (default: the engine's largest)")
    parser.add_argument("--max-prompt-chars", type=int, default=LIMIT_DEFAULTS.max_prompt_chars,
                        help="longest prompt or negative prompt in characters (default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=None,
                        help="largest request body; beyond it 413 (default: what the longest valid request needs, "
                             f"{LIMIT_DEFAULTS.max_body_bytes} for the default --max-prompt-chars)")
    parser.add_argument("--header-timeout", type=finite_float, default=HEADER_TIMEOUT_S, metavar="S",
                        help="seconds a request's header may take to arrive (from the connection opening or the "
                             "previous response); beyond it 408 and the connection closes (default: %(default)s)")
    parser.add_argument("--body-timeout", type=finite_float, default=BODY_TIMEOUT_S, metavar="S",
                        help="seconds a request's body may take to arrive after its header; beyond it 408 and the "
                             "connection closes (default: %(default)s)")
    parser.add_argument("--drain-timeout", type=finite_float, default=DRAIN_TIMEOUT_S, metavar="S",
                        help="seconds SIGTERM/SIGINT waits for queued and running requests; those left then get 503 "
                             "and the process exits (default: %(default)s)")
    parser.add_argument("--api-key-file", default=None, metavar="FILE",
                        help=f"require 'Authorization: Bearer KEY' with the key in FILE, a UTF-8 text file (or set "
                             f"{API_KEY_ENV}), on every route but the page /, /healthz and /readyz: /v1/images, "
                             f"/v1/images/generations, /metrics, /openapi.json and /docs (the page has a field for "
                             f"the key)")
    parser.add_argument("--engine", choices=ENGINE_NAMES, default="auto",
                        help="auto picks torch for a checkpoint dir and, for an engine dir, tensorrt where it holds "
                             "TensorRT plans built for this GPU, openvino on the CPU where it is installed, else "
                             "onnxruntime (and says which)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--text-cache", type=int, default=DEFAULT_CAPACITY, metavar="N",
                        help="prompts whose text encoding is remembered, 0 for none (default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="the openvino engine's inference precision; bf16 only on a CPU with native bf16 "
                             "(default: fp32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per engine call (default: the engine's own default)")
    parser.add_argument("--replicas", type=int, default=None, metavar="N",
                        help="run N replicas, each with its own engine and batcher, on Ray Serve behind its HTTP "
                             "proxy (needs the ray extra; default: one process, no Ray)")
    parser.add_argument("--min-replicas", type=int, default=None, metavar="N",
                        help="with --max-replicas: let Ray Serve's autoscaler run from N to --max-replicas replicas, "
                             "aiming at one full batch of ongoing requests per replica (--replicas is then the "
                             "starting count; default: N)")
    parser.add_argument("--max-replicas", type=int, default=None, metavar="N",
                        help="the most replicas the autoscaler runs (with --min-replicas, default 1)")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="with --replicas: the Ray cluster to join (as 'ray start --head' printed it, such as "
                             "10.0.0.1:6379); default: a local Ray instance, stopped with the server")
    parser.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                        help="the log level of uvicorn and of the server's worker (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ldm-serve until SIGTERM/SIGINT; returns 0 after a drain, 2 after a one-line error on stderr."""
    try:
        args = build_parser().parse_args(argv)
        if (args.replicas, args.min_replicas, args.max_replicas) != (None, None, None):
            return _serve_replicas(args)
        if args.ray_address is not None:
            raise ServeError(f"--ray-address is {args.ray_address} without --replicas; expected --replicas N (or "
                             f"--min-replicas and --max-replicas) to run replicas on that Ray cluster")
        server, sock = _prepare(args)
    except UserError as error:
        return report_user_error(PROG, error)
    server.run(sockets=[sock])
    print(f"{PROG}: drained and stopped", file=sys.stderr)
    return 0


def _prepare(args: argparse.Namespace):
    """Check the flags, load the engine, bind the socket: everything that can fail with a user's error."""
    app, batcher, api_key, description = build_app(args)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    protocol = functools.partial(GuardedH11Protocol, header_timeout_s=args.header_timeout,
                                 body_timeout_s=args.body_timeout)
    # uvicorn's own graceful-shutdown timeout is the last resort, after DrainingServer's
    config = uvicorn.Config(app, http=protocol, log_level=args.log_level, timeout_keep_alive=5, lifespan="on",
                            timeout_graceful_shutdown=args.drain_timeout + 3 * ABORT_GRACE_S)
    server = DrainingServer(config, batcher, args.drain_timeout)
    shown_host = f"[{host}]" if ":" in host else host
    print(f"{LISTENING_LINE} {description} on http://{shown_host}:{port}", file=sys.stderr, flush=True)
    if args.host not in LOOPBACK_HOSTS and not api_key:
        print(f"{PROG}: warning: listening on {args.host} without an API key; anyone who can reach it can use it",
              file=sys.stderr, flush=True)
    return server, sock


def _serve_replicas(args: argparse.Namespace) -> int:
    """``--replicas N``: check the flags, the port and the engine here, once, then run the replicas on Ray Serve."""
    counts = replica_counts(args)
    if args.port == 0:
        raise ServeError("--port is 0 with --replicas; expected a fixed port for Ray Serve's HTTP proxy")
    try:
        import ray  # noqa: F401 (only to say what is missing)
        from ray import serve  # noqa: F401
    except ImportError:
        raise ServeError("--replicas needs Ray Serve, which is not installed; expected pip install "
                         "'ldm-runtime[ray]'") from None
    from ldm_serve.replicas import serve_replicas  # imports ray, an optional extra

    _, batcher, api_key, description = build_app(args)  # the replicas load their own; this one is let go
    max_batch = batcher.config.max_batch
    del batcher
    if args.ray_address is None:
        _bind(args.host, args.port).close()  # in use: one line now, not Ray's proxy failing to start later
    return serve_replicas(args, api_key, description, max_batch, counts)


def replica_counts(args: argparse.Namespace) -> tuple[int, int | None, int | None]:
    """``(initial, min, max)`` replicas from ``--replicas``, ``--min-replicas`` and ``--max-replicas``; min and max
    are None without autoscaling. A ``ServeError`` names a count out of range."""
    low, high = args.min_replicas, args.max_replicas
    if low is None and high is None:
        _check_range("--replicas", args.replicas, 1, None)
        return args.replicas, None, None
    if low is not None:
        _check_range("--min-replicas", low, 1, None)
    low = 1 if low is None else low
    if high is None:
        raise ServeError(f"--min-replicas is {low} without --max-replicas; expected both, for autoscaling between "
                         f"them")
    _check_range("--max-replicas", high, low, None, " (--min-replicas)")
    initial = low if args.replicas is None else args.replicas
    _check_range("--replicas", initial, low, high, " (from --min-replicas to --max-replicas)")
    return initial, low, high


def build_app(args: argparse.Namespace, api_key: str | None = None):
    """Check the flags and load the engine: the app (not started), its batcher, the API key (``api_key`` if
    given, else from ``--api-key-file`` or the environment) and what the serving line says of them."""
    _check_range("--port", args.port, 0, 65535)
    _check_range("--max-queue", args.max_queue, 1, None)
    _check_range("--max-n", args.max_n, 1, None)
    _check_range("--max-steps", args.max_steps, 1, None)
    _check_range("--max-prompt-chars", args.max_prompt_chars, 1, None)
    if args.max_body_bytes is None:
        args.max_body_bytes = largest_request_bytes(args.max_prompt_chars)
    _check_range("--max-body-bytes", args.max_body_bytes, 256, None)
    for flag, seconds in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout),
                          ("--drain-timeout", args.drain_timeout)):
        if not 0 < seconds <= 86_400:  # NaN fails too
            raise ServeError(f"{flag} is {seconds}; expected seconds above 0, at most 86400")
    _check_range("--text-cache", args.text_cache, 0, None)
    if args.threads is not None:
        _check_range("--threads", args.threads, 1, None)
    if not args.max_wait_ms >= 0 or args.max_wait_ms > 10_000:
        raise ServeError(f"--max-wait-ms is {args.max_wait_ms}; expected a number from 0 to 10000")
    if not args.request_timeout > 0 or args.request_timeout > 86_400:
        raise ServeError(f"--request-timeout is {args.request_timeout}; expected seconds above 0, at most 86400")
    api_key = api_key if api_key is not None else _read_api_key(args.api_key_file)
    _log_to_stderr(args.log_level)
    engine = _load_engine(args)
    from ldm_runtime.pipeline import Pipeline

    pipeline = Pipeline(TextEncodingCache(engine, args.text_cache) if args.text_cache else engine)
    info = engine.info
    most_batch = max(1, info.max_images)
    max_batch = most_batch if args.max_batch is None else args.max_batch
    _check_range("--max-batch", max_batch, 1, most_batch, f" (the engine's UNet batch holds {info.max_batch_size} "
                                                          f"rows and guidance doubles each image)")
    _check_range("--max-n", args.max_n, 1, max_batch, " (--max-batch)")
    _check_range("--max-steps", args.max_steps, 1, pipeline.max_steps, " (what the sampler can plan)")
    _check_range("--default-steps", args.default_steps, 1, args.max_steps, " (--max-steps)")
    max_size = info.max_image_size if args.max_size is None else args.max_size
    _check_range("--max-size", max_size, max(info.min_image_size, info.image_size), info.max_image_size,
                 " (the engine's range)")
    if max_size % info.image_size_multiple:
        raise ServeError(f"--max-size is {max_size}; expected a multiple of {info.image_size_multiple}")
    limits = ServeLimits(max_n=args.max_n, max_steps=args.max_steps, max_prompt_chars=args.max_prompt_chars,
                         max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout,
                         min_size=info.min_image_size, max_size=max_size, size_multiple=info.image_size_multiple,
                         default_size=info.image_size, default_steps=args.default_steps)
    metrics = ServeMetrics()
    gate_path = os.environ.get(STEP_GATE_ENV)
    batcher = Batcher(pipeline, BatcherConfig(mode=args.batching, max_batch=max_batch, max_queue=args.max_queue,
                                              max_wait_s=args.max_wait_ms / 1000), observer=metrics.observe,
                      step_gate=StepGate(gate_path) if gate_path else None)
    app = create_app(pipeline, batcher, limits, metrics, api_key=api_key, model_name=Path(args.model).name)
    picked = " picked by --engine auto" if args.engine == "auto" else ""
    description = (f"{args.model} ({info.name} engine{picked}, {args.batching} batching, max batch {max_batch}, "
                   f"queue {args.max_queue}{', API key required' if api_key else ''})")
    return app, batcher, api_key, description


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but a signal first makes the batcher refuse new work (503), the drain ends after
    ``drain_timeout_s`` whatever clients do, and the process exits 0 after it instead of re-raising the signal
    as uvicorn does."""

    def __init__(self, config: uvicorn.Config, batcher: Batcher, drain_timeout_s: float = DRAIN_TIMEOUT_S):
        super().__init__(config)
        self.batcher = batcher
        self.drain_timeout_s = drain_timeout_s

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.batcher.drain()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        time_up = asyncio.get_running_loop().call_later(self.drain_timeout_s, self._drain_time_up)
        try:
            await super().shutdown(sockets)
        finally:
            time_up.cancel()

    def _drain_time_up(self) -> None:
        """Requests still queued or running get 503 now; a connection still open a moment later (its client
        does not read its answer) is cut."""
        self.batcher.abandon()
        asyncio.get_running_loop().call_later(ABORT_GRACE_S, self._cut_connections)

    def _cut_connections(self) -> None:
        for connection in list(self.server_state.connections):
            connection.transport.abort()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def _load_engine(args: argparse.Namespace):
    """The engine of ``--model``, its calls on ``--threads`` CPU threads (onnxruntime's sessions are made with
    that many; for the torch engines and tensorrt it is torch's process-wide thread count)."""
    folder = Path(args.model)
    engine_name, options = engine_for_flags(folder, args.engine, args.device, args.precision, args.threads)
    engine = load_engine(folder, engine=engine_name, device=args.device, **options)
    if args.threads is not None and engine_name not in THREADED_ENGINES:
        import torch  # the torch, triton or tensorrt engine that just loaded imported it

        torch.set_num_threads(args.threads)
    return engine


def _log_to_stderr(level: str) -> None:
    """The server's own log (the worker's failures, with their tracebacks) on stderr, at uvicorn's level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    logger = logging.getLogger("ldm_runtime")
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def _read_api_key(path: str | None) -> str | None:
    if path is not None:
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ServeError(f"--api-key-file {path} cannot be read ({getattr(error, 'strerror', None) or error}); "
                             f"expected a UTF-8 text file holding the key") from None
        if not key:
            raise ServeError(f"--api-key-file {path} is empty; expected a text file holding the key")
        return key
    key = os.environ.get(API_KEY_ENV, "").strip()
    return key or None


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        raise ServeError(f"cannot listen on {host}:{port} ({error.strerror or error}); expected a free port on a "
                         f"local address") from None
    sock.set_inheritable(True)
    return sock


def _check_range(flag: str, value: int, low: int, high: int | None, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        expected = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise ServeError(f"{flag} is {value}; expected {expected}{why}")


if __name__ == "__main__":
    sys.exit(main())
