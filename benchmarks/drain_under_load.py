"""What clients see while ``ldm-serve`` drains under load: every request sent after SIGTERM, by outcome.

    OMP_NUM_THREADS=1 python benchmarks/drain_under_load.py --model runs/engine-tiny --build tiny --replicas 2

The script starts ``ldm-serve`` (``--replicas R`` on a local Ray instance, or one process with ``--replicas 0``)
on a free loopback port, runs ``--clients`` closed-loop httpx clients (keep-alive connections, as real clients
use; each sends its next request as soon as it has an answer, a 503's ``Retry-After`` not awaited, so that
requests keep arriving through the whole drain) for ``--before-s`` seconds, sends SIGTERM, and lets the clients
go on until each is refused a connection. Every request sent after the signal is counted by what came back:
an image (200), 503 or 429 (each must carry ``Retry-After``), a refused connection (the server no longer
listening: nothing was sent), or a cut one (the connection closed with no answer, or reset). A drain that keeps
its promise cuts none. ``--rounds`` repeats it with a fresh server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import build_model  # noqa: E402  (the script beside this one)

from ldm_tools.serve_process import ServeProcess, ServeProcessError, free_port  # noqa: E402

START_TIMEOUT_S = 900.0
OUTCOMES = ("image", "503", "429", "refused", "cut", "other")


def outcome_of(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "image"
    if response.status_code in (503, 429) and int(response.headers.get("retry-after", "0")) >= 1:
        return str(response.status_code)
    return "other"


async def client(url: str, index: int, stopping: asyncio.Event, counts: dict[str, int], steps: int) -> None:
    """Closed loop until the server refuses this client a connection after SIGTERM."""
    payload = {"prompt": "a red circle", "seed": index, "steps": steps}
    async with httpx.AsyncClient(timeout=300) as session:
        sequence = 0
        while True:
            after_signal = stopping.is_set()
            sequence += 1
            try:
                outcome = outcome_of(await session.post(f"{url}/v1/images", json={**payload, "seed": index * 10**6
                                                                                    + sequence}))
            except httpx.ConnectError:
                outcome = "refused"
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                outcome = "cut"
            if after_signal:
                counts[outcome] += 1
                if outcome == "refused":
                    return
            elif outcome == "refused":
                await asyncio.sleep(0.05)


async def one_round(server: ServeProcess, clients: int, before_s: float, steps: int) -> dict[str, int]:
    stopping = asyncio.Event()
    counts = dict.fromkeys(OUTCOMES, 0)
    tasks = [asyncio.ensure_future(client(server.url, index, stopping, counts, steps)) for index in range(clients)]
    await asyncio.sleep(before_s)
    stopping.set()
    server.process.send_signal(signal.SIGTERM)
    await asyncio.gather(*tasks)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="the engine dir to serve")
    parser.add_argument("--build", choices=("shapes", "tiny"), default=None,
                        help="write a random-weight model of this preset to --model first, if it is not there")
    parser.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas; 0: one process (default: 2)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--before-s", type=float, default=5.0, help="load before SIGTERM (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="sampler steps per request (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh servers, one after another (default: 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.replicas < 0 or args.clients < 1 or args.rounds < 1 or args.before_s < 0 or args.steps < 1:
        parser.error("--replicas must be >= 0, --clients, --rounds and --steps >= 1, --before-s >= 0")
    if args.build and not (args.model / "manifest.json").is_file():
        build_model(args.build, args.model)
    flags = ["--max-queue", str(4 * args.clients), "--max-steps", str(args.steps), "--default-steps", str(args.steps),
             "--engine", "onnxruntime"]
    if args.replicas:
        flags += ["--replicas", str(args.replicas), "--port", str(free_port())]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; {args.replicas or 'no'} replicas, {args.clients} clients", file=sys.stderr)
    rounds = []
    for number in range(args.rounds):
        try:
            server = ServeProcess(args.model, *flags, start_timeout_s=START_TIMEOUT_S).wait_ready()
        except ServeProcessError as error:
            raise SystemExit(f"drain_under_load: {error}") from None
        started = time.monotonic()
        counts = asyncio.run(one_round(server, args.clients, args.before_s, args.steps))
        status = server.process.wait(300)
        counts.update(exit_status=status, drain_s=round(time.monotonic() - started - args.before_s, 1))
        print(f"round {number + 1}: {counts}", file=sys.stderr)
        rounds.append(counts)
    print("| round | sent after SIGTERM | image | 503 | 429 | refused | cut | other | exit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for number, counts in enumerate(rounds, 1):
        sent = sum(counts[outcome] for outcome in OUTCOMES)
        print(f"| {number} | {sent} | " + " | ".join(str(counts[outcome]) for outcome in OUTCOMES)
              + f" | {counts['exit_status']} |")
    if args.json:
        args.json.write_text(json.dumps({"replicas": args.replicas, "clients": args.clients, "rounds": rounds},
                                        indent=2))
    return 0 if all(counts["cut"] == 0 and counts["other"] == 0 for counts in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
