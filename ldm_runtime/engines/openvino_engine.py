"""The openvino engine: the ONNX graphs of an engine dir written by ``ldm-export``, compiled by OpenVINO for
the CPU, on numpy arrays.

Imports numpy, openvino and the ``tokenizers`` library only (never torch or the training code), and openvino
only when the engine is built. Engine arrays are host numpy float32 arrays, as for the onnxruntime engine:
each call casts its inputs to the dtypes the manifest lists and returns float32.

Shapes: a call of B rows is padded with copies of its last row up to the smallest batch bucket that holds it
(powers of two up to the engine dir's largest batch, and that batch itself), run, and cut back to B rows; a padding
row never changes a real one. Each graph is compiled on first use for the spatial size of the call and kept:
per bucket, for fixed shapes (``compile_per_bucket=True``: faster per call on small graphs, one copy of the
re-laid-out weights per bucket), or once for every bucket with the batch axis a range (``False``: one copy of the
weights; each bucket's first call prepares its kernels). By default (None) a graph is compiled per bucket unless
its weights on disk exceed ``ONE_COMPILE_ABOVE_BYTES``.

Compile cache (``ldm_runtime.engines.compile_cache``): each compiled graph whose weights are at most
``CACHE_UP_TO_BYTES`` is exported to ``$LDM_COMPILE_CACHE`` if set (``off`` turns it off), else
``$XDG_CACHE_HOME/ldm-runtime/openvino`` or ``~/.cache/ldm-runtime/openvino``, keyed by the sha256 of the graph's
files, the shapes, the compile settings, the OpenVINO version and the CPU, and imported by a later process only when
it is provably that entry; anything else is dropped and compiled again. A folder that cannot be created or that other
users could write to turns the cache off with a warning. Larger graphs (every graph of SD's size) are compiled in
every process: their entries took longer to read, check and import than the compile they save.

Precision: "fp32" computes in float32 (OpenVINO's inference precision hint pinned to f32, since on a CPU with
native bf16 its default would be bf16); "bf16" is offered only where OpenVINO reports native bf16 for the CPU
(AVX-512 BF16 or AMX) and is refused elsewhere, naming what is missing. "auto" takes bf16 where the CPU has native
bf16 and ``BF16_MEASURED`` met the fidelity bar, else fp32 (``auto_precision``); ``precision_choice`` says which it
took and why.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldm_runtime.engines.base import batch_buckets_for
from ldm_runtime.engines.compile_cache import CompileCache, cache_key, default_cache_dir
from ldm_runtime.engines.engine_dir_engine import EngineDirEngine
from ldm_runtime.errors import EngineLoadError
from ldm_runtime.files import sha256_file
from ldm_runtime.manifest import EngineDirError

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # --precision -> OpenVINO's INFERENCE_PRECISION_HINT
AUTO_PRECISION = "auto"  # bf16 where the CPU and the measured fidelity allow it, else fp32 (auto_precision)
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
INSTALL_HINT = "pip install 'ldm-runtime[openvino]'"
DEFAULT_CACHE = "default"  # cache_dir value: the folder default_cache_dir() names
ONE_COMPILE_ABOVE_BYTES = 256 * 2**20  # graphs with more weights than this are compiled once for every bucket
# graphs with more weights than this are not kept in the compile cache: reading, checking and importing an entry took
# longer than compiling for every graph of 87 MB or more measured (the demo's text encoder, every SD graph), and less
# for every graph of 19 MB or less (the demo's UNet and autoencoder): BENCHMARKS.md, "bf16 and the cold start on
# the openvino engine"
CACHE_UP_TO_BYTES = 32 * 2**20
BF16_PSNR_BAR_DB = 40.0  # a whole sampling run's bf16 images against fp32's, for --precision auto to take bf16
BF16_ADHERENCE_BAR = 0.02  # and its prompt adherence (ldm-eval's, every attribute) within this of fp32's
SLOW_START_S = 60.0  # a measured cold first image this long or longer is named when auto takes its precision


@dataclass(frozen=True)
class Bf16Measurement:
    """bf16 against fp32 on this engine, as measured: whole sampling runs (the default sampler and steps, each image
    alone) on the demo model and on the sd15 preset's random model at 16x16 latents, and ldm-eval's adherence on the
    demo model; cold first images (a new process, empty compile cache) of sd15 at 16x16 latents, 1 thread. A run's
    PSNR is that of all its uint8 images together against fp32's (as ldm-export's validation reports a run)."""

    worst_run_psnr_db: float  # the lowest PSNR of a sampling run at bf16 against fp32, over the runs measured
    worst_model: str  # the model of that run
    adherence_difference: float  # the largest |bf16 - fp32| over ldm-eval's adherence fractions
    cold_first_image_s: dict[str, float]  # precision (or "onnxruntime", the engine) -> seconds
    source: str  # the benchmark and result file that measured it

    @property
    def meets_bar(self) -> bool:
        return (self.worst_run_psnr_db >= BF16_PSNR_BAR_DB
                and self.adherence_difference <= BF16_ADHERENCE_BAR)


BF16_MEASURED = Bf16Measurement(
    worst_run_psnr_db=27.1, worst_model="demo, ldm-eval's prompts", adherence_difference=0.005,  # at Euler 7
    cold_first_image_s={"fp32": 53.75, "bf16": 25.7, "onnxruntime": 29.55},  # medians of 2, on a loaded machine
    source="benchmarks/bf16_fidelity.py and benchmarks/openvino_cold_start.py (benchmarks/results/"
           "cpu-openvino-bf16-fidelity.json, cpu-openvino-cold-start-sd15.json)")


class OpenVinoUnavailable(EngineLoadError):
    """This machine cannot run the openvino engine as asked; the message is one sentence saying what is missing."""


def import_openvino():
    """The ``openvino`` module, or ``OpenVinoUnavailable`` saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise OpenVinoUnavailable(f"the openvino engine needs the openvino package, which is not installed; "
                                  f"{INSTALL_HINT}") from None
    return openvino


def cpu_capabilities(core: Any) -> list[str]:
    """OpenVINO's optimisation capabilities of this CPU (e.g. ["FP32", "FP16", "INT8", "BIN", "EXPORT_IMPORT"];
    "BF16" only where the CPU computes bf16 natively)."""
    return [str(capability) for capability in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def auto_precision(capabilities: list[str], large_model: bool, measured: Bf16Measurement | None = None
                   ) -> tuple[str, str]:
    """(the precision "auto" takes, one sentence saying which and why) on a CPU whose OpenVINO capabilities are
    ``capabilities``: bf16 where they include "BF16" (native bf16) and ``measured`` met the fidelity bar, else fp32.
    For a ``large_model`` (weights past ``ONE_COMPILE_ABOVE_BYTES``: SD's size, where the cold start was measured),
    a measured cold first image of ``SLOW_START_S`` or more is named, with the measured alternative that starts
    soonest (the other precision where this CPU can run it, or the onnxruntime engine). ``measured``: None for
    ``BF16_MEASURED``."""
    measured = BF16_MEASURED if measured is None else measured
    bar = (f"its worst whole sampling run {measured.worst_run_psnr_db:.1f} dB against fp32, on {measured.worst_model}; "
           f"prompt adherence within {measured.adherence_difference:.3f} of fp32's")
    if "BF16" not in capabilities:
        precision, why = "fp32", f"this CPU has no native bf16 (OpenVINO reports {', '.join(capabilities)})"
    elif not measured.meets_bar:
        precision, why = "fp32", (f"this CPU has native bf16, but bf16 missed the fidelity bar of {BF16_PSNR_BAR_DB:g} "
                                  f"dB and {BF16_ADHERENCE_BAR:g} ({bar}: BENCHMARKS.md); --precision bf16 takes it "
                                  f"anyway")
    else:
        precision, why = "bf16", f"this CPU has native bf16 and bf16 met the fidelity bar ({bar}: BENCHMARKS.md)"
    note = f"--precision auto took {precision} on the openvino engine: {why}"
    cold = measured.cold_first_image_s.get(precision, float("nan"))
    if large_model and cold >= SLOW_START_S:
        others = {"--precision fp32": measured.cold_first_image_s.get("fp32", float("nan")),
                  "--engine onnxruntime": measured.cold_first_image_s.get("onnxruntime", float("nan"))}
        if precision == "fp32" and "BF16" in capabilities:
            others = {"--precision bf16": measured.cold_first_image_s.get("bf16", float("nan")),
                      "--engine onnxruntime": others["--engine onnxruntime"]}
        flag, seconds = min(((flag, seconds) for flag, seconds in others.items() if seconds == seconds),
                            key=lambda item: item[1], default=(None, float("nan")))
        note += (f"; at SD's size its first image in a new process took {cold / 60:.1f} min (sd15 at 16x16 latents, "
                 f"1 thread: BENCHMARKS.md)")
        if flag is not None and seconds < cold:
            note += f", and {flag} took {seconds:.0f} s"
    return precision, note


def first_line(error: Exception) -> str:
    """The first line of an OpenVINO exception's message (they run to many lines of C++ locations)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _tensor(port: Any, listed: tuple) -> tuple[str, str, tuple[int | None, ...] | None]:
    """A model's input or output (an OpenVINO port) as (name, numpy dtype name, shape: None for an axis of any size;
    None for a shape of any rank); the name is the manifest's (``listed``) where it is among the port's names."""
    names = port.get_names()
    name = next((spec.name for spec in listed if spec.name in names), port.get_any_name())
    element = port.get_element_type()
    try:
        dtype = str(np.dtype(element.to_dtype()))
    except (RuntimeError, TypeError, ValueError):  # a type numpy has no dtype for
        dtype = element.get_type_name()
    shape = port.get_partial_shape()
    sizes = None if shape.rank.is_dynamic else tuple(axis.get_length() if axis.is_static else None for axis in shape)
    return name, dtype, sizes


class OpenVinoEngine(EngineDirEngine):
    """An engine dir's four graphs compiled by OpenVINO for the CPU, behind the Engine protocol (numpy arrays).

    precision: "fp32", "bf16" (only on a CPU with native bf16: ``OpenVinoUnavailable`` elsewhere) or "auto"
    (``auto_precision``: ``precision`` is then the one it took, and ``precision_choice`` says which and why).
    intra_op_threads: OpenVINO's inference threads per call (None: its default, one per core); the same option
    name as the onnxruntime engine's, so ``--threads`` means the same for both. batch_buckets: the batch sizes
    graphs are compiled for (None: powers of two up to the engine dir's largest batch, and that batch).
    verify: check every graph's and the tokenizer's sha256 against the manifest first. device: "auto" or "cpu".
    cache_dir: a folder where the engine keeps the graphs it compiles (those of at most ``CACHE_UP_TO_BYTES`` of
    weights), so a later process loads them instead of compiling again ("default": ``default_cache_dir()``; None:
    compile in every process).
    compile_per_bucket: True compiles every graph once per batch bucket (static shapes), False once for all buckets
    (one copy of the weights), None by the size of each graph's weights (see the module docstring).
    Batches and image sizes outside the exported ranges raise ``OutOfRangeError`` naming the allowed range.
    """

    # Prompts are encoded at the tokenizer's max_length: by length, each length's rows are padded to a batch bucket
    # of their own and each (length, bucket) is compiled apart; on the demo model that saved 1.10-1.14x of the text
    # encoder's time (benchmarks/text_by_length.py) for up to four times its compiled shapes.
    encodes_by_length = False

    def __init__(self, engine_dir: str | Path, precision: str = "fp32", intra_op_threads: int | None = None,
                 batch_buckets: tuple[int, ...] | None = None, verify: bool = True, device: str = "auto",
                 cache_dir: str | Path | None = DEFAULT_CACHE, compile_per_bucket: bool | None = None):
        if device not in ("auto", "cpu"):
            raise OpenVinoUnavailable(f"device {device!r} is not valid for the openvino engine, which runs on the "
                                      f"CPU; expected 'auto' or 'cpu' (use --engine onnxruntime on a GPU)")
        if precision not in (*PRECISIONS, AUTO_PRECISION):
            raise EngineLoadError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)} or "
                                  f"{AUTO_PRECISION} for the openvino engine")
        if intra_op_threads is not None and (isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int)
                                             or intra_op_threads < 1):
            raise EngineLoadError(f"intra_op_threads is {intra_op_threads!r}; expected a positive integer or None")
        openvino = import_openvino()
        self._open_engine_dir(engine_dir, "openvino", verify)
        self.core = openvino.Core()
        folder = default_cache_dir() if cache_dir == DEFAULT_CACHE else cache_dir
        self.compile_cache = CompileCache.open(folder) if folder is not None else None
        capabilities = cpu_capabilities(self.core)
        if precision == "bf16" and "BF16" not in capabilities:
            raise OpenVinoUnavailable(
                f"precision bf16 needs a CPU with native bf16 (AVX-512 BF16 or AMX), and OpenVINO reports only "
                f"{', '.join(capabilities)} for this one; use --precision fp32")
        self.precision_choice: str | None = None  # what precision "auto" took and why
        if precision == AUTO_PRECISION:
            large = self._weight_bytes("unet") > ONE_COMPILE_ABOVE_BYTES
            precision, self.precision_choice = auto_precision(capabilities, large)
        self.precision = precision
        if batch_buckets is not None and (not batch_buckets or any(
                isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_buckets)):
            raise ValueError(f"batch_buckets is {batch_buckets!r}; expected positive integers")
        self.batch_buckets = batch_buckets_for(self.manifest.batch.max, tuple(batch_buckets or DEFAULT_BATCH_BUCKETS))
        self.compile_config = {
            "INFERENCE_PRECISION_HINT": PRECISIONS[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
        }
        if intra_op_threads is not None:
            self.compile_config["INFERENCE_NUM_THREADS"] = str(intra_op_threads)
        if compile_per_bucket not in (None, True, False):
            raise ValueError(f"compile_per_bucket is {compile_per_bucket!r}; expected True, False or None")
        self.models: dict[str, Any] = {}
        for name, graph in self.manifest.graphs.items():
            path = self.engine_dir / graph.file
            try:
                self.models[name] = self.core.read_model(str(path))
            except RuntimeError as error:
                raise EngineDirError(f"openvino cannot read {path} ({first_line(error)})") from None
            self.check_graph_tensors(name, [_tensor(port, graph.inputs) for port in self.models[name].inputs],
                                     [_tensor(port, graph.outputs) for port in self.models[name].outputs])
        self._verified = verify
        self._graph_digests: dict[str, dict[str, str]] = {}  # graph -> {file: sha256}, for the compile cache's keys
        if self.compile_cache is not None:  # what a compile depends on beyond its shapes and settings
            self._compiler = {"openvino": openvino.get_version(), "device": "CPU",
                              "cpu": str(self.core.get_property("CPU", "FULL_DEVICE_NAME")),
                              "capabilities": capabilities}
        weight_bytes = {name: self._weight_bytes(name) for name in self.manifest.graphs}
        self.per_bucket = {name: compile_per_bucket if compile_per_bucket is not None
                           else size <= ONE_COMPILE_ABOVE_BYTES for name, size in weight_bytes.items()}
        self.cached = {name: self.compile_cache is not None and size <= CACHE_UP_TO_BYTES
                       for name, size in weight_bytes.items()}  # the graphs the compile cache keeps
        self._compiled: dict[tuple, Any] = {}  # (graph, input shapes) -> an infer request of the compiled graph
        self._counting: str | None = None  # the graph operator_times is profiling, and the shapes it compiled
        self._counted: list[tuple] = []

    @property
    def cache_dir(self) -> Path | None:
        """The compile cache's folder, or None where compiled graphs are not kept."""
        return None if self.compile_cache is None else self.compile_cache.folder

    def bucket_for(self, rows: int) -> int:
        """The smallest batch bucket that holds ``rows`` (1 <= rows <= the engine dir's largest batch)."""
        return next(bucket for bucket in self.batch_buckets if bucket >= rows)

    @property
    def compiled_shapes(self) -> list[tuple]:
        """(graph, input shapes) of every graph compiled so far; a batch axis compiled for every bucket is -1."""
        return sorted(self._compiled)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run graph ``graph`` on named host arrays of B rows: each is cast to the dtype the manifest lists for
        that input and padded to B's bucket with copies of its last row; float outputs come back as float32,
        B rows, in the manifest's output order."""
        cast = self.cast_inputs(graph, feeds)
        rows = {value.shape[0] for value in cast.values()}
        if len(rows) != 1:
            raise ValueError(f"{graph} inputs have different batch sizes {sorted(rows)}; expected one")
        (batch,) = rows
        bucket = self.bucket_for(batch)
        padded = {name: np.concatenate([value, np.repeat(value[-1:], bucket - batch, axis=0)]) if bucket > batch
                  else value for name, value in cast.items()}
        request = self._request(graph, {name: value.shape for name, value in padded.items()})
        request.infer(padded)
        outputs = []
        for spec in self.manifest.graphs[graph].outputs:
            output = request.get_tensor(spec.name).data[:batch]
            outputs.append(output.astype(np.float32) if output.dtype.kind == "f" else output.copy())
        return outputs

    def _weight_bytes(self, graph: str) -> int:
        """The size on disk of ``graph``'s files (its weights, but for a few KB of graph structure); a file that
        cannot be looked at counts 0 (reading the graph says what is wrong with it)."""
        total = 0
        for name in self.manifest.graphs[graph].files:
            try:
                status = (self.engine_dir / name).stat()
            except OSError:
                continue
            total += status.st_size if stat.S_ISREG(status.st_mode) else 0
        return total

    def _request(self, graph: str, shapes: dict[str, tuple[int, ...]]):
        """An infer request of ``graph`` compiled for these input shapes (for their spatial sizes and every batch
        bucket where ``graph`` is not compiled per bucket): compiled on first use, then reused."""
        if not self.per_bucket[graph]:  # every input's first axis is the batch (run pads them all along it)
            shapes = {name: (-1, *shape[1:]) for name, shape in shapes.items()}
        key = (graph, tuple(sorted(shapes.items())))
        if graph == self._counting and key not in self._counted:  # inside operator_times
            self._compiled.pop(key, None)  # let the plain one go before its counting copy is made
            self._compiled[key] = self._compile(graph, shapes, PERF_COUNT="YES")
            self._counted.append(key)
        request = self._compiled.get(key)
        if request is None:
            request = self._compiled[key] = self._compile(graph, shapes)
        return request

    def _compile(self, graph: str, shapes: dict[str, tuple[int, ...]], **extra_config: str):
        """An infer request of ``graph`` compiled for these input shapes (-1: the batch axis, compiled for 1 to the
        largest bucket), with ``extra_config`` on top of the engine's compile settings."""
        openvino = import_openvino()
        batch = openvino.Dimension(1, self.batch_buckets[-1])
        model = self.models[graph].clone()
        model.reshape({name: openvino.PartialShape([batch if size == -1 else size for size in shape])
                       for name, shape in shapes.items()})
        config = {**self.compile_config, **extra_config}
        if not self.cached[graph] or extra_config:  # a profiling compile is used once, so it is not kept
            return self.core.compile_model(model, "CPU", config).create_infer_request()
        key = cache_key(self._compiler, graph, self._graph_digest(graph), self.batch_buckets[-1],
                        sorted(shapes.items()), config)
        with self.compile_cache.locked() as usable:
            compiled = self._import_cached(key, config) if usable else None
            if compiled is None:
                compiled = self.core.compile_model(model, "CPU", config)
                if usable:
                    self.compile_cache.store(key, compiled.export_model().getvalue(), graph=graph,
                                             shapes={name: list(shape) for name, shape in shapes.items()})
        return compiled.create_infer_request()

    def _graph_digest(self, graph: str) -> dict[str, str]:
        """{file: sha256} of ``graph``'s files: a verified engine dir's are the manifest's; otherwise they are hashed
        once, when the graph is first compiled (not at start-up, for graphs never compiled)."""
        if graph not in self._graph_digests:
            files = self.manifest.graphs[graph].files
            self._graph_digests[graph] = dict(files) if self._verified else {
                file: sha256_file(self.engine_dir / file) for file in files}
        return self._graph_digests[graph]

    def _import_cached(self, key: str, config: dict[str, str]):
        """The compiled graph the compile cache holds under ``key``, or None (none, or one that is dropped)."""
        blob = self.compile_cache.load(key)
        if blob is None:
            return None
        try:
            return self.core.import_model(blob, "CPU", config)
        except RuntimeError as error:
            self.compile_cache.drop(key, f"openvino cannot import it: {first_line(error)}")
            return None

    def operator_times(self, graph: str, run) -> dict[str, float]:
        """Milliseconds per operator kind that ``graph`` spends while ``run()`` runs, from OpenVINO's per-node
        counters: each shape of ``graph`` that ``run()`` calls is compiled with ``PERF_COUNT`` on (a profile, not
        a timing: counting costs time) in place of its plain compiled graph, so that memory holds one compiled
        copy of the weights per shape as before (GiBs at SD's size); the plain ones are compiled again on their
        next use (from the compile cache where it is on)."""
        self._counting, self._counted = graph, []
        try:
            run()
            times: dict[str, float] = {}
            for key in self._counted:
                for info in self._compiled[key].get_profiling_info():
                    times[info.node_type] = times.get(info.node_type, 0.0) + info.real_time.total_seconds() * 1000
        finally:
            for key in self._counted:
                self._compiled.pop(key, None)
            self._counting, self._counted = None, []
        return times
