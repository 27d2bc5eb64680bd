"""One engine per process, driven over a pipe: the parent asks for one measurement at a time, so engines take
turns (round robin) and drift hits all of them alike, while each process's peak memory is its own.

A worker loads its engine, makes one image (the time to first image counts from the process's start, imports
included), answers the UNet-output check, then serves commands until told to stop:

    ("warmup", B)        one request of B images end to end, then one step; returns the step's seconds
    ("step", B, calls)   ``calls`` guided sampler steps on B images; returns seconds per step
    ("e2e", B)           one text-to-image request of B images; returns seconds
    ("memory",)          {"peak_rss_mib": ..., "rss_mib": ... (resident now) or None, "cuda_max_allocated_mib": ...
                          or None}
    ("profile", B)       where one guided step's operator time goes: [{"op", "share", "ms"}], largest first
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import platform
import resource
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldm_runtime.config import inpainting_channels
from ldm_runtime.engines import load_engine
from ldm_runtime.engines.openvino_engine import OpenVinoEngine
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from ldm_tools.bench.diffusers_peers import (PIPELINE_PEER, diffusers_unet_model, pipeline_call_options,
                                             stable_diffusion_pipeline)

PEERS = ("torch", "torch.compile", "torch-bf16", "torch.compile-bf16", "diffusers", "diffusers-pipeline",
         "onnxruntime", "openvino", "openvino-bf16", "triton")
# triton needs a CUDA GPU; the bf16 ones a CPU with native bf16, and are skipped elsewhere with the reason
DEFAULT_PEERS = ("torch", "torch.compile", "torch-bf16", "diffusers", "onnxruntime", "openvino", "openvino-bf16")
ENGINE_DIR_PEERS = ("onnxruntime", "openvino", "openvino-bf16")  # the engines that run the (exported) engine dir
PROFILE_TOP = 8
BASELINE = "torch"
PROMPT = "a large red circle on the left, on a blue background"
CHECK_TIMESTEP = 500


class WorkerFailed(Exception):
    """A worker could not load its engine or answer a command; the message is one line."""


@dataclass(frozen=True)
class WorkerSpec:
    engine: str  # one of PEERS
    folder: str  # a checkpoint dir (torch peers) or an engine dir (ENGINE_DIR_PEERS)
    device: str
    threads: int
    steps: int  # sampler steps of one end-to-end request
    image_size: int
    guidance_scale: float
    sampler: str = "ddim"  # one of ldm_runtime.schedulers.SAMPLER_NAMES, for every request


class Worker:
    """The parent's handle on one engine process."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.started_at = time.time()
        self.process = context.Process(target=_worker_main, args=(child, spec), daemon=True,
                                       name=f"ldm-bench {spec.engine}")
        self.process.start()
        child.close()

    def ask(self, *message: Any) -> Any:
        """Send one command and wait for its answer; ``WorkerFailed`` if the worker reports an error or dies."""
        try:
            if message:
                self.connection.send(message)
            while not self.connection.poll(0.5):
                if not self.process.is_alive():
                    raise EOFError
            status, value = self.connection.recv()
        except (EOFError, OSError):  # it died: before the command (a broken pipe), or while on it
            self.process.join(5)
            raise WorkerFailed(exit_reason(self.process.exitcode)) from None
        if status == "error":
            raise WorkerFailed(value)
        return value

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.connection.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _worker_main(connection, spec: WorkerSpec) -> None:
    try:
        bench = _PipelineBench(spec) if spec.engine == PIPELINE_PEER else _EngineBench(spec)
        connection.send(("ok", bench.first_image()))
    except BaseException as error:
        connection.send(("error", one_line(error)))
        return
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return
        if message[0] == "stop":
            return
        try:
            connection.send(("ok", getattr(bench, message[0])(*message[1:])))
        except BaseException as error:
            connection.send(("error", one_line(error)))


def exit_reason(code: int | None) -> str:
    """Why a child process stopped answering, from its exit code (-9: the kernel's OOM killer, most likely)."""
    return f"the process exited with code {code}" + (" (killed: out of memory?)" if code == -9 else "")


def one_line(error: BaseException) -> str:
    """``error`` as one line for a parent process: its type and the first line of its message."""
    if os.environ.get("LDM_BENCH_TRACEBACK"):
        traceback.print_exc()
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first[:300]}" if first else type(error).__name__


class _EngineBench:
    """Inside a worker: the engine, its pipeline, and the timed calls."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        load_started = time.perf_counter()
        self.engine = build_engine(spec)
        self.pipeline = Pipeline(self.engine)
        self.inpainting = self.engine.info.inpainting
        self.load_s = time.perf_counter() - load_started
        self._states: dict[int, list] = {}

    def requests(self, batch_size: int) -> list:
        """``batch_size`` text-to-image requests; an inpainting model's repaint the centre of a flat grey image (it
        takes nothing else), with the same number of UNet steps."""
        edit = inpainting_edit(self.spec.image_size) if self.inpainting else {}
        return [GenerationRequest(prompt=PROMPT, seed=index, sampler=self.spec.sampler, steps=self.spec.steps,
                                  guidance_scale=self.spec.guidance_scale, height=self.spec.image_size,
                                  width=self.spec.image_size, **edit) for index in range(batch_size)]

    def first_image(self) -> dict[str, Any]:
        """Make one image (the warm-up a server does before it takes traffic), then the UNet-output check."""
        image = self.pipeline.generate(self.requests(1), batch_size=1)[0]
        ready_at = time.time()
        return {"load_s": self.load_s, "ready_at": ready_at, "image_std": float(image.std()),
                "unet_output": self.check_output(), "parameters": self.parameters(), **self.describe()}

    def parameters(self) -> dict[str, int] | None:
        """Each network's parameter count (the UNet's, the autoencoder's, the text encoder's); None for an engine
        over an engine dir, which holds graphs rather than networks."""
        if self.spec.engine in ENGINE_DIR_PEERS:
            return None
        networks = {"unet": self.engine.unet_model, "autoencoder": self.engine.autoencoder,
                    "text_encoder": self.engine.text_encoder}
        # data_ptr: a tensor two modules share (a wrapped UNet, tied embeddings) counts once
        return {name: sum({parameter.data_ptr(): parameter.numel() for parameter in network.parameters()}.values())
                for name, network in networks.items()}

    def check_output(self) -> np.ndarray:
        """One UNet call on inputs every worker draws alike, for the comparison with eager PyTorch."""
        rng = np.random.default_rng(0)
        size = self.spec.image_size // self.engine.info.latent_factor
        channels = self.engine.info.latent_channels
        channels = inpainting_channels(channels) if self.inpainting else channels  # latents, mask, masked image
        latents = rng.standard_normal((1, channels, size, size)).astype(np.float32)
        context, context_mask = self.engine.encode_text([PROMPT])
        output = self.engine.unet(self.engine.to_array(latents), np.array([CHECK_TIMESTEP]), context, context_mask)
        return self.engine.to_host(output).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """The device the engine computes on and the library versions behind it."""
        if self.spec.engine.startswith("openvino"):
            import openvino

            return {"device": "cpu", "version": f"openvino {openvino.__version__}",
                    "precision": self.engine.precision, "compile_cache": "off (every graph compiled in this process)"}
        if self.spec.engine == "onnxruntime":
            import onnxruntime

            return {"device": ",".join(p if isinstance(p, str) else p[0] for p in self.engine.providers),
                    "version": f"onnxruntime {onnxruntime.__version__}"}
        import torch

        device = self.engine.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        version = f"torch {torch.__version__}"
        if self.spec.engine == "diffusers":
            import diffusers

            version += f", diffusers {diffusers.__version__}"
        return {"device": name, "version": version, "torch_threads": torch.get_num_threads()}

    def _start(self, batch_size: int) -> list:
        if batch_size not in self._states:
            self._states[batch_size] = self.pipeline.start(self.requests(batch_size))
        return self._states[batch_size]

    def warmup(self, batch_size: int) -> float:
        self.e2e(batch_size)
        return self.step(batch_size, 1)

    def step(self, batch_size: int, calls: int) -> float:
        """Seconds per guided sampler step of ``batch_size`` images (one UNet call on 2 x batch_size rows and the
        sampler's update), the mean of ``calls`` steps from the same starting states."""
        states = self._start(batch_size)
        self._synchronize()
        started = time.perf_counter()
        for _ in range(calls):
            advanced = self.pipeline.advance(states)
        self.engine.to_host(advanced[-1].latents)  # the result reaches the host: no work left queued
        self._synchronize()
        return (time.perf_counter() - started) / calls

    def e2e(self, batch_size: int) -> float:
        """Seconds for one request of ``batch_size`` images: text encoder, the sampler steps, decode."""
        requests = self.requests(batch_size)
        self._synchronize()
        started = time.perf_counter()
        self.pipeline.generate(requests, batch_size=batch_size)
        return time.perf_counter() - started

    def memory(self) -> dict[str, Any]:
        peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        try:  # resident now: pages, the second field of /proc/self/statm
            rss_mib = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            rss_mib = None
        cuda = None
        if self.spec.engine not in ENGINE_DIR_PEERS and self.engine.device.type == "cuda":
            import torch

            cuda = torch.cuda.max_memory_allocated(self.engine.device) / 2**20
        return {"peak_rss_mib": peak_rss_mib, "rss_mib": rss_mib, "cuda_max_allocated_mib": cuda}

    def profile(self, batch_size: int) -> list[dict[str, Any]]:
        """The operator kinds that take one guided step's time (self time, the ``PROFILE_TOP`` largest): torch's
        profiler for the torch peers, onnxruntime's per-node profile for the onnxruntime engine."""
        states = self._start(batch_size)
        if self.spec.engine == "onnxruntime":
            return _onnxruntime_profile(self.engine, lambda: self.pipeline.advance(states))
        if self.spec.engine.startswith("openvino"):
            return _top_shares(self.engine.operator_times("unet", lambda: self.pipeline.advance(states)))
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
            self.pipeline.advance(states)
        times = {event.key: event.self_cpu_time_total / 1000 for event in profiler.key_averages()
                 if event.self_cpu_time_total > 0}
        return _top_shares(times)

    def _synchronize(self) -> None:
        if self.spec.engine not in ENGINE_DIR_PEERS and self.engine.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.engine.device)


class _PipelineBench(_EngineBench):
    """Inside a worker: diffusers' whole StableDiffusionPipeline over the checkpoint's networks. A step is what
    one iteration of its denoising loop does (the guided UNet call on 2B rows, the guidance, the scheduler's
    step); a request is one call of the pipeline, from the prompt to the decoded image."""

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        load_started = time.perf_counter()
        engine = self.engine
        self.sd = stable_diffusion_pipeline(Path(spec.folder), engine.config, engine.unet_model, engine.autoencoder,
                                            engine.text_encoder, spec.sampler)
        self.sd.to(engine.device)
        self.options = pipeline_call_options(engine.config, spec.steps, spec.guidance_scale, spec.image_size)
        self.load_s += time.perf_counter() - load_started
        self._step_inputs: dict[int, tuple] = {}

    def _generators(self, batch_size: int) -> list:
        import torch

        return [torch.Generator(self.engine.device).manual_seed(index) for index in range(batch_size)]

    def first_image(self) -> dict[str, Any]:
        image = self._call(1)[0]
        ready_at = time.time()
        return {"load_s": self.load_s, "ready_at": ready_at, "image_std": float(image.std()),
                "unet_output": self.check_output(), "parameters": self.parameters(), **self.describe()}

    def _call(self, batch_size: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.sd([PROMPT] * batch_size, negative_prompt=[""] * batch_size,
                           generator=self._generators(batch_size), **self.options).images

    def _prompt_embeds(self, batch_size: int):
        """(B, L, D) conditional and unconditional prompt embeddings, as the pipeline computes them."""
        conditional, unconditional = self.sd.encode_prompt(
            PROMPT, self.engine.device, batch_size, True, negative_prompt="", clip_skip=self.options["clip_skip"])
        return conditional, unconditional

    def check_output(self) -> np.ndarray:
        import torch

        rng = np.random.default_rng(0)
        size = self.spec.image_size // self.engine.info.latent_factor
        latents = rng.standard_normal((1, self.engine.info.latent_channels, size, size)).astype(np.float32)
        with torch.inference_mode():
            conditional, _ = self._prompt_embeds(1)
            output = self.sd.unet(torch.from_numpy(latents).to(self.engine.device), CHECK_TIMESTEP,
                                  encoder_hidden_states=conditional).sample
        return output.float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        import diffusers
        import torch

        return {**super().describe(), "version": f"torch {torch.__version__}, diffusers {diffusers.__version__}",
                "scheduler": type(self.sd.scheduler).__name__}

    def step(self, batch_size: int, calls: int) -> float:
        import torch

        if batch_size not in self._step_inputs:
            with torch.inference_mode():
                conditional, unconditional = self._prompt_embeds(batch_size)
                self.sd.scheduler.set_timesteps(self.spec.steps, device=self.engine.device)
                size = self.spec.image_size // self.engine.info.latent_factor
                latents = torch.randn((batch_size, self.engine.info.latent_channels, size, size),
                                      generator=self._generators(1)[0], device=self.engine.device)
            self._step_inputs[batch_size] = (torch.cat([unconditional, conditional]), latents)
        embeddings, latents = self._step_inputs[batch_size]
        at_first_step = self.sd.scheduler
        timestep = at_first_step.timesteps[0]
        self._synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            for _ in range(calls):
                # most schedulers count the steps they take: each call takes the first step again, as ours does
                scheduler = copy.copy(at_first_step)
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep)
                unconditional, conditional = self.sd.unet(model_input, timestep,
                                                          encoder_hidden_states=embeddings).sample.chunk(2)
                guided = unconditional + self.spec.guidance_scale * (conditional - unconditional)
                advanced = scheduler.step(guided, timestep, latents).prev_sample
            advanced.cpu()
        self._synchronize()
        return (time.perf_counter() - started) / calls

    def e2e(self, batch_size: int) -> float:
        self._synchronize()
        started = time.perf_counter()
        self._call(batch_size)
        return time.perf_counter() - started

    def profile(self, batch_size: int) -> list[dict[str, Any]]:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        self.step(batch_size, 1)
        with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
            self.step(batch_size, 1)
        times = {event.key: event.self_cpu_time_total / 1000 for event in profiler.key_averages()
                 if event.self_cpu_time_total > 0}
        return _top_shares(times)


def inpainting_edit(size: int) -> dict[str, Any]:
    """The init image and mask of a benchmark request to an inpainting model: flat grey, the centre half of each
    side repainted."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
    return {"init_image": np.full((size, size, 3), 128, dtype=np.uint8), "mask": mask, "strength": 1.0}


def _top_shares(milliseconds: dict[str, float]) -> list[dict[str, Any]]:
    total = sum(milliseconds.values())
    ranked = sorted(milliseconds.items(), key=lambda item: -item[1])[:PROFILE_TOP]
    return [{"op": op, "share": ms / total, "ms": ms} for op, ms in ranked]


def _onnxruntime_profile(engine, step) -> list[dict[str, Any]]:
    """Run ``step`` once with the UNet graph in a profiling session; its node time summed by operator type."""
    import json
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    if engine.sessions["unet"].get_session_options().intra_op_num_threads:
        options.intra_op_num_threads = engine.sessions["unet"].get_session_options().intra_op_num_threads
    with tempfile.TemporaryDirectory(prefix="ldm-bench-profile-") as folder:
        options.profile_file_prefix = f"{folder}/unet"
        plain = engine.sessions["unet"]
        engine.sessions["unet"] = ort.InferenceSession(str(engine.engine_dir / engine.manifest.graphs["unet"].file),
                                                       options, providers=engine.providers)
        try:
            step()
            events = json.loads(open(engine.sessions["unet"].end_profiling()).read())
        finally:
            engine.sessions["unet"] = plain
    times: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            times[op] = times.get(op, 0.0) + event["dur"] / 1000
    return _top_shares(times)


def build_engine(spec: WorkerSpec):
    """The engine ``spec`` names. torch.compile, torch-bf16, torch.compile-bf16 (torch.compile of the UNet under
    bf16 autocast, as PyTorch's CPU inference recipes run it) and diffusers are the torch engine with its UNet
    swapped or wrapped: the text encoder, the autoencoder and the sampler stay the same, so only the UNet differs
    between peers. The openvino peers compile with no cache, so their first image is what a fresh machine sees."""
    if spec.engine == "onnxruntime":
        from ldm_runtime.engines.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(spec.folder, intra_op_threads=spec.threads, device=spec.device)
    if spec.engine.startswith("openvino"):
        return OpenVinoEngine(spec.folder, precision="bf16" if spec.engine == "openvino-bf16" else "fp32",
                              intra_op_threads=spec.threads, device=spec.device, cache_dir=None)
    import torch

    if spec.engine == "triton":
        torch.set_num_threads(spec.threads)
        return load_engine(spec.folder, engine="triton", device=spec.device)  # fp16, CUDA graphs

    torch.set_num_threads(spec.threads)
    from ldm_runtime.engines.torch_engine import TorchEngine

    # one UNet call per step whatever the batch (not the engine's fixed chunks, which trade speed for
    # batch-invariant bits), and plain PyTorch ops (on a GPU "auto" would pick the Triton kernels): the fair
    # baseline for a speed figure, and what torch.compile and diffusers start from
    engine = TorchEngine(spec.folder, device=spec.device, unet_chunk_size=None, kernels="reference")
    if spec.engine == "torch.compile":
        engine.unet_model = torch.compile(engine.unet_model)
    elif spec.engine == "torch-bf16":
        engine.unet_model = bf16_autocast(engine.unet_model, engine.device.type)
    elif spec.engine == "torch.compile-bf16":
        engine.unet_model = torch.compile(bf16_autocast(engine.unet_model, engine.device.type))
    elif spec.engine == "diffusers":
        engine.unet_model = diffusers_unet(engine.unet_model)
    else:  # diffusers-pipeline: its worker builds diffusers' pipeline over the engine's networks
        assert spec.engine in (BASELINE, PIPELINE_PEER), spec.engine
    return engine


def cpu_info() -> tuple[str, list[str]]:
    """This machine's CPU model name and flags, as /proc/cpuinfo (and so lscpu) gives them; without
    /proc/cpuinfo, the platform's processor name and no flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields = [line.split(":", 1) for line in lines if ":" in line]
    name = next((value.strip() for key, value in fields if key.strip() == "model name"),
                platform.processor() or platform.machine())
    flags = next((value.split() for key, value in fields if key.strip() == "flags"), [])
    return name, flags


def native_bf16_refusal(device: str) -> str | None:
    """Why bf16 peers do not run on this machine's CPU (None where it computes bf16 natively: AVX-512 BF16 or
    AMX, from /proc/cpuinfo's flags), so that a bf16 figure is never emulated bf16. A GPU device is not judged."""
    if device.startswith("cuda"):
        return None
    if {"avx512_bf16", "amx_bf16"} & set(cpu_info()[1]):
        return None
    return "this CPU has no native bf16 (neither avx512_bf16 nor amx_bf16 among its flags)"


def bf16_autocast(unet, device_type: str):
    """``unet`` called under ``torch.autocast(device_type, bfloat16)``, returning float32 like the others."""
    import torch

    class _Bf16Autocast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = unet

        def forward(self, *args, **kwargs):
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
                return self.model(*args, **kwargs).float()

    return _Bf16Autocast()


def diffusers_unet(unet):
    """diffusers' UNet2DConditionModel with ``unet``'s configuration and its very weight tensors (the parameter
    names are the same), behind our UNet's call signature."""
    import torch

    theirs = diffusers_unet_model(unet)

    class DiffusersUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = theirs

        def forward(self, latents, timesteps, context, context_mask=None):
            return self.model(latents, timesteps, encoder_hidden_states=context,
                              encoder_attention_mask=context_mask).sample

    return DiffusersUNet()
