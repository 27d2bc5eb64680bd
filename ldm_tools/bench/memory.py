"""Fitting ldm-bench's engine processes in memory: what each needs, what this machine has, which run together.

Every engine is a process holding its own copy of the weights, so at Stable Diffusion's size the peers together can
need more memory than the machine has. ``estimate_rss_mib`` gives an engine's peak resident size (MiB) before it
starts:

    runtime + weight_copies x weights + copies_per_unet_shape x UNet weights x UNet shapes + maps x map

``runtime``: the interpreter and the engine's libraries. ``weights``: every network's parameters at the bytes per
parameter of the files the engine reads (the fp32 checkpoint; the engine dir's fp32 or fp16 graphs);
``weight_copies``: the copies held at the peak, loading included. An engine that prepares the UNet per input shape
(openvino) holds ``copies_per_unet_shape`` of the UNet's weights more, at its compute precision (bf16: 2 bytes),
for each UNet batch bucket the run uses. ``map``: one float32 feature map of the largest request's UNet rows at the
UNet's first-level width and of its decoded images at the decoder's last; ``maps``: how many such maps the engine
holds at its peak on top of the rest (its activations and allocator pools). ``ENGINE_MEMORY`` holds the per-engine
figures, fitted to the peak RSS of ldm-bench's workers on the shapes and sd15 presets (BENCHMARKS.md, "Fitting the
engines in memory"); the JSON report records every engine's estimate beside its measured peak.

``available_memory_mib`` reads what the machine has (MemAvailable, and the cgroup's limit where one is set);
``plan_groups`` splits the engines into groups whose summed peaks fit the budget, the baseline in every group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ldm_runtime.engines.openvino_engine import DEFAULT_BATCH_BUCKETS
from ldm_runtime.guidance import guided_unet_rows
from ldm_tools.bench.workers import ENGINE_DIR_PEERS

MIB = 2**20
AUTO_MARGIN = 0.10  # the share of the available memory --memory-budget auto leaves free (the parent, page cache)
UNLIMITED_BYTES = 2**60  # a cgroup v1 limit at or above this is "no limit" (the kernel writes 2^63 rounded to a page)


@dataclass(frozen=True)
class EngineMemory:
    """One engine's figures in ``estimate_rss_mib``: MiB that do not grow with the model, copies of the weights (as
    the engine reads them) held at the peak, feature maps of the largest request held at the peak, and the share of
    a copy of the UNet's weights it adds per UNet shape, at ``compute_bytes`` per parameter."""

    runtime_mib: float
    weight_copies: float
    maps: float
    copies_per_unet_shape: float = 0.0
    compute_bytes: int = 4


# Fitted to the workers' peak RSS at batch sizes 1,8 on the shapes and sd15 (16x16 latents) presets, 2 threads:
# the torch engines peak while loading (the checkpoint's tensors beside the model's); onnxruntime's arena and
# openvino's per-shape kernels grow with the batch. torch.compile's sd15 peak, triton and diffusers-pipeline were
# not measured: they take eager's and diffusers' weight copies.
ENGINE_MEMORY = {
    "torch": EngineMemory(runtime_mib=380, weight_copies=1.62, maps=4),
    "torch.compile": EngineMemory(runtime_mib=580, weight_copies=1.62, maps=4),
    "torch-bf16": EngineMemory(runtime_mib=410, weight_copies=1.62, maps=4),
    "torch.compile-bf16": EngineMemory(runtime_mib=580, weight_copies=1.62, maps=4),  # torch.compile's, not measured
    "diffusers": EngineMemory(runtime_mib=420, weight_copies=1.62, maps=4),
    "diffusers-pipeline": EngineMemory(runtime_mib=420, weight_copies=1.62, maps=4),
    "triton": EngineMemory(runtime_mib=380, weight_copies=1.62, maps=4),  # on a GPU: the host's copies while loading
    "onnxruntime": EngineMemory(runtime_mib=100, weight_copies=1.14, maps=25),
    "openvino": EngineMemory(runtime_mib=340, weight_copies=1.53, maps=1.5, copies_per_unet_shape=0.25),
    "openvino-bf16": EngineMemory(runtime_mib=350, weight_copies=1.41, maps=1.5, copies_per_unet_shape=0.25,
                                  compute_bytes=2),
}


@dataclass(frozen=True)
class Workload:
    """What an engine process's memory grows with: the model's parameters and sizes, and the requests' batch sizes."""

    unet_parameters: int
    other_parameters: int  # the autoencoder's and the text encoder's
    batch_sizes: tuple[int, ...]  # images per request
    latent_size: int  # latent side
    image_size: int  # image side, pixels
    unet_channels: int  # the UNet's first-level width
    decoder_channels: int  # the autoencoder's full-resolution width
    engine_dir_bytes: int = 4  # bytes per parameter of the engine dir's graphs: 4 (fp32) or 2 (fp16)


def unet_shapes(batch_sizes: tuple[int, ...]) -> int:
    """How many UNet batch buckets an ldm-bench worker calls: the 1-row output check, the 2-row first image and
    every batch size's guided rows, each padded up to its bucket."""
    rows = {1, guided_unet_rows(1), *(guided_unet_rows(size) for size in batch_sizes)}
    return len({next((bucket for bucket in DEFAULT_BATCH_BUCKETS if bucket >= count), count) for count in rows})


def map_mib(workload: Workload) -> float:
    """MiB of one float32 feature map of the largest request: its UNet rows at the latent size and the UNet's
    first-level width, and its images at the image size and the decoder's last width."""
    images = max(workload.batch_sizes)
    elements = (guided_unet_rows(images) * workload.latent_size**2 * workload.unet_channels
                + images * workload.image_size**2 * workload.decoder_channels)
    return 4 * elements / MIB


def activation_mib(engine: str, workload: Workload) -> float:
    """MiB ``engine`` holds for the largest request at its peak beyond its weights: ``maps`` feature maps."""
    return ENGINE_MEMORY[engine].maps * map_mib(workload)


def estimate_rss_mib(engine: str, workload: Workload) -> float:
    """The peak resident size (MiB) of ``engine``'s worker process on ``workload``, by the model in the module
    docstring."""
    figures = ENGINE_MEMORY[engine]
    parameters = workload.unet_parameters + workload.other_parameters
    read_bytes = workload.engine_dir_bytes if engine in ENGINE_DIR_PEERS else 4  # torch loads networks in fp32
    compiled = figures.copies_per_unet_shape * unet_shapes(workload.batch_sizes) * workload.unet_parameters
    return (figures.runtime_mib + (figures.weight_copies * parameters * read_bytes
                                   + compiled * figures.compute_bytes) / MIB + activation_mib(engine, workload))


def plan_groups(peaks_mib: dict[str, float], baseline: str,
                budget_mib: float | None) -> tuple[list[list[str]], list[str]]:
    """(groups, skipped): the engines of ``peaks_mib`` (name -> peak RSS in MiB, in the run's order, the baseline
    among them) in groups to keep resident together, each group the baseline then its peers in the run's order,
    each group's sum within ``budget_mib`` (None: no bound, one group); and the peers that fit in no group beside
    the baseline. Peers are placed largest first, each into the first group it fits (first-fit decreasing): few
    groups, so few rounds of timing."""
    peers = [name for name in peaks_mib if name != baseline]
    if budget_mib is None:
        return [[baseline, *peers]], []
    room = budget_mib - peaks_mib[baseline]
    skipped = [name for name in peers if peaks_mib[name] > room]
    bins: list[list[str]] = []
    for name in sorted((name for name in peers if name not in skipped), key=lambda name: -peaks_mib[name]):
        target = next((members for members in bins
                       if sum(peaks_mib[member] for member in members) + peaks_mib[name] <= room), None)
        if target is None:
            bins.append([name])
        else:
            target.append(name)
    order = {name: index for index, name in enumerate(peaks_mib)}
    return [[baseline, *sorted(members, key=order.__getitem__)] for members in bins] or [[baseline]], skipped


def available_memory_mib(proc: Path = Path("/proc"),
                         cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[float, str] | None:
    """(MiB this process may still take, where that bound comes from): MemAvailable of ``proc``/meminfo, or less
    where a cgroup of this process (v2 memory.max, v1 memory.limit_in_bytes, from its own up to the root) leaves
    less room below its limit than that (usage less inactive page cache, which the kernel reclaims first);
    None without a readable MemAvailable."""
    try:
        meminfo = dict(line.split(":", 1) for line in (proc / "meminfo").read_text().splitlines() if ":" in line)
        available = float(meminfo["MemAvailable"].split()[0]) * 1024 / MIB  # kB
    except (OSError, KeyError, ValueError, IndexError):
        return None
    best = (available, "MemAvailable")
    for folder, files in _cgroup_memory_folders(proc, cgroup_root):
        headroom = _cgroup_headroom_mib(folder, *files)
        if headroom is not None and headroom < best[0]:
            best = (headroom, f"the limit of cgroup {folder}")
    return best


def _cgroup_memory_folders(proc: Path, cgroup_root: Path) -> list[tuple[Path, tuple[str, str, str]]]:
    """The memory cgroup folders of this process, its own first and then each parent up to the hierarchy's root,
    with the names of their (limit, usage, stat's inactive page cache) entries."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: one unified hierarchy
            root, files = cgroup_root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            root, files = cgroup_root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                    "total_inactive_file")
        else:
            continue
        folder = root / path.strip("/")
        while True:
            found.append((folder, files))
            if folder == root or not folder.is_relative_to(root):
                break
            folder = folder.parent
    return found


def _cgroup_headroom_mib(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> float | None:
    """MiB below ``folder``'s memory limit, or None where it has no limit or none can be read."""
    try:
        limit = (folder / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= UNLIMITED_BYTES:
            return None
        usage = int((folder / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    inactive = 0
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
    except (OSError, ValueError):
        pass
    return max(0.0, (int(limit) - (usage - inactive)) / MIB)
