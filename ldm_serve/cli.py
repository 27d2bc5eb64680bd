"""``ldm-serve``: text-to-image over HTTP from one model folder, with step-level batching.

    ldm-serve --model runs/engine --port 8000
    curl -s localhost:8000/v1/images -H 'Content-Type: application/json' -H 'Accept: image/png' \
        -d '{"prompt": "a red circle", "seed": 7}' -o out.png

``http://localhost:8000/`` is a page to try it in a browser; ``/v1/images/generations`` speaks the OpenAI images
API, so that OpenAI's clients work with ``base_url="http://localhost:8000/v1"``.

The engine is loaded before the server binds, so a bad folder or flag is one line ``ldm-serve: error: ...``
on stderr and exit status 2. Then the server listens at once (``/healthz`` answers) while a worker thread
warms the engine up (``/readyz`` answers 503 until it is done). SIGTERM or SIGINT drains: the listening
socket closes, requests still arriving or newly arrived get 503, queued and running requests finish, and the
process exits 0; whatever is left when ``--drain-timeout`` runs out gets 503 then, so the process exits
within the drain time whatever clients do. A request's header and body must arrive within
``--header-timeout`` and ``--body-timeout`` (``ldm_serve.protocol``), else 408 and the connection closes.
An API key is required when ``--api-key-file`` is given or ``LDM_SERVE_API_KEY`` is set: then every route
but the page, ``/healthz`` and ``/readyz`` needs it (``ldm_serve.middleware``). Only the Host names of loopback,
``--host`` and ``--allowed-hosts`` are answered, and only ``--cors-origin`` pages may read the answers
(``ldm_serve.browser``). The server itself is ``ldm_serve.server``; this module is its command line.

``--replicas N`` (or ``--min-replicas``/``--max-replicas``, autoscaled) runs the same app in Ray Serve replicas
behind Ray Serve's HTTP proxy instead, on a local Ray instance or the cluster at ``--ray-address``
(``ldm_serve.replicas``, the ``ray`` extra).

``LDM_SERVE_STEP_GATE=FILE`` holds the worker at step boundaries while FILE exists (``batcher.StepGate``): the
tests use it to keep requests queued or running for as long as they need, whatever the machine's speed.
"""

from __future__ import annotations

import argparse
import sys

from ldm_runtime.adapters import named_adapter_argument
from ldm_runtime.command_line import OneLineArgumentParser, finite_float, noise_interval, report_user_error
from ldm_runtime.config import CACHE_SCHEDULES, MAX_CACHE_INTERVAL
from ldm_runtime.engines import AUTO_ENGINE_HELP, ENGINE_NAMES, PRECISION_HELP, PRECISION_NAMES
from ldm_runtime.errors import UserError
from ldm_runtime.schedulers import SAMPLER_NAMES
from ldm_serve.batcher import BATCHING_MODES, BatcherConfig
from ldm_serve.request_schema import ServeLimits
from ldm_serve.server import (API_KEY_ENV, BODY_TIMEOUT_S, DRAIN_TIMEOUT_S, HEADER_TIMEOUT_S, PROG, ServeError,
                              bind_socket, build_app, check_range, prepare_server)
from ldm_serve.text_cache import DEFAULT_CAPACITY

LIMIT_DEFAULTS = ServeLimits()
BATCHER_DEFAULTS = BatcherConfig()


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
    parser.add_argument("--max-wait-ms", type=finite_float, default=None,
                        help=f"--batching dynamic only: how long a request waits for company "
                             f"(default: {BATCHER_DEFAULTS.max_wait_s * 1000:g})")
    parser.add_argument("--request-timeout", type=finite_float, default=LIMIT_DEFAULTS.request_timeout_s, metavar="S",
                        help="seconds from arrival after which a request is dropped with 503 (default: %(default)s)")
    parser.add_argument("--max-n", type=int, default=None,
                        help=f"most images per request, at most --max-batch (default: {LIMIT_DEFAULTS.max_n}, or "
                             f"--max-batch where that is fewer)")
    parser.add_argument("--max-steps", type=int, default=LIMIT_DEFAULTS.max_steps,
                        help="most sampler steps per request (default: %(default)s)")
    parser.add_argument("--default-steps", type=int, default=None,
                        help=f"steps of a request that names none (default: the model's default_sampler steps, "
                             f"else {LIMIT_DEFAULTS.default_steps})")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                        help=f"the sampler of a request that names none; a request may name any of them "
                             f"(default: the model's default_sampler, else {LIMIT_DEFAULTS.default_sampler})")
    parser.add_argument("--guidance-interval", type=noise_interval, default=None, metavar="LOW,HIGH",
                        help="the guidance interval of a request that names none: guidance only at the UNet calls "
                             "whose noise level sigma lies in (LOW, HIGH], the conditional branch alone at the "
                             "others (default: the model's default_sampler.guidance_interval, else every call)")
    parser.add_argument("--cache-interval", type=int, default=None, metavar="N",
                        help=f"the cache interval of a request that names none: the whole UNet at one step in N "
                             f"and only its shallow part, on the deep features cached at the last whole step, at the "
                             f"steps between (DeepCache); N from 1 to {MAX_CACHE_INTERVAL}, N > 1 on an engine that "
                             f"caches (default: the model's default_sampler.cache_interval, else "
                             f"{LIMIT_DEFAULTS.default_cache_interval})")
    parser.add_argument("--cache-schedule", choices=CACHE_SCHEDULES, default=None,
                        help=f"the cache schedule of a request that names none: which steps run the whole UNet "
                             f"(default: the model's default_sampler.cache_schedule, else "
                             f"{LIMIT_DEFAULTS.default_cache_schedule})")
    parser.add_argument("--max-size", type=int, default=None,
                        help="largest image side in pixels (default: the engine's largest)")
    parser.add_argument("--max-prompt-chars", type=int, default=LIMIT_DEFAULTS.max_prompt_chars,
                        help="longest prompt or negative prompt in characters (default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=None,
                        help="largest body of a request without images; beyond it 413 (the image routes add room for two "
                             "uploads of --max-size) (default: what the longest valid request needs, "
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
                             f"/v1/images/generations, /v1/images/edits, /metrics, /openapi.json and /docs (the page "
                             f"has a field for "
                             f"the key)")
    parser.add_argument("--allowed-hosts", action="append", metavar="NAME",
                        help="a Host name the server answers besides loopback's and --host's, against DNS "
                             "rebinding (repeatable; * answers any); another Host gets 400")
    parser.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                        help="an origin (such as https://example.com) whose pages may read the server's answers "
                             "(repeatable; default: none, so no other site's page can)")
    parser.add_argument("--engine", choices=ENGINE_NAMES, default="auto",
                        help=f"{AUTO_ENGINE_HELP} (and says which)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--lora", action="append", type=named_adapter_argument, metavar="NAME=FILE",
                        help="load the LoRA adapter FILE (.safetensors, diffusers/PEFT or kohya) under NAME, for "
                             "requests to apply per request with \"lora\": [{\"name\": NAME, \"scale\": S}] "
                             "(repeatable; the torch engine, or an engine dir exported with ldm-export --lora-slots)")
    parser.add_argument("--text-cache", type=int, default=DEFAULT_CAPACITY, metavar="N",
                        help="prompts whose text encoding is remembered, 0 for none (default: %(default)s)")
    parser.add_argument("--precision", choices=PRECISION_NAMES, default="auto", help=PRECISION_HELP)
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
        server, sock = prepare_server(args)
    except UserError as error:
        return report_user_error(PROG, error)
    except KeyboardInterrupt:  # while the engine loads and warms up; once serving, SIGINT drains (server.run)
        print(f"{PROG}: interrupted before serving", file=sys.stderr)
        return 130
    server.run(sockets=[sock])
    print(f"{PROG}: drained and stopped", file=sys.stderr)
    return 0


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

    check_range("--port", args.port, 0, 65535)
    if args.ray_address is None:  # in use: the only line, before the engine loads, not Ray's proxy failing later
        bind_socket(args.host, args.port).close()
    _, batcher, api_key, description = build_app(args)  # the replicas load their own; this one is let go
    max_batch = batcher.config.max_batch
    del batcher
    return serve_replicas(args, api_key, description, max_batch, counts)


def replica_counts(args: argparse.Namespace) -> tuple[int, int | None, int | None]:
    """``(initial, min, max)`` replicas from ``--replicas``, ``--min-replicas`` and ``--max-replicas``; min and max
    are None without autoscaling. A ``ServeError`` names a count out of range."""
    low, high = args.min_replicas, args.max_replicas
    if low is None and high is None:
        check_range("--replicas", args.replicas, 1, None)
        return args.replicas, None, None
    if low is not None:
        check_range("--min-replicas", low, 1, None)
    low = 1 if low is None else low
    if high is None:
        raise ServeError(f"--min-replicas is {low} without --max-replicas; expected both, for autoscaling between "
                         f"them")
    check_range("--max-replicas", high, low, None, " (--min-replicas)")
    initial = low if args.replicas is None else args.replicas
    check_range("--replicas", initial, low, high, " (from --min-replicas to --max-replicas)")
    return initial, low, high


if __name__ == "__main__":
    sys.exit(main())
