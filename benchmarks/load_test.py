"""Load test of ``ldm-serve``: the three batching modes side by side, then an overload run.

    OMP_NUM_THREADS=1 python benchmarks/load_test.py --model runs/engine-shapes-random --build shapes

The script starts ``ldm-serve`` once per mode (none, dynamic, step), each on a free loopback port with one
engine thread, and for each concurrency (1, 4, 16, 64 by default) runs that many closed-loop httpx clients in
asyncio for ``--seconds`` per mode, in ``--rounds`` rounds with the modes taking turns: each client sends a
request, waits for its answer, and sends the next. Requests mix step counts (``--steps``, drawn per request),
so batches hold samples at different steps. Reported per cell:
images/s, p50/p95/p99 latency of the answered requests, and errors (any answer but 200, or no answer).

The overload run then starts the server in step mode with a short queue (``--overload-queue``) and fires
``--overload-clients`` requests at once: every one must get its image or a 429/503 (no other 5xx, nothing
lost). Results print as Markdown tables; ``--json`` writes them as well.

``--replicas 1,2`` instead compares one ``ldm-serve`` process with ``ldm-serve --replicas R`` on a local Ray
instance (``ldm_serve.replicas``) for each R, all with step batching and one engine thread per process or
replica, at each concurrency for ``--seconds``, one setup after another (each Ray instance is started and stopped
in turn), with the images/s of each against the one process:

    OMP_NUM_THREADS=1 python benchmarks/load_test.py --model runs/engine-shapes-random --build shapes \
        --replicas 1,2 --concurrency 16 --seconds 60

``--curve 0.25,0.5,0.8,1,1.25,1.5`` instead draws load curves, as the serving benchmarks of vLLM and SGLang do: it
starts ``ldm-serve`` once per batching mode with a bounded queue (``--curve-queue``), measures each mode's capacity
(completed requests/s of ``--capacity-clients`` closed-loop clients for ``--capacity-seconds``, after as long as
``--warm-up-seconds`` of the same, not counted) and takes the highest as the server's capacity (or takes
``--capacity``), then offers each mode the same open-loop Poisson arrivals at each multiple of it for
``--seconds``, the modes taking turns at each load (in ``--curve-rounds`` rounds). Requests mix
``--mix-steps`` step counts, ``--mix-sizes`` image sides and guidance on (``--guidance``) or off (1), drawn per
request. Per mode and load it records completed requests/s (answered 200 over the time from the first arrival to
the last answer), p50/p90/p99 latency (the client's, request to answer) split into queue wait and service (the
server's ``timings``: arrival to start, start to answer), and the share refused with 429. Tables print as
Markdown; ``--plot`` draws the curves:

    OMP_NUM_THREADS=1 python benchmarks/load_test.py --model runs/serve-load-tiny --build tiny --max-batch 8 \
        --curve 0.25,0.5,0.8,1,1.25,1.5 --seconds 40 --json benchmarks/results/cpu-load-curves.json \
        --plot benchmarks/results/cpu-load-curves.png

``--build PRESET`` first writes a random-weight checkpoint of an ``ldm_runtime.config`` preset ("shapes": the
4.6 M parameter UNet with MiniLM; "tiny": the 16 px model the tests export) and exports it to ``--model`` with a
UNet batch range up to 32, unless ``--model`` already holds an engine dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from ldm_runtime.pipeline import DEFAULT_GUIDANCE_SCALE
from ldm_serve.batcher import BatcherConfig
from ldm_tools.serve_process import ServeProcess, ServeProcessError, free_port

MODES = ("none", "dynamic", "step")
START_TIMEOUT_S = 180
REPLICAS_START_TIMEOUT_S = 600  # a local Ray instance, its proxy and the replicas
PROMPTS = ["a red circle on the left", "a large blue square", "two yellow stars on a green background",
           "a small purple triangle at the top", "a white cross in the center"]


def build_model(preset_name: str, engine_dir: Path) -> None:
    """A random-weight checkpoint of ``preset_name`` exported (fp32, onnxruntime, no validation) to ``engine_dir``."""
    from ldm_export.cli import main as export_main
    from ldm_runtime.config import preset
    from ldm_train.checkpoint import write_random_checkpoint

    checkpoint = Path(tempfile.mkdtemp(prefix="load-test-checkpoint-"))
    write_random_checkpoint(checkpoint, preset(preset_name))
    try:
        code = export_main([str(checkpoint), "--out", str(engine_dir), "--engine", "fp32", "--skip-validation",
                            "--batch-range", "1:16:32"])
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)
    if code != 0:
        raise SystemExit(f"load_test: export of the {preset_name} model failed (exit {code})")


def start_server(model: Path, flags: list[str], start_timeout_s: float = START_TIMEOUT_S) -> ServeProcess:
    """``ldm-serve`` on a free loopback port, warmed up; exits with its log if it does not get there."""
    try:
        return ServeProcess(model, *flags, start_timeout_s=start_timeout_s).wait_ready()
    except ServeProcessError as error:
        raise SystemExit(f"load_test: {error}") from None


def compare_replicas(model: Path, serve_flags: list[str], replica_counts: list[int], concurrencies: list[int],
                     seconds: float, steps: list[int], guidance: float, seed: int) -> dict[str, list[dict]]:
    """One process, then ``--replicas R`` for each R (one Ray instance at a time), each warmed up by a short run
    before its measured one at each concurrency."""
    setups = {"one process": []} | {f"{count} replica{'s' if count > 1 else ''}": ["--replicas", str(count),
                                                                                  "--port", str(free_port())]
                                    for count in replica_counts}
    results: dict[str, list[dict]] = {}
    for name, flags in setups.items():
        server = start_server(model, serve_flags + ["--batching", "step", *flags],
                              start_timeout_s=REPLICAS_START_TIMEOUT_S if flags else START_TIMEOUT_S)
        try:
            asyncio.run(closed_loop(server.url, max(concurrencies), min(10.0, seconds), steps, guidance, seed))
            results[name] = []
            for concurrency in concurrencies:
                cell = merge_rounds([asyncio.run(closed_loop(server.url, concurrency, seconds, steps, guidance,
                                                             seed + 1))])
                results[name].append(cell)
                print(f"{name:12s} c={concurrency:3d}: {cell['images_per_s']:6.2f} img/s, p50 {cell['p50_ms']:7.0f} "
                      f"p95 {cell['p95_ms']:7.0f} p99 {cell['p99_ms']:7.0f} ms, errors {cell['errors']}",
                      file=sys.stderr, flush=True)
        finally:
            server.stop(timeout_s=120)
    return results


def replicas_table(results: dict[str, list[dict]], concurrencies: list[int]) -> str:
    lines = ["| setup | concurrency | images/s | p50 / p95 / p99 ms | errors | images/s against one process |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, cells in results.items():
        for index, cell in enumerate(cells):
            base = results["one process"][index]["images_per_s"]
            lines.append(f"| {name} | {concurrencies[index]} | {cell['images_per_s']:.2f} | {cell['p50_ms']:.0f} / "
                         f"{cell['p95_ms']:.0f} / {cell['p99_ms']:.0f} | {sum(cell['errors'].values())} | "
                         f"{cell['images_per_s'] / base:.2f}× |")
    return "\n".join(lines)


def request_body(rng: np.random.Generator, steps: list[int], guidance: float) -> dict:
    """A request with a prompt of its own (no two alike, so no server-side cache answers the text encoder)."""
    prompt = f"{PROMPTS[int(rng.integers(len(PROMPTS)))]}, variation {int(rng.integers(10**9))}"
    return {"prompt": prompt, "seed": int(rng.integers(0, 2**62)),
            "steps": int(rng.choice(steps)), "guidance_scale": guidance}


async def closed_loop(url: str, concurrency: int, seconds: float, steps: list[int], guidance: float,
                      seed: int) -> dict:
    """``concurrency`` clients, each sending its next request when the last is answered, for ``seconds``."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        stop_at = time.monotonic() + seconds

        async def one_client(index: int) -> None:
            rng = np.random.default_rng([seed, index])
            while time.monotonic() < stop_at:
                started = time.monotonic()
                try:
                    response = await client.post(f"{url}/v1/images", json=request_body(rng, steps, guidance))
                except httpx.HTTPError as error:
                    errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
                    continue
                if response.status_code == 200:
                    latencies.append(time.monotonic() - started)
                else:
                    errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1

        began = time.monotonic()
        await asyncio.gather(*(one_client(index) for index in range(concurrency)))
        elapsed = time.monotonic() - began
    return {"concurrency": concurrency, "latencies": latencies, "seconds": elapsed, "errors": errors}


def merge_rounds(rounds: list[dict]) -> dict:
    """One table cell from the rounds of one mode and concurrency: images/s over their summed time, latency
    percentiles over all their answered requests, errors summed."""
    latencies = [latency for cell in rounds for latency in cell["latencies"]]
    seconds = sum(cell["seconds"] for cell in rounds)
    errors: dict[str, int] = {}
    for cell in rounds:
        for key, count in cell["errors"].items():
            errors[key] = errors.get(key, 0) + count
    values = np.array(latencies) if latencies else np.array([np.nan])
    return {"concurrency": rounds[0]["concurrency"], "images": len(latencies), "seconds": round(seconds, 3),
            "images_per_s": len(latencies) / seconds, "p50_ms": float(np.percentile(values, 50) * 1e3),
            "p95_ms": float(np.percentile(values, 95) * 1e3), "p99_ms": float(np.percentile(values, 99) * 1e3),
            "errors": errors}


async def overload(url: str, clients: int, steps: list[int], guidance: float, seed: int) -> dict:
    """``clients`` requests at once, each answered or not: counts by status, and transport failures."""
    rng = np.random.default_rng(seed)
    bodies = [request_body(rng, steps, guidance) for _ in range(clients)]
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def send(body: dict) -> str:
            try:
                response = await client.post(f"{url}/v1/images", json=body)
            except httpx.HTTPError as error:
                return f"lost ({type(error).__name__})"
            if response.status_code == 200 and not response.json().get("images"):
                return "200 without an image"
            return str(response.status_code)
        outcomes = await asyncio.gather(*(send(body) for body in bodies))
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def mixed_body(rng: np.random.Generator, steps: list[int], sizes: list[int], guidance: float) -> dict:
    """A request of the load curves' traffic mix: its steps, side and guidance (on, or 1: off) drawn at random."""
    side = int(rng.choice(sizes))
    return {**request_body(rng, steps, float(rng.choice([guidance, 1.0]))), "width": side, "height": side}


async def open_loop(url: str, rate: float, seconds: float, steps: list[int], sizes: list[int], guidance: float,
                    seed: int) -> dict:
    """Poisson arrivals at ``rate`` requests/s for ``seconds``, each sent when it arrives whatever is in flight;
    every answer awaited. The same ``seed`` gives the same arrivals and requests."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=max(1, int(rate * seconds * 2) + 10)))
    arrivals = arrivals[arrivals < seconds]
    bodies = [mixed_body(rng, steps, sizes, guidance) for _ in arrivals]
    answers: list[dict] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        began = time.monotonic()

        async def one(at: float, body: dict) -> None:
            await asyncio.sleep(max(0.0, began + at - time.monotonic()))  # the request's arrival time
            sent = time.monotonic()
            try:
                response = await client.post(f"{url}/v1/images", json=body)
            except httpx.HTTPError as error:
                answers.append({"status": type(error).__name__})
                return
            answer = {"status": str(response.status_code), "done_s": time.monotonic() - began,
                      "latency_s": time.monotonic() - sent, "steps": body["steps"]}
            if response.status_code == 200:
                timings = response.json()["timings"]
                answer.update(queue_s=timings["queue_ms"] / 1e3, service_s=timings["compute_ms"] / 1e3)
            answers.append(answer)

        await asyncio.gather(*(one(float(at), body) for at, body in zip(arrivals, bodies)))
    return {"rate": rate, "seconds": seconds, "sent": len(bodies), "answers": answers}


def run_span_s(run: dict) -> float:
    """The time one ``open_loop`` run took: its arrival window, or up to its last answer with an image."""
    return max([run["seconds"]] + [answer["done_s"] for answer in run["answers"] if answer["status"] == "200"])


def merge_open_loop(runs: list[dict]) -> dict:
    """Rounds of ``open_loop`` at one rate as one run: their answers, and their spans (``run_span_s``) summed, so
    that completed requests/s counts the time between rounds out."""
    if len(runs) == 1:
        return runs[0]
    span = sum(run_span_s(run) for run in runs)
    return {"rate": runs[0]["rate"], "seconds": sum(run["seconds"] for run in runs), "span_s": span,
            "sent": sum(run["sent"] for run in runs), "answers": [answer for run in runs for answer in run["answers"]]}


def curve_point(run: dict, load: float) -> dict:
    """One load's figures from ``open_loop``'s answers: completed requests/s over the arrival window or, when
    answers come later, up to the last answer."""
    done = [answer for answer in run["answers"] if answer["status"] == "200"]
    statuses: dict[str, int] = {}
    for answer in run["answers"]:
        statuses[answer["status"]] = statuses.get(answer["status"], 0) + 1
    span = run.get("span_s") or run_span_s(run)

    def percentiles(key: str) -> list[float]:
        values = np.array([answer[key] for answer in done]) if done else np.array([np.nan])
        return [float(np.percentile(values, q) * 1e3) for q in (50, 90, 99)]

    return {"load": load, "offered_per_s": run["rate"], "sent": run["sent"], "completed": len(done),
            "completed_per_s": len(done) / span, "statuses": statuses,
            "rejected_share": statuses.get("429", 0) / max(1, run["sent"]),
            "latency_ms": percentiles("latency_s"), "queue_ms": percentiles("queue_s"),
            "service_ms": percentiles("service_s")}


def batching_flags(mode: str, max_wait_ms: float) -> list[str]:
    """ldm-serve's flags for batching ``mode``; ``--max-wait-ms`` is dynamic batching's alone."""
    return ["--batching", mode] + (["--max-wait-ms", str(max_wait_ms)] if mode == "dynamic" else [])


def load_curves(model: Path, serve_flags: list[str], modes: list[str], loads: list[float], args) -> dict:
    """Every mode's capacity, then its curve over ``loads`` (multiples of the highest capacity)."""
    steps = [int(value) for value in args.mix_steps.split(",")]
    sizes = [int(value) for value in args.mix_sizes.split(",")]
    clients = args.curve_queue if args.capacity_clients is None else args.capacity_clients
    flags = serve_flags + ["--max-queue", str(args.curve_queue), "--max-steps", str(max(steps)),
                           "--default-steps", str(min(steps))]
    servers = {mode: start_server(model, flags + batching_flags(mode, args.max_wait_ms)) for mode in modes}
    capacities: dict[str, float] = {}
    points: dict[str, list[dict]] = {mode: [] for mode in modes}
    try:
        for mode in modes:
            # first every size at every batch size the mix makes: an engine's first call of a shape costs more
            asyncio.run(closed_loop_mixed(servers[mode].url, clients, args.warm_up_seconds, steps,
                                          sizes, args.guidance, args.seed + 500))
            if args.capacity is not None:
                continue
            cell = asyncio.run(closed_loop_mixed(servers[mode].url, clients, args.capacity_seconds,
                                                 steps, sizes, args.guidance, args.seed))
            capacities[mode] = cell["completed_per_s"]
            print(f"{mode:8s} capacity: {capacities[mode]:.2f} requests/s ({clients} closed-loop "
                  f"clients, {cell['errors']} errors)", file=sys.stderr, flush=True)
        capacity = max(capacities.values()) if args.capacity is None else args.capacity
        for index, load in enumerate(loads):
            rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
            for repeat in range(args.curve_rounds):  # the modes take turns, each round fresh arrivals
                for mode in modes:
                    rounds[mode].append(asyncio.run(open_loop(
                        servers[mode].url, load * capacity, args.seconds / args.curve_rounds, steps, sizes,
                        args.guidance, args.seed + 1000 + index + 100 * repeat)))
            for mode in modes:
                point = curve_point(merge_open_loop(rounds[mode]), load)
                points[mode].append(point)
                print(f"{mode:8s} {load:4.2f}x: {point['completed_per_s']:6.2f}/s done, p50/p90/p99 "
                      f"{'/'.join(f'{value:.0f}' for value in point['latency_ms'])} ms (queue p99 "
                      f"{point['queue_ms'][2]:.0f}), 429 {point['rejected_share']:.0%}", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return {"capacity_per_s": capacity, "capacities_per_s": capacities, "mix": {"steps": steps, "sizes": sizes,
            "guidance": [args.guidance, 1.0]}, "queue": args.curve_queue, "seconds": args.seconds, "curves": points}


async def closed_loop_mixed(url: str, clients: int, seconds: float, steps: list[int], sizes: list[int],
                            guidance: float, seed: int) -> dict:
    """``clients`` closed-loop clients sending the load curves' traffic mix: completed requests/s and errors."""
    done, errors = 0, 0
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        stop_at = time.monotonic() + seconds

        async def one_client(index: int) -> None:
            nonlocal done, errors
            rng = np.random.default_rng([seed, index])
            while time.monotonic() < stop_at:
                try:
                    response = await client.post(f"{url}/v1/images", json=mixed_body(rng, steps, sizes, guidance))
                except httpx.HTTPError:
                    errors += 1
                    continue
                if response.status_code == 200:
                    done += 1
                else:
                    errors += 1

        began = time.monotonic()
        await asyncio.gather(*(one_client(index) for index in range(clients)))
    return {"completed_per_s": done / (time.monotonic() - began), "errors": errors}


def curves_table(result: dict) -> str:
    """The load curves as Markdown: a row per load, a column group per mode."""
    modes = list(result["curves"])
    lines = ["| load | offered/s | " + " | ".join(f"{mode}: done/s, p50 / p90 / p99 ms (queue p99), 429"
                                                  for mode in modes) + " |",
             "|" + " --- |" * (len(modes) + 2)]
    for index, point in enumerate(result["curves"][modes[0]]):
        cells = []
        for mode in modes:
            cell = result["curves"][mode][index]
            latency = " / ".join(f"{value:.0f}" for value in cell["latency_ms"])
            cells.append(f"{cell['completed_per_s']:.2f}, {latency} ({cell['queue_ms'][2]:.0f}), "
                         f"{cell['rejected_share']:.0%}")
        lines.append(f"| {point['load']:g}× | {point['offered_per_s']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(result: dict, path: Path, title: str) -> None:
    """p50 and p99 latency, completed requests/s and the 429 share against offered load, a line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for mode, points in result["curves"].items():
        loads = [point["load"] for point in points]
        line, = axes[0].plot(loads, [point["latency_ms"][2] / 1e3 for point in points], marker="o",
                             label=f"{mode} p99")
        axes[0].plot(loads, [point["latency_ms"][0] / 1e3 for point in points], marker=".", linestyle="--",
                     color=line.get_color(), label=f"{mode} p50")
        axes[1].plot(loads, [point["completed_per_s"] for point in points], marker="o", label=mode)
        axes[2].plot(loads, [100 * point["rejected_share"] for point in points], marker="o", label=mode)
    offered = [point["offered_per_s"] for point in next(iter(result["curves"].values()))]
    axes[1].plot([point["load"] for point in next(iter(result["curves"].values()))], offered, color="grey",
                 linestyle=":", label="offered")
    for axis, label in zip(axes, ("latency (s)", "completed requests/s", "refused with 429 (%)")):
        axis.set_xlabel(f"offered load (× capacity {result['capacity_per_s']:.2f} requests/s)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown_table(results: dict[str, list[dict]], concurrencies: list[int]) -> str:
    header = "| concurrency | " + " | ".join(f"{mode}: img/s, p50 / p95 / p99 ms, errors" for mode in MODES) + " |"
    lines = [header, "|" + " --- |" * (len(MODES) + 1)]
    for index, concurrency in enumerate(concurrencies):
        cells = []
        for mode in MODES:
            cell = results[mode][index]
            errors = sum(cell["errors"].values())
            cells.append(f"{cell['images_per_s']:.1f}, {cell['p50_ms']:.0f} / {cell['p95_ms']:.0f} / "
                         f"{cell['p99_ms']:.0f}, {errors}")
        lines.append(f"| {concurrency} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="the engine dir (or checkpoint dir) to serve")
    parser.add_argument("--build", choices=("shapes", "tiny"), default=None,
                        help="write a random-weight model of this preset to --model first, if it is not there")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=12.0, help="per mode and concurrency (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="the seconds of each cell are split into this many rounds, modes taking turns")
    parser.add_argument("--steps", default="10,25,50", help="step counts requests draw from (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE,
                        help="guidance scale (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=16, help="ldm-serve --max-batch (default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=BatcherConfig().max_wait_s * 1000,
                        help="ldm-serve --max-wait-ms (default: %(default)s, ldm-serve's own)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated (default: %(default)s)")
    parser.add_argument("--overload-clients", type=int, default=200, help="0 skips the overload run")
    parser.add_argument("--overload-queue", type=int, default=8, help="ldm-serve --max-queue in the overload run")
    parser.add_argument("--engine", default="onnxruntime",
                        help="ldm-serve --engine (default: %(default)s, which compiles nothing per batch size: "
                             "openvino compiles each batch bucket on its first use, in every replica)")
    parser.add_argument("--replicas", default=None, metavar="R,R...",
                        help="compare one process with ldm-serve --replicas R for each R instead (the ray extra)")
    parser.add_argument("--curve", default=None, metavar="LOAD,LOAD...",
                        help="draw load curves at these multiples of the measured capacity instead")
    parser.add_argument("--mix-steps", default="10,20,30,40,50", help="--curve: step counts requests draw from")
    parser.add_argument("--mix-sizes", default="16,24,32", help="--curve: image sides requests draw from")
    parser.add_argument("--curve-queue", type=int, default=16, help="--curve: ldm-serve --max-queue")
    parser.add_argument("--curve-rounds", type=int, default=1,
                        help="--curve: each load's --seconds split into this many rounds, the modes taking turns, "
                             "so that drift in the machine falls on every mode alike (default: %(default)s)")
    parser.add_argument("--capacity-clients", type=int, default=None,
                        help="--curve: closed-loop clients that measure capacity (default: --curve-queue, so that "
                             "the queue is never full and no client is refused)")
    parser.add_argument("--capacity-seconds", type=float, default=30.0,
                        help="--curve: seconds each mode's capacity is measured for")
    parser.add_argument("--capacity", type=float, default=None, metavar="REQUESTS_PER_S",
                        help="--curve: take this capacity instead of measuring it (another run's, so that the "
                             "offered loads are the same)")
    parser.add_argument("--warm-up-seconds", type=float, default=15.0,
                        help="--curve: seconds of the same closed loop, not counted, before capacity is measured")
    parser.add_argument("--plot", type=Path, default=None, help="--curve: draw the curves into this PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    concurrencies = [int(value) for value in args.concurrency.split(",")]
    steps = [int(value) for value in args.steps.split(",")]
    modes = args.modes.split(",")
    if args.build and not (args.model / "manifest.json").is_file():
        build_model(args.build, args.model)

    mix = (f"steps drawn from {args.mix_steps}, sides from {args.mix_sizes}, guidance {args.guidance} or 1"
           if args.curve else f"steps drawn from {steps}, guidance {args.guidance}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; model {args.model}; {mix}", file=sys.stderr)
    serve_flags = ["--max-batch", str(args.max_batch), "--max-steps", str(max(steps)), "--default-steps",
                   str(min(steps)), "--request-timeout", "600", "--engine", args.engine]
    if args.curve:
        curve_flags = ["--max-batch", str(args.max_batch), "--request-timeout", "600", "--engine", args.engine]
        result = load_curves(args.model, curve_flags, modes, [float(value) for value in args.curve.split(",")], args)
        result["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        print(curves_table(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        if args.plot:
            plot_curves(result, args.plot, f"ldm-serve load curves: {args.model.name}, --max-batch {args.max_batch}, "
                                           f"--max-queue {args.curve_queue}, steps {args.mix_steps}, sides "
                                           f"{args.mix_sizes}, guidance {args.guidance:g} or 1")
        return 0
    if args.replicas:
        counts = [int(value) for value in args.replicas.split(",")]
        results = compare_replicas(args.model, serve_flags + ["--max-queue", str(4 * max(concurrencies))], counts,
                                   concurrencies, args.seconds, steps, args.guidance, args.seed)
        print(replicas_table(results, concurrencies))
        if args.json:
            args.json.write_text(json.dumps({"replicas": results}, indent=2))
        return 0
    # All servers run side by side (an idle one costs nothing) and the modes take turns in short rounds, so a
    # drift in the machine's load (another job, clock speed) falls on every mode alike.
    queue = str(4 * max(concurrencies))
    servers = {mode: start_server(args.model,
                                  serve_flags + batching_flags(mode, args.max_wait_ms) + ["--max-queue", queue])
               for mode in modes}
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    try:
        for concurrency in concurrencies:
            rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
            for repeat in range(args.rounds):
                for mode in modes:
                    rounds[mode].append(asyncio.run(closed_loop(servers[mode].url, concurrency,
                                                                args.seconds / args.rounds, steps, args.guidance,
                                                                args.seed + repeat)))
            for mode in modes:
                cell = merge_rounds(rounds[mode])
                results[mode].append(cell)
                print(f"{mode:8s} c={concurrency:3d}: {cell['images_per_s']:6.2f} img/s, p50 {cell['p50_ms']:7.0f} "
                      f"p95 {cell['p95_ms']:7.0f} p99 {cell['p99_ms']:7.0f} ms, errors {cell['errors']}",
                      file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    output: dict = {"sweep": results}
    if set(modes) == set(MODES):
        print(markdown_table(results, concurrencies))
    if args.overload_clients:
        server = start_server(args.model, serve_flags + ["--batching", "step", "--max-queue", str(args.overload_queue)])
        try:
            counts = asyncio.run(overload(server.url, args.overload_clients, steps, args.guidance, args.seed))
        finally:
            exit_code = server.stop(timeout_s=60)
        output["overload"] = {"clients": args.overload_clients, "queue": args.overload_queue, "outcomes": counts,
                              "server_exit_code": exit_code}
        bad = {key: value for key, value in counts.items() if key not in ("200", "429", "503")}
        print(f"\noverload: {args.overload_clients} clients at once, step batching, --max-queue "
              f"{args.overload_queue}: {json.dumps(counts, sort_keys=True)}; other 5xx or lost: "
              f"{sum(bad.values())}; server exit status after SIGTERM {exit_code}")
    if args.json:
        args.json.write_text(json.dumps(output, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
