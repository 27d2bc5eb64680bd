"""The ``ldm-serve`` server assembled from its flags: ``build_app`` checks them, loads the engine and builds the
app with its batcher (as one process and every Ray Serve replica do), and ``prepare_server`` binds the socket and
wraps the app in ``DrainingServer``, uvicorn's server with a bounded drain.

Everything a user can get wrong raises ``ServeError`` before the server binds. Once it listens (the line starting
``LISTENING_LINE`` on stderr says where), ``/healthz`` answers while the worker warms the engine up. SIGTERM or
SIGINT drains: new requests get 503, queued and running ones finish, and whatever is left after the drain time
gets 503 then. A request's header and body must each arrive within their timeout (``ldm_serve.protocol``).
An API key comes from the caller, the key file or ``API_KEY_ENV``; ``STEP_GATE_ENV=FILE`` holds the worker at
step boundaries while FILE exists (``batcher.StepGate``), for the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

import uvicorn

from ldm_runtime.adapters import AdapterError, read_header as read_adapter_header
from ldm_runtime.config import DEFAULT_GUIDANCE_SCALE, MAX_CACHE_INTERVAL
from ldm_runtime.engines import (THREADED_ENGINES, engine_for_flags, load_engine, load_engine_with_adapters,
                                 precision_note)
from ldm_runtime.errors import RequestError, UserError
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from ldm_runtime.previews import PREVIEW_FILE, load_latent_preview, preview_for
from ldm_serve.app import create_app
from ldm_serve.batcher import Batcher, BatcherConfig, StepGate, with_images_it_needs
from ldm_serve.browser import ANY_HOST, LOOPBACK_HOSTS
from ldm_serve.metrics import ServeMetrics
from ldm_serve.protocol import GuardedH11Protocol
from ldm_serve.request_schema import ServeLimits, largest_request_bytes, largest_upload_bytes
from ldm_serve.text_cache import TextEncodingCache

PROG = "ldm-serve"
API_KEY_ENV = "LDM_SERVE_API_KEY"
STEP_GATE_ENV = "LDM_SERVE_STEP_GATE"
LISTENING_LINE = f"{PROG}: serving"  # the start of the line that says the server listens (and where)
HEADER_TIMEOUT_S = 20.0  # Apache httpd's mod_reqtimeout starts from 20 s for the header and for the body
BODY_TIMEOUT_S = 20.0
MAX_THREADS = 1024  # --threads: far past any CPU's cores, and within what the engines' thread settings take
DRAIN_TIMEOUT_S = 30.0  # Triton Inference Server's --exit-timeout-secs
ABORT_GRACE_S = 1.0  # after the drain time: for the 503s to go out before connections are cut
WILDCARD_ADDRESSES = ("0.0.0.0", "::")  # every interface: no client sends these as its Host
HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?"  # a name or IPv4 address
                       r"|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*")  # IPv6, bracketed or not
# the flags that set what a request naming none of these settings is sampled with
SETTING_FLAGS = {"guidance_interval": "--guidance-interval", "cache_interval": "--cache-interval",
                 "cache_schedule": "--cache-schedule"}
ORIGIN = re.compile(r"https?://([A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")


class ServeError(UserError):
    """A flag of ``ldm-serve`` that cannot work (a range, an unreadable key file, a port in use)."""


def build_app(args: argparse.Namespace, api_key: str | None = None):
    """Check the flags and load the engine: the app (not started), its batcher, the API key (``api_key`` if
    given, else from ``--api-key-file`` or the environment) and what the serving line says of them."""
    check_range("--port", args.port, 0, 65535)
    check_range("--max-queue", args.max_queue, 1, None)
    if args.max_n is not None:
        check_range("--max-n", args.max_n, 1, None)
    check_range("--max-steps", args.max_steps, 1, None)
    check_range("--max-prompt-chars", args.max_prompt_chars, 1, None)
    if args.max_body_bytes is None:
        args.max_body_bytes = largest_request_bytes(args.max_prompt_chars)
    check_range("--max-body-bytes", args.max_body_bytes, 256, None)
    for flag, seconds in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout),
                          ("--drain-timeout", args.drain_timeout)):
        if not 0 < seconds <= 86_400:  # NaN fails too
            raise ServeError(f"{flag} is {seconds}; expected seconds above 0, at most 86400")
    check_range("--text-cache", args.text_cache, 0, None)
    if args.cache_interval is not None:
        check_range("--cache-interval", args.cache_interval, 1, MAX_CACHE_INTERVAL)
    if args.threads is not None:
        check_range("--threads", args.threads, 1, MAX_THREADS)
    if args.max_wait_ms is not None and args.batching != "dynamic":
        raise ServeError(f"--max-wait-ms applies to --batching dynamic only; this server batches with --batching "
                         f"{args.batching}")
    max_wait_ms = BatcherConfig().max_wait_s * 1000 if args.max_wait_ms is None else args.max_wait_ms
    if not max_wait_ms >= 0 or max_wait_ms > 10_000:
        raise ServeError(f"--max-wait-ms is {max_wait_ms}; expected a number from 0 to 10000")
    if not args.request_timeout > 0 or args.request_timeout > 86_400:
        raise ServeError(f"--request-timeout is {args.request_timeout}; expected seconds above 0, at most 86400")
    allowed_hosts = _allowed_hosts(args.host, args.allowed_hosts or [])
    cors_origins = tuple(_cors_origin(origin) for origin in args.cors_origin or [])
    api_key = api_key if api_key is not None else _read_api_key(args.api_key_file)
    _log_to_stderr(args.log_level)
    engine = _load_engine(args, _adapter_files(getattr(args, "lora", None) or []))
    adapter_names = tuple(sorted(getattr(engine, "adapters", None) or {}))
    pipeline = Pipeline(TextEncodingCache(engine, args.text_cache) if args.text_cache else engine)
    info = engine.info
    most_batch = max(1, info.max_images)
    max_batch = most_batch if args.max_batch is None else args.max_batch
    check_range("--max-batch", max_batch, 1, most_batch, f" (the engine's UNet batch holds {info.max_batch_size} "
                                                          f"rows and guidance doubles each image)")
    max_n = min(ServeLimits().max_n, max_batch) if args.max_n is None else args.max_n
    check_range("--max-n", max_n, 1, max_batch, " (--max-batch)")
    check_range("--max-steps", args.max_steps, 1, pipeline.max_steps, " (what the sampler can plan)")
    sampler = pipeline.default_sampler if args.sampler is None else args.sampler
    default_steps = pipeline.default_steps if args.default_steps is None else args.default_steps
    check_range("--default-steps" if args.default_steps is not None else "the model's default steps", default_steps,
                1, args.max_steps, " (--max-steps)")
    # what a request that names only a prompt is sampled with: the flags, else the model's defaults
    default_request = GenerationRequest(prompt="a request that names only a prompt", seed=0, sampler=sampler,
                                        steps=default_steps, guidance_interval=args.guidance_interval,
                                        cache_interval=args.cache_interval, cache_schedule=args.cache_schedule)
    try:
        pipeline.validate(with_images_it_needs(default_request, info))
    except RequestError as error:
        if error.field in SETTING_FLAGS:  # the model's default, or the flag that overrides it
            flag, value = SETTING_FLAGS[error.field], getattr(pipeline.resolve(default_request), error.field)
            given = (f"{flag} {value}" if getattr(args, error.field) is not None
                     else f"the model's default_sampler.{error.field} {value} ({flag} sets another)")
            raise ServeError(f"{given} cannot serve a request that names no {error.field}: {error}") from None
        raise ServeError(f"--sampler {sampler} with --default-steps {default_steps} cannot serve a "
                         f"request that names neither: {error}") from None
    default_request = pipeline.resolve(default_request)
    max_size = info.max_image_size if args.max_size is None else args.max_size
    check_range("--max-size", max_size, max(info.min_image_size, info.image_size), info.max_image_size,
                 " (the engine's range)")
    if max_size % info.image_size_multiple:
        raise ServeError(f"--max-size is {max_size}; expected a multiple of {info.image_size_multiple}")
    limits = ServeLimits(max_n=max_n, max_steps=args.max_steps, max_prompt_chars=args.max_prompt_chars,
                         max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout,
                         min_size=info.min_image_size, max_size=max_size, size_multiple=info.image_size_multiple,
                         default_size=info.image_size, default_steps=default_steps, default_sampler=sampler,
                         default_guidance_scale=default_request.guidance_scale,
                         default_guidance_interval=default_request.guidance_interval,
                         default_cache_interval=default_request.cache_interval,
                         default_cache_schedule=default_request.cache_schedule,
                         max_cache_interval=MAX_CACHE_INTERVAL if getattr(engine, "deep_cache", False) else 1,
                         max_upload_bytes=largest_upload_bytes(max_size), adapter_names=adapter_names)
    metrics = ServeMetrics(adapter_names)
    gate_path = os.environ.get(STEP_GATE_ENV)
    # the model folder's latent-to-RGB map, else one fitted (or the decoder) on the worker while it warms up
    stored_preview = load_latent_preview(args.model, info.latent_channels, info.latent_factor)
    batcher = Batcher(pipeline, BatcherConfig(mode=args.batching, max_batch=max_batch, max_queue=args.max_queue,
                                              max_wait_s=max_wait_ms / 1000), observer=metrics.observe,
                      step_gate=StepGate(gate_path) if gate_path else None,
                      make_previewer=lambda: preview_for(engine, stored_preview))
    app = create_app(pipeline, batcher, limits, metrics, api_key=api_key, model_name=Path(args.model).name,
                     allowed_hosts=allowed_hosts, cors_origins=cors_origins)
    picked = " picked by --engine auto" if args.engine == "auto" else ""
    description = (f"{args.model} ({info.name} engine{picked}, {args.batching} batching, max batch {max_batch}, "
                   f"queue {args.max_queue}, default sampler {sampler} {default_steps} steps"
                   f"{_default_settings_text(default_request)}"
                   f"{', adapters ' + ', '.join(adapter_names) if adapter_names else ''}"
                   f", previews {'from ' + PREVIEW_FILE if stored_preview else 'fitted at start or by the decoder'}"
                   f"{', API key required' if api_key else ''})")
    if note := precision_note(engine, args.precision):  # once every flag is known good
        logging.getLogger("ldm_runtime.engines").info(note)
    return app, batcher, api_key, description


def _default_settings_text(request: GenerationRequest) -> str:
    """The guidance scale, guidance interval and feature caching of a request that names none, for the serving
    line, where they are not DEFAULT_GUIDANCE_SCALE, guidance at every call and the whole UNet at every step."""
    text = ""
    if request.guidance_scale != DEFAULT_GUIDANCE_SCALE:
        text += f" guidance {request.guidance_scale:g}"
    if request.guidance_interval is not None:
        text += f" guided in ({request.guidance_interval[0]:g}, {request.guidance_interval[1]:g}]"
    if request.cache_interval > 1:
        text += f" whole UNet at 1 step in {request.cache_interval} ({request.cache_schedule})"
    return text


def prepare_server(args: argparse.Namespace) -> tuple[DrainingServer, socket.socket]:
    """Check the flags, load the engine, bind the socket: everything that can fail with a user's error. Says on
    stderr where the server listens; ``server.run(sockets=[sock])`` then serves until SIGTERM or SIGINT."""
    check_range("--port", args.port, 0, 65535)
    sock = bind_socket(args.host, args.port)  # a port in use is the only line, before the engine loads and speaks
    try:
        app, batcher, api_key, description = build_app(args)
    except BaseException:
        sock.close()
        raise
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
    if args.host in WILDCARD_ADDRESSES and not args.allowed_hosts:
        print(f"{PROG}: warning: listening on {args.host} but answering only the Host names "
              f"{', '.join(LOOPBACK_HOSTS)} and {args.host}; --allowed-hosts NAME adds the names clients use",
              file=sys.stderr, flush=True)
    return server, sock


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


def _adapter_files(named: list[tuple[str, Path]]) -> dict[str, Path]:
    """``--lora NAME=FILE``'s {name: file}; ``ServeError`` for a name given twice or a file whose header is not an
    adapter's, before the engine loads (what fits the model is checked once it has)."""
    files: dict[str, Path] = {}
    for name, path in named:
        if name in files:
            raise ServeError(f"--lora {name}={path} repeats the name {name} (--lora {name}={files[name]}); expected "
                             f"each adapter name once")
        try:
            read_adapter_header(Path(path))
        except AdapterError as error:
            raise ServeError(f"--lora: {error}") from None
        files[name] = path
    return files


def _load_engine(args: argparse.Namespace, adapter_files: dict[str, Path]):
    """The engine of ``--model`` with the adapters of ``--lora`` loaded, its calls on ``--threads`` CPU threads
    (onnxruntime's sessions are made with that many; for the torch engines and tensorrt it is torch's
    process-wide thread count)."""
    folder = Path(args.model)
    engine_name, options = engine_for_flags(folder, args.engine, args.device, args.precision, args.threads)
    if not adapter_files:
        engine = load_engine(folder, engine=engine_name, device=args.device, **options)
    else:
        try:
            engine = load_engine_with_adapters(folder, engine_name, args.device, options, adapter_files)
        except AdapterError as error:
            raise ServeError(f"--lora: {error}") from None
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


def _allowed_hosts(bound_host: str, added: list[str]) -> tuple[str, ...] | None:
    """The Host names the server answers: loopback, ``bound_host`` and ``added`` (``--allowed-hosts``); None for
    any, when ``added`` holds ``*``. A ``ServeError`` names a value that is not a bare host name."""
    for name in added:
        if name != ANY_HOST and not HOST_NAME.fullmatch(name):
            raise ServeError(f"--allowed-hosts is {name!r}; expected a host name or address without scheme, port or "
                             f"path (such as example.com, 192.168.1.5 or [fe80::1]), or {ANY_HOST} for any")
    if ANY_HOST in added:
        return None
    return tuple(dict.fromkeys([*LOOPBACK_HOSTS, bound_host, *added]))


def _cors_origin(origin: str) -> str:
    """``--cors-origin``'s value, checked: an origin as browsers send it (scheme, host, optional port)."""
    match = ORIGIN.fullmatch(origin)
    if not match or (match.group(3) is not None and not 0 < int(match.group(3)[1:]) <= 65535):
        raise ServeError(f"--cors-origin is {origin!r}; expected an origin such as https://example.com or "
                         f"http://localhost:3000 (scheme, host and a port from 1 to 65535, no path)")
    return origin.lower()


def _read_api_key(path: str | None) -> str | None:
    """The key of ``--api-key-file`` or of the environment (one, not both), or None: no key; ``ServeError`` for a
    key that is empty or that no client can send (a line break, a control character)."""
    from_environment = os.environ.get(API_KEY_ENV)
    if path is not None and from_environment is not None:
        raise ServeError(f"both --api-key-file and {API_KEY_ENV} give an API key; expected one of them")
    if path is not None:
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ServeError(f"--api-key-file {path} cannot be read ({getattr(error, 'strerror', None) or error}); "
                             f"expected a UTF-8 text file holding the key") from None
        source = f"--api-key-file {path}"
    elif from_environment is not None:
        key, source = from_environment.strip(), API_KEY_ENV
    else:
        return None
    if not key:
        raise ServeError(f"{source} is empty; expected the key (unset {API_KEY_ENV} and give no --api-key-file to "
                         f"serve without one)")
    if any(ord(char) < 32 or ord(char) == 127 for char in key):
        raise ServeError(f"{source} holds a key with a line break or another control character; expected a key of "
                         f"one line (an HTTP header cannot carry those)")
    return key


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (0 picks a free port), inheritable; ``ServeError`` where it cannot be."""
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


def check_range(flag: str, value: int, low: int, high: int | None, why: str = "") -> None:
    """``ServeError`` naming ``flag`` unless ``value`` is an integer from ``low`` to ``high`` (None: no bound)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        expected = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise ServeError(f"{flag} is {value}; expected {expected}{why}")
