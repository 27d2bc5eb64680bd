"""Quality against UNet calls for every sampler on a shapes model: ldm-eval's adherence and FID at each setting.

    OMP_NUM_THREADS=2 python benchmarks/quality_vs_steps.py --model runs/demo-fp32 --engine onnxruntime \\
        --json benchmarks/results/cpu-quality-vs-steps.json --plot docs/quality-vs-steps.png

Each setting is a sampler and a step count (``--settings``, default: DDIM at 4, 6, 8, 10, 25, 50 steps and every
other sampler at 2, 3, 4, 5, 6, 8, 10, 15), and optionally a guidance interval (``euler:6:0.5-8``: guidance only
at the UNet calls whose noise level lies in (0.5, 8]; the others run one UNet row instead of two). For each, the
``--num-prompts`` held-out prompts of ldm-eval are sampled with the same seeds (prompt i: seed i) and guidance,
and judged by the shipped attribute classifier
exactly as ``ldm-eval`` judges them (``ldm_tools.evaluate``): adherence per attribute and the in-domain FID. The
engine is loaded once; each setting's images per second is its generation time alone (text encoder, UNet
calls, decoder, in batches of ``--batch-size``). Results are written to ``--json`` after every setting, and a
rerun skips the settings already there, so a long sweep can stop and go on. ``--speed-rounds K`` then times every
setting K more times, the settings taking turns in each round so that a drift in the machine's load falls on all
of them alike, and records the median images/s of the K rounds (``images_per_s``) and their spread.

The bar (``--bar``, default ddim at 25 steps) is met by a setting whose adherence is within 0.02 of the bar's on
every attribute and whose FID is at most 5% above it; the table marks those, and the summary names the fastest
(fewest UNet calls, then most images per second) of each sampler and overall, with its images/s against the
best DDIM setting that meets the bar and against the bar itself.

``ldm-eval frontier`` (``ldm_tools/frontier.py``) measures the same on any list of engines, precisions, samplers,
cache and guidance intervals, adds the distance to a reference run for models without a judge, and plots the
frontier; this script keeps the sampler-by-steps grid and its resumable JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from ldm_runtime.engines import load_engine
from ldm_runtime.schedulers import SAMPLER_NAMES
from ldm_tools.evaluate import DEFAULT_CLASSIFIER, generate_images, load_judge, score_samples

DDIM_STEPS = (4, 6, 8, 10, 25, 50)
SAMPLER_STEPS = (2, 3, 4, 5, 6, 8, 10, 15)
ADHERENCE_MARGIN = 0.02
FID_MARGIN = 0.05


def default_settings() -> list[tuple[str, int]]:
    return [("ddim", steps) for steps in DDIM_STEPS] + [
        (name, steps) for name in SAMPLER_NAMES if name != "ddim" for steps in SAMPLER_STEPS]


def parse_settings(text: str) -> list[tuple]:
    """``"ddim:25,euler:4,euler:6:0.5-8"`` -> ``[("ddim", 25), ("euler", 4), ("euler", 6, (0.5, 8.0))]``."""
    settings: list[tuple] = []
    for item in text.split(","):
        name, steps, *interval = item.strip().split(":")
        try:
            low, high = (float(end) for end in interval[0].split("-")) if interval else (0.0, 1.0)
        except ValueError:
            low, high = -1.0, -1.0
        if (name not in SAMPLER_NAMES or not steps.isdigit() or int(steps) < 1 or len(interval) > 1
                or not 0 <= low < high):
            raise SystemExit(f"quality_vs_steps: --settings item {item!r} is not SAMPLER:STEPS[:LOW-HIGH] with "
                             f"SAMPLER one of {', '.join(SAMPLER_NAMES)}, STEPS an integer >= 1 and 0 <= LOW < HIGH")
        settings.append((name, int(steps), (low, high)) if interval else (name, int(steps)))
    return settings


def unet_calls(name: str, steps: int) -> int:
    """Guided UNet evaluations per image: PLMS takes one more than its steps (diffusers' PNDM does the same)."""
    return steps + 1 if name == "plms" and steps > 1 else steps


def key(name: str, steps: int, interval: tuple[float, float] | None = None) -> str:
    return f"{name}:{steps}" if interval is None else f"{name}:{steps}:{interval[0]:g}-{interval[1]:g}"


def meets(result: dict, bar: dict) -> bool:
    return (all(result["adherence"][attribute] >= bar["adherence"][attribute] - ADHERENCE_MARGIN
                for attribute in bar["adherence"])
            and result["fid_in_domain"] <= bar["fid_in_domain"] * (1 + FID_MARGIN))


def summary(results: dict[str, dict], bar_key: str) -> tuple[str, dict]:
    bar = results[bar_key]
    passing = {name: result for name, result in results.items() if meets(result, bar)}

    def fastest(candidates: dict[str, dict]) -> str | None:
        if not candidates:
            return None
        return min(candidates, key=lambda name: (candidates[name]["unet_calls"], -candidates[name]["images_per_s"]))

    best_ddim = fastest({name: result for name, result in passing.items() if result["sampler"] == "ddim"})
    best = fastest(passing)
    per_sampler = {sampler: fastest({name: result for name, result in passing.items()
                                     if result["sampler"] == sampler}) for sampler in SAMPLER_NAMES}
    facts = {"bar": bar_key, "fastest_meeting_bar": best, "fastest_ddim_meeting_bar": best_ddim,
             "fastest_per_sampler": per_sampler}
    lines = [f"bar: {bar_key} (adherence within {ADHERENCE_MARGIN} on every attribute, FID at most "
             f"{FID_MARGIN:.0%} above {bar['fid_in_domain']:.1f})"]
    if best is not None:
        rate = results[best]["images_per_s"]
        facts["speedup_over_best_ddim"] = rate / results[best_ddim]["images_per_s"] if best_ddim else None
        facts["speedup_over_bar"] = rate / bar["images_per_s"]
        lines.append(f"fastest setting that meets it: {best} ({results[best]['unet_calls']} UNet calls, "
                     f"{rate:.2f} images/s): {facts['speedup_over_best_ddim']:.2f}x the images/s of the fastest DDIM "
                     f"that meets it ({best_ddim}) and {facts['speedup_over_bar']:.2f}x {bar_key}'s")
    for sampler, name in per_sampler.items():
        lines.append(f"  {sampler}: {name or 'none of its settings meets it'}")
    return "\n".join(lines), facts


def label(result: dict) -> str:
    """The sampler of a result, with its guidance interval if it has one."""
    interval = result.get("guidance_interval")
    return result["sampler"] if not interval else f"{result['sampler']}, guidance in ({interval[0]:g}, {interval[1]:g}]"


def table(results: dict[str, dict], bar_key: str) -> str:
    bar = results[bar_key]
    lines = ["| sampler | steps | UNet calls | shape | colour | all | FID | images/s | meets the bar |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in results.values():
        adherence = result["adherence"]
        lines.append(f"| {label(result)} | {result['steps']} | {result['unet_calls']} | {adherence['shape']:.3f} | "
                     f"{adherence['color']:.3f} | {adherence['all']:.3f} | {result['fid_in_domain']:.1f} | "
                     f"{result['images_per_s']:.2f} | {'yes' if meets(result, bar) else ''} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], bar_key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for sampler in dict.fromkeys(label(result) for result in results.values()):
        rows = sorted((r for r in results.values() if label(r) == sampler), key=lambda r: r["unet_calls"])
        calls = [row["unet_calls"] for row in rows]
        style = {"linewidth": 2.5, "color": "black"} if sampler == "ddim" else {"linewidth": 1.2}
        left.plot(calls, [row["adherence"]["all"] for row in rows], marker="o", markersize=3, label=sampler, **style)
        right.plot(calls, [row["fid_in_domain"] for row in rows], marker="o", markersize=3, label=sampler, **style)
    bar = results[bar_key]
    left.axhline(bar["adherence"]["all"] - ADHERENCE_MARGIN, color="grey", linestyle="--", linewidth=1)
    right.axhline(bar["fid_in_domain"] * (1 + FID_MARGIN), color="grey", linestyle="--", linewidth=1)
    calls = sorted({result["steps"] for result in results.values()})  # PLMS's N + 1 calls fall between them
    for axis, label in ((left, "adherence, every attribute"), (right, "in-domain FID (lower is better)")):
        axis.set_xscale("log")
        axis.set_xticks(calls, [str(count) for count in calls])
        axis.minorticks_off()
        axis.set_xlabel("guided UNet calls per image")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    left.set_ylim(0, 1)
    right.set_ylim(bar["fid_in_domain"] * 0.9, bar["fid_in_domain"] * 2)  # higher FIDs are off the chart
    right.legend(fontsize=7, ncol=2)
    figure.suptitle(f"Quality against UNet calls (dashed: the bar, {bar_key} within the margins)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from ldm_train.data.shapes import ShapesDataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint dir or engine dir of a shapes model")
    parser.add_argument("--engine", default="auto", help="as ldm-eval's --engine (default: %(default)s)")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--settings", type=parse_settings, default=None,
                        help="SAMPLER:STEPS,... (default: DDIM at 4-50 steps, the others at 2-15)")
    parser.add_argument("--bar", default="ddim:25", help="the setting the others are judged against")
    parser.add_argument("--json", type=Path, required=True, help="results, written after every setting")
    parser.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG)")
    parser.add_argument("--speed-rounds", type=int, default=0,
                        help="time every setting this many more times, taking turns, and keep the median")
    args = parser.parse_args(argv)
    settings = args.settings or default_settings()
    if args.bar not in {key(*setting) for setting in settings}:
        settings.insert(0, parse_settings(args.bar)[0])

    stored = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results: dict[str, dict] = stored.get("results", {})
    classifier, _ = load_judge(str(DEFAULT_CLASSIFIER))
    engine = load_engine(args.model, engine=args.engine)
    count = args.num_prompts
    prompts = ShapesDataset.heldout(count, engine.info.image_size, 0)
    captions = [prompts.caption(i) for i in range(count)]
    truths = [prompts.labels(i) for i in range(count)]
    real = ShapesDataset.heldout(3 * count, classifier.config.image_size, 0)
    real_a, real_b = real.images_uint8(range(count, 2 * count)), real.images_uint8(range(2 * count, 3 * count))
    machine = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "python": platform.python_version(), "engine": engine.info.name, "model": str(args.model),
               "num_prompts": count, "guidance": args.guidance, "batch_size": args.batch_size,
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    for setting in settings:
        name, steps, interval = (*setting, None)[:3]
        if key(*setting) in results:
            continue
        started = time.perf_counter()
        images = generate_images(engine, captions, list(range(count)), steps, args.guidance, 0.0, args.batch_size,
                                 name, interval)
        seconds = time.perf_counter() - started
        scores = score_samples(images, truths, captions, real_a, real_b, classifier)
        results[key(*setting)] = {
            "sampler": name, "steps": steps, "unet_calls": unet_calls(name, steps), "guidance_interval": interval,
            "adherence": {attribute: round(float(value), 4) for attribute, value in scores["adherence"].items()},
            "fid_in_domain": round(float(scores["fid_in_domain"]), 3),
            "images_per_s": round(count / seconds, 3)}
        print(f"{key(*setting)}: all {scores['adherence']['all']:.3f}, FID {scores['fid_in_domain']:.1f}, "
              f"{count / seconds:.2f} images/s", file=sys.stderr, flush=True)
        partial = args.json.with_suffix(".partial")
        partial.write_text(json.dumps({"machine": machine, "results": results}, indent=1))
        partial.replace(args.json)
    if args.speed_rounds > 0:
        rates: dict[str, list[float]] = {key(*setting): [] for setting in settings}
        for _ in range(args.speed_rounds):
            for setting in settings:
                name, steps, interval = (*setting, None)[:3]
                started = time.perf_counter()
                generate_images(engine, captions, list(range(count)), steps, args.guidance, 0.0, args.batch_size,
                                name, interval)
                rates[key(*setting)].append(count / (time.perf_counter() - started))
        for name, values in rates.items():
            median = float(np.median(values))
            results[name].update(images_per_s=round(median, 3), speed_rounds=len(values),
                                 images_per_s_spread=round((max(values) - min(values)) / median, 3))
        machine["speed_rounds"] = args.speed_rounds
    order = {key(*setting): index for index, setting in enumerate(settings)}
    results = dict(sorted(results.items(), key=lambda item: order.get(item[0], len(order))))
    text, facts = summary(results, args.bar)
    args.json.write_text(json.dumps({"machine": machine, "results": results, "summary": facts}, indent=1))
    print(table(results, args.bar))
    print()
    print(text)
    if args.plot is not None:
        plot(results, args.bar, args.plot)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
