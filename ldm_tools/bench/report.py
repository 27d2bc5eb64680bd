"""From timing samples to what a person reads: medians and spreads, ratios to eager PyTorch, the terminal
table, the JSON file and the plot of UNet steps per second by batch size. Where the engines ran in several groups
(to fit in memory), each row carries its ``group`` and eager PyTorch has a row per group."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ldm_runtime.files import write_text_atomic

WIDE_SPREAD = 0.10  # (max - min) / median past this: the figure is marked as not to be trusted


def summarize(samples: list[float]) -> dict[str, Any]:
    """median, min, max and spread = (max - min) / median of timing samples (seconds)."""
    median = statistics.median(samples)
    spread = (max(samples) - min(samples)) / median if median > 0 else float("inf")
    return {"median": median, "min": min(samples), "max": max(samples), "spread": spread,
            "wide": spread > WIDE_SPREAD or len(samples) < 3, "samples": list(samples)}


def result_rows(step_seconds: dict[tuple[str, int], list[float]], e2e_seconds: dict[tuple[str, int], list[float]],
                engines: list[str], batch_sizes: list[int], baseline: str) -> list[dict[str, Any]]:
    """One row per (engine, batch size) that has samples: steps/s, images/s, latency, ratios to ``baseline``."""
    rows = []
    for batch_size in batch_sizes:
        base_step = step_seconds.get((baseline, batch_size))
        base_e2e = e2e_seconds.get((baseline, batch_size))
        for engine in engines:
            steps, e2e = step_seconds.get((engine, batch_size)), e2e_seconds.get((engine, batch_size))
            if not steps or not e2e:
                continue
            step, latency = summarize(steps), summarize(e2e)
            row = {
                "engine": engine, "batch_size": batch_size,
                "step_seconds": step, "latency_seconds": latency,
                "unet_steps_per_s": 1.0 / step["median"],
                "images_per_s": batch_size / latency["median"],
                "steps_speedup_vs_torch": None, "latency_speedup_vs_torch": None, "steps_speedup_per_round": [],
                "wide_spread": step["wide"] or latency["wide"],
            }
            if base_step and base_e2e:
                row["steps_speedup_vs_torch"] = statistics.median(base_step) / step["median"]
                row["latency_speedup_vs_torch"] = statistics.median(base_e2e) / latency["median"]
                # the i-th samples of every engine come from the same round, taken within seconds of each other:
                # their ratio cancels the machine's drift between rounds that widens each engine's own spread
                row["steps_speedup_per_round"] = [base / mine for base, mine in zip(base_step, steps)]
            rows.append(row)
    return rows


def grouped(report: dict[str, Any]) -> bool:
    """Whether the engines ran in more than one group."""
    return len({row.get("group", 1) for row in report["results"]}) > 1


def group_label(row: dict[str, Any]) -> str:
    return f" (group {row.get('group', 1)})"


def format_table(report: dict[str, Any]) -> str:
    """The terminal table (GitHub markdown, so it pastes into BENCHMARKS.md as it is); with a group column where
    the engines ran in groups."""
    engines = {entry["name"]: entry for entry in report["engines"]}
    in_groups = grouped(report)
    header = ["engine", *(["group"] if in_groups else []), "batch", "UNet steps/s", "× eager", "images/s",
              "latency s", "× eager", "first image s", "peak RSS MiB", "rel. err"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["results"]:
        entry = engines[row["engine"]]
        step, latency = row["step_seconds"], row["latency_seconds"]
        mark = " !" if row["wide_spread"] else ""
        memory = entry.get("peak_rss_mib")
        if entry.get("cuda_max_allocated_mib") is not None:
            memory = f"{memory:.0f} (CUDA {entry['cuda_max_allocated_mib']:.0f})"
        cells = [
            row["engine"], *([str(row.get("group", 1))] if in_groups else []), str(row["batch_size"]),
            f"{row['unet_steps_per_s']:.3g} ±{100 * step['spread']:.0f}%{mark}",
            _ratio(row["steps_speedup_vs_torch"]),
            f"{row['images_per_s']:.3g}",
            f"{latency['median']:.3g} ±{100 * latency['spread']:.0f}%{mark}",
            _ratio(row["latency_speedup_vs_torch"]),
            f"{entry['time_to_first_image_s']:.1f}",
            memory if isinstance(memory, str) else "" if memory is None else f"{memory:.0f}",  # None: it failed
            "" if entry.get("unet_relative_error") is None else f"{entry['unet_relative_error']:.1e}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for entry in report["engines"]:
        if entry["status"] != "ok":
            lines.append(f"| {entry['name']} | {entry['status']}: {entry['reason']} |" + " |" * (len(header) - 2))
    return "\n".join(lines)


def format_profiles(report: dict[str, Any]) -> list[str]:
    """One line per engine and batch size: the operators taking the largest shares of a step's time."""
    lines = []
    for entry in report["engines"]:
        for batch_size, ops in entry.get("profile", {}).items():
            shares = ops if isinstance(ops, str) else ", ".join(f"{op['op']} {100 * op['share']:.0f}%" for op in ops)
            lines.append(f"profile {entry['name']} batch {batch_size}: {shares}")
    return lines


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}×"


def write_json(report: dict[str, Any], path: Path) -> None:
    """``report`` into ``path``, written whole or not at all (a full disk leaves the file as it was)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")


def write_plot(report: dict[str, Any], path: Path) -> None:
    """UNet steps/s (median, bars from the slowest to the fastest repeat) against batch size, one line per
    engine, beside images/s end to end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 40, not 4 x 10^1

    figure, (steps_axes, images_axes) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    in_groups = grouped(report)
    for engine, group in dict.fromkeys((row["engine"], row.get("group", 1)) for row in report["results"]):
        rows = [row for row in report["results"] if (row["engine"], row.get("group", 1)) == (engine, group)]
        batches = [row["batch_size"] for row in rows]
        medians = [row["unet_steps_per_s"] for row in rows]
        low = [median - 1.0 / row["step_seconds"]["max"] for median, row in zip(medians, rows)]
        high = [1.0 / row["step_seconds"]["min"] - median for median, row in zip(medians, rows)]
        label = engine + (group_label(rows[0]) if in_groups else "")
        steps_axes.errorbar(batches, medians, yerr=[low, high], marker="o", capsize=3, label=label)
        images_axes.plot(batches, [row["images_per_s"] for row in rows], marker="o", label=label)
    for axes, label in ((steps_axes, "UNet steps/s (guided, median)"), (images_axes, "images/s end to end")):
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(plain)
        axes.yaxis.set_minor_formatter(plain)
        axes.set_xlabel("batch size (images per request)")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
        batch_sizes = report["settings"]["batch_sizes"]
        axes.set_xticks(batch_sizes, [str(size) for size in batch_sizes])
    steps_axes.legend()
    figure.suptitle(f"ldm-bench: {report['model']['name']} ({report['model']['latent_size']}² latents, "
                    f"{report['settings']['steps']} {report['settings']['sampler']} steps) on "
                    f"{report['machine']['cpu']}, "
                    f"{report['settings']['threads']} thread(s)", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
