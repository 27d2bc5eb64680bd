"""A discrete-event model of ``ldm-serve``'s batcher under the load curves' traffic, to ask which admission policy
could bring step batching's p99 latency to half of dynamic batching's: a model, not a measurement.

    python benchmarks/batching_model.py                      # the CPU costs measured on the tiny model
    python benchmarks/batching_model.py --row-ms 0.002       # a UNet row almost free in a batch (a GPU's regime)

The server is one worker running UNet calls, as ``ldm_serve.batcher`` does: at each step, one call per latent size
over every running image (guided images two rows), costing ``--call-ms`` + ``--row-ms`` per row at 8×8 latents (a
16×16 latent row counts 4); a request costs ``--start-ms`` when it starts (text encoding) and ``--decode-ms`` ×
its latent area when it finishes. Requests arrive as Poisson arrivals and draw their steps (10 to 50), side (16, 24
or 32 px, latents 8, 12 or 16) and guidance (on or off) as ``benchmarks/load_test.py --curve`` draws them; at most
``--max-batch`` images run and ``--queue`` wait (more are refused). Policies, each over the same arrivals:

- ``dynamic``: an empty batch takes what waits (first come, first served) and runs until every image has finished;
- ``step``: at every step boundary, waiting requests join while the batch has room (first come, first served);
- ``step budget B``: as ``step``, but a request joins a running batch only while the batch's rows (counted at
  8×8 latents) stay within B: fewer requests share each step, at a lower throughput;
- ``step largest first``: as ``step``, the waiting request with the most work joins first.

Capacity is dynamic's and step's completed requests/s with every request waiting from the start; offered loads
are multiples of the higher, as in the load curves. The defaults are the tiny model's UNet costs measured on a
2-core CPU (``benchmarks/bench_engine_unet.py``: 1.7 ms for 2 rows, 8.2 ms for 32, so about 1.3 ms a call and
0.22 ms a row).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

STEPS = (10, 20, 30, 40, 50)
LATENT_AREA = {16: 1.0, 24: 2.25, 32: 4.0}  # a row's cost against an 8×8 latent row, by image side


def draw_requests(rate: float, count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, count))
    return [{"at": float(at), "steps": int(rng.choice(STEPS)), "area": LATENT_AREA[int(rng.choice(list(LATENT_AREA)))],
             "rows": int(rng.choice([2, 1]))} for at in arrivals]


def rows_of(request: dict) -> float:
    return request["rows"] * request["area"]


def step_seconds(running: list[dict], costs: argparse.Namespace) -> float:
    by_size: dict[float, float] = {}
    for request in running:
        by_size[request["area"]] = by_size.get(request["area"], 0.0) + rows_of(request)
    return sum(costs.call_ms + costs.row_ms * rows for rows in by_size.values()) / 1e3


def serve(requests: list[dict], policy: str, costs: argparse.Namespace, budget: float | None = None,
          queue_limit: int | None = None) -> dict:
    """Run ``requests`` (copied) through one policy: completed requests/s, latency percentiles, refused share."""
    requests = [dict(request) for request in requests]
    queue_limit = costs.queue if queue_limit is None else queue_limit
    now, waiting, running, latencies, refused, index = 0.0, [], [], [], 0, 0
    while index < len(requests) or waiting or running:
        while index < len(requests) and requests[index]["at"] <= now:
            if len(waiting) >= queue_limit:
                refused += 1
            else:
                waiting.append(requests[index])
            index += 1
        if not waiting and not running:
            now = requests[index]["at"]
            continue
        if policy == "step largest first":
            waiting.sort(key=lambda request: -request["steps"] * rows_of(request))
        if policy != "dynamic" or not running:
            rows = sum(rows_of(request) for request in running)
            while waiting and len(running) < costs.max_batch:
                if budget is not None and running and rows + rows_of(waiting[0]) > budget:
                    break
                request = waiting.pop(0)
                request["left"] = request["steps"]
                running.append(request)
                rows += rows_of(request)
                now += costs.start_ms / 1e3
        now += step_seconds(running, costs)
        for request in running:
            request["left"] -= 1
        for request in running:
            if request["left"] == 0:
                now += costs.decode_ms * request["area"] / 1e3
                latencies.append(now - request["at"])
        running = [request for request in running if request["left"] > 0]
    latencies = np.array(latencies)
    return {"completed_per_s": len(latencies) / (now - requests[0]["at"]), "refused_share": refused / len(requests),
            "p50_ms": float(np.percentile(latencies, 50) * 1e3), "p99_ms": float(np.percentile(latencies, 99) * 1e3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--call-ms", type=float, default=1.3, help="a UNet call's fixed cost (default: %(default)s)")
    parser.add_argument("--row-ms", type=float, default=0.22,
                        help="a UNet row's cost at 8×8 latents (default: %(default)s)")
    parser.add_argument("--start-ms", type=float, default=3.0, help="a request's start (default: %(default)s)")
    parser.add_argument("--decode-ms", type=float, default=3.0,
                        help="an image's decode at 8×8 latents (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=8, help="images per step (default: %(default)s)")
    parser.add_argument("--queue", type=int, default=16, help="requests waiting at most (default: %(default)s)")
    parser.add_argument("--budgets", default="8,16,24", help="row budgets of the budget policy")
    parser.add_argument("--loads", default="0.5,0.8,1", help="offered loads, multiples of the capacity")
    parser.add_argument("--requests", type=int, default=4000, help="requests per load and seed")
    parser.add_argument("--seeds", type=int, default=3, help="arrival draws per load, averaged")
    parser.add_argument("--json", default=None, help="also write the results here")
    costs = parser.parse_args(argv)
    policies = {"dynamic": None, "step": None, **{f"step budget {value}": float(value)
                                                   for value in costs.budgets.split(",") if value},
                "step largest first": None}
    saturated = [{**request, "at": 0.0} for request in draw_requests(1.0, 3000, 1)]
    capacities = {name: serve(saturated, name, costs, queue_limit=len(saturated))["completed_per_s"]
                  for name in ("dynamic", "step")}
    capacity = max(capacities.values())
    results: dict = {"costs": vars(costs), "capacity_per_s": capacities, "loads": {}}
    print(f"capacity (requests/s): " + ", ".join(f"{name} {value:.1f}" for name, value in capacities.items()))
    print("| load | " + " | ".join(f"{name}: p99 ms (done/s, refused)" for name in policies)
          + " | step p99 / dynamic |")
    print("|" + " --- |" * (len(policies) + 2))
    for load in (float(value) for value in costs.loads.split(",")):
        cells = {}
        for name, budget in policies.items():
            runs = [serve(draw_requests(load * capacity, costs.requests, 10 + seed), name if "budget" not in name
                          else "step", costs, budget) for seed in range(costs.seeds)]
            cells[name] = {key: float(np.mean([run[key] for run in runs])) for key in runs[0]}
        results["loads"][str(load)] = cells
        print(f"| {load:g}× | " + " | ".join(f"{cell['p99_ms']:.0f} ({cell['completed_per_s']:.1f}/s, "
                                            f"{cell['refused_share']:.0%})" for cell in cells.values())
              + f" | {cells['step']['p99_ms'] / cells['dynamic']['p99_ms']:.2f} |")
    if costs.json:
        with open(costs.json, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
