"""The queue and the batching loop: one worker thread drives ``Pipeline.start/advance/decode`` for every request.

Only this thread touches the engine, so nothing the engine holds (onnxruntime sessions, the Rust tokenizer,
torch modules) is ever called concurrently, and each request's sampling state is its own ``SamplingState``.
The event loop only submits jobs and awaits their futures.

Three modes, one loop; they differ only in when waiting jobs are admitted into the running batch:

- ``none``: one job at a time (its ``n`` images together), the next once it has finished;
- ``dynamic``: when the batch is empty, the jobs waiting then, plus those arriving within ``max_wait_s``, up
  to ``max_batch`` images; nothing joins until every one of them has finished;
- ``step``: at every step boundary, waiting jobs join while the batch has room (continuous batching).

In every mode a finished job leaves the batch (is decoded and answered) at once, and a cancelled or expired
one is dropped at the next step boundary, freeing its rows. Each image depends on its own request only
(``ldm_runtime.pipeline``), so the mode changes latency and throughput, never the pixels.

A job with an ``events`` queue (a streamed request) hears how it goes, from the worker through its event loop:
``("queued", {"position": P})`` whenever the number of jobs ahead of it changes, ``("progress", {"step": S,
"steps": N})`` when it starts (S = 0) and after each step, and ``("preview", {"image": I, "index": K, "step": S,
"steps": N, "pixels": (H, W, 3) uint8})`` at ``job.previews`` steps spread evenly over its trajectory, made by the
batcher's previewer (``ldm_runtime.previews``) from the latents it holds; the images themselves still come
through the job's future, after every event.

A step gate (``StepGate``; ``LDM_SERVE_STEP_GATE`` in ``ldm-serve``) can hold the worker at a step boundary,
so that tests decide how much work is in flight instead of guessing from the machine's speed.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ldm_runtime.engines.base import batch_buckets_for
from ldm_runtime.errors import one_line
from ldm_runtime.pipeline import GenerationRequest, Pipeline, RequestError, SamplingState

BATCHING_MODES = ("none", "dynamic", "step")
GATE_POLL_S = 0.005  # how often a held worker looks at its gate (and at expired or departed jobs)
logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs; ``retry_after_s`` is a guess at when a slot frees."""

    def __init__(self, retry_after_s: int):
        super().__init__("the queue is full")
        self.retry_after_s = retry_after_s


class NotAccepting(Exception):
    """The batcher is not ready yet (warming up), is draining, or its engine failed the warm-up; ``reason`` is
    "warming_up", "draining" or "engine_failed"."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class JobTimeout(Exception):
    """The job passed its deadline before it finished."""


class JobCancelled(Exception):
    """The job was cancelled (``Batcher.cancel``) before it finished."""


@dataclass(frozen=True)
class JobResult:
    """A finished job: ``images`` are ``(H, W, 3) uint8``, one per request; times in seconds."""

    images: list[np.ndarray]
    queue_s: float
    compute_s: float


@dataclass(eq=False)
class Job:
    """One HTTP request: ``n`` generation requests sampled side by side, answered together through ``future``."""

    requests: list[GenerationRequest]
    deadline: float  # time.monotonic() after which the job is dropped
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    cancelled: bool = False  # set from the event loop (client gone); read by the worker at step boundaries
    states: list[SamplingState] = field(default_factory=list)
    id: str = field(default_factory=lambda: secrets.token_hex(12))  # what DELETE names; unguessable
    events: asyncio.Queue | None = None  # a streamed job's progress (module docstring); None: nobody listens
    previews: int = 0  # previews of each image wanted over its trajectory (with ``events``)
    position: int | None = None  # jobs ahead of it in the queue while it waits
    preview_steps: frozenset[int] = frozenset()

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, kind: str, **values: Any) -> None:
        """Hand one event to the job's ``events`` queue on its loop (thread-safe; nothing without a queue)."""
        if self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, values))
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        """Hand the outcome to the event loop (thread-safe; a job already answered ignores it)."""
        def settle() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass


@dataclass(frozen=True)
class BatcherConfig:
    mode: str = "step"
    max_batch: int = 4  # images per UNet call (guidance may double the UNet's rows)
    max_queue: int = 64  # jobs waiting to start; beyond it submit() raises QueueFull
    max_wait_s: float = 0.005  # dynamic mode: how long a first job waits for company

    def __post_init__(self) -> None:
        assert self.mode in BATCHING_MODES, self.mode
        assert self.max_batch >= 1 and self.max_queue >= 1 and self.max_wait_s >= 0, self


class StepGate:
    """Holds the worker at step boundaries while a file exists: with ``path`` present and holding the whole number
    K (empty: 0), the worker admits jobs and starts a step only while it has made fewer than K UNet calls since
    it started (one call per step while every running image has the same size); with ``path`` absent it never
    holds. A held worker still answers expired jobs with a timeout and drops the jobs of clients that left, and
    new jobs still queue, so a test can keep requests queued, running or past their deadline on any machine,
    let a given number of steps run, then release everything."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._reported: str | None = None

    def report(self, queued: int, running: int) -> None:
        """While the gate holds: the requests this process holds, queued and running, as "QUEUED RUNNING" in
        ``PATH.held-PID``, so that a test sees what each of several servers behind one address (Ray Serve's
        replicas) holds without asking them over HTTP, where the answer would come from whichever one is routed."""
        text = f"{queued} {running}\n"
        target = f"{self.path}.held-{os.getpid()}"
        if text != self._reported or not os.path.exists(target):  # the test removes the reports it has read
            with open(f"{target}.partial", "w", encoding="ascii") as file:
                file.write(text)
            os.replace(f"{target}.partial", target)
            self._reported = text

    def allows(self, unet_calls: int) -> bool:
        try:
            with open(self.path, encoding="ascii") as file:
                text = file.read().strip()
        except FileNotFoundError:
            return True
        except (OSError, UnicodeDecodeError):
            return False  # being rewritten: hold until it reads cleanly
        try:
            return unet_calls < int(text or 0)
        except ValueError:
            return False


def with_images_it_needs(request: GenerationRequest, info: Any) -> GenerationRequest:
    """``request`` as an engine of ``info`` can serve it without a client's images: on an inpainting engine (which
    repaints an image, never samples from text alone) with a blank image of its size and a mask over all of it."""
    if not getattr(info, "inpainting", False):
        return request
    side = info.image_size
    return dataclasses.replace(request, init_image=np.zeros((side, side, 3), np.uint8),
                               mask=np.full((side, side), 255, np.uint8))


def warm_up_batch_sizes(max_batch: int) -> list[int]:
    """The image counts the worker warms up with: 1, 2, 4, ... below ``max_batch``, then ``max_batch``."""
    return list(batch_buckets_for(max(1, max_batch)))


def preview_steps(steps: int, count: int) -> frozenset[int]:
    """The steps (counted as taken, 1 to ``steps`` - 1) after which ``count`` previews are made, spread evenly;
    fewer where the trajectory has fewer steps between its first and its last."""
    return frozenset(min(steps - 1, max(1, round(steps * index / (count + 1)))) for index in range(1, count + 1)
                     if steps > 1)


class Batcher:
    """The bounded queue and the worker thread. ``observer`` receives the events metrics are made of:
    ``observer("unet_call", rows=..., seconds=...)``, ``observer("queue_depth", depth=...)``,
    ``observer("active", rows=...)``. ``make_previewer`` (called once on the worker thread while it warms up, as
    it may run the engine) gives what makes a streamed job's previews (``ldm_runtime.previews``); None: no
    previews."""

    def __init__(self, pipeline: Pipeline, config: BatcherConfig,
                 observer: Callable[..., None] = lambda event, **values: None, step_gate: StepGate | None = None,
                 make_previewer: Callable[[], Any] | None = None):
        self.pipeline = pipeline
        self.config = config
        self.observer = observer
        self.step_gate = step_gate
        self.make_previewer = make_previewer
        self.previewer: Any = None
        self._unet_calls = 0
        self.ready = False
        self.failure: str | None = None  # why the engine failed its warm-up: then no request is taken
        self.draining = False
        self._queue: collections.deque[Job] = collections.deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._abandoned = False
        self._active: list[Job] = []
        self._recent_job_seconds = 1.0  # a running estimate of one job's wall time, for Retry-After
        self._thread = threading.Thread(target=self._run, name="ldm-serve-batcher", daemon=True)

    # --- the event loop's side --------------------------------------------------------------------------------

    def start(self, warm_up: bool = True) -> None:
        """Start the worker thread; it warms the engine up first, then sets ``ready``."""
        self._warm_up_first = warm_up
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; ``NotAccepting`` while warming up or draining, ``QueueFull`` at ``max_queue`` waiting."""
        with self._condition:
            if self.draining or self._stopping:
                raise NotAccepting("draining")
            if self.failure is not None:
                raise NotAccepting("engine_failed")
            if not self.ready:
                raise NotAccepting("warming_up")
            if len(self._queue) >= self.config.max_queue:
                raise QueueFull(self._retry_after_s())
            job.position = len(self._queue)
            job.emit("queued", position=job.position)
            self._queue.append(job)
            self.observer("queue_depth", depth=len(self._queue))
            self._condition.notify()

    def drain(self) -> None:
        """Refuse new jobs from now on; queued and running ones still finish."""
        with self._condition:
            self.draining = True
            self._condition.notify()

    def stop(self, timeout_s: float | None = None) -> None:
        """Finish what was submitted, then end the worker thread."""
        with self._condition:
            self.draining = True
            self._stopping = True
            self._condition.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def abandon(self) -> None:
        """The drain time is up: every queued and running job is answered ``NotAccepting("draining")`` now, and the
        worker drops the running ones at its next step boundary (and any it was just admitting)."""
        with self._condition:
            self.draining = True
            self._abandoned = True
            jobs = [*self._queue, *self._active]
            self._queue.clear()
            self.observer("queue_depth", depth=0)
            self._condition.notify()
        for job in jobs:
            job.cancel()
            job.resolve(error=NotAccepting("draining"))

    def cancel(self, job: Job) -> None:
        """Cancel ``job`` for its client: it is answered ``JobCancelled`` now and leaves as ``withdraw`` says."""
        self.withdraw(job)
        job.resolve(error=JobCancelled())

    def withdraw(self, job: Job) -> None:
        """The client of ``job`` has gone: a queued job frees its slot now, a running one at the next step."""
        job.cancel()
        with self._condition:
            try:
                self._queue.remove(job)
            except ValueError:
                pass  # already running (or finished)
            else:
                self.observer("queue_depth", depth=len(self._queue))
                self._tell_positions()
            self._condition.notify()

    @property
    def alive(self) -> bool:
        """The worker thread is running, or has not been started yet (False once it has ended or died)."""
        return self._thread.ident is None or self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def _retry_after_s(self) -> int:
        batches_ahead = len(self._queue) / max(1, self.config.max_batch)
        return max(1, math.ceil(batches_ahead * self._recent_job_seconds))

    # --- the worker thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        if self._warm_up_first:
            self._warm_up()
        if self.make_previewer is not None:
            try:
                self.previewer = self.make_previewer()
            except Exception:  # streamed requests then get no previews; the log says why
                logger.exception("preparing the previews failed")
        self.ready = True
        while True:
            admitted = self._admit()
            if admitted is None:
                return
            self._start_jobs(admitted)
            self._drop_cancelled_and_expired()
            if self._active:
                self._step()
            self.observer("active", rows=sum(len(job.states) for job in self._active))

    def _warm_up(self) -> None:
        """One short request alone, then batches of 2, 4, ... images and a full one, so that the first real requests
        pay no first-call costs: engines compile or prepare each batch bucket (powers of two) on its first call."""
        request = with_images_it_needs(GenerationRequest(prompt="warm up", seed=0, steps=1),
                                       getattr(self.pipeline, "info", None))
        sizes = warm_up_batch_sizes(self.config.max_batch)
        try:
            for size in sizes:
                self.pipeline.generate([dataclasses.replace(request, seed=seed) for seed in range(size)],
                                       batch_size=size)
        except Exception as error:  # the log keeps the details; /readyz and every request then say it failed
            logger.exception("warming the engine up failed")
            self.failure = one_line(f"{type(error).__name__}: {error}", 200)

    def _admit(self) -> list[Job] | None:
        """The jobs that join the batch now (may block while idle); None when stopping with nothing left."""
        mode, max_batch = self.config.mode, self.config.max_batch
        with self._condition:
            while True:
                self._discard_cancelled_queued()
                if not self._active and not self._queue:
                    if self._stopping:
                        return None
                    self._condition.wait()
                elif self._held():
                    self.step_gate.report(len(self._queue), len(self._active))
                    self._condition.wait(GATE_POLL_S)
                    self._drop_cancelled_and_expired()
                    self.observer("active", rows=sum(len(job.states) for job in self._active))
                else:
                    break
            if self._active and mode != "step":
                return []
            if mode == "dynamic" and not self._active:
                deadline = time.monotonic() + self.config.max_wait_s
                while self._rows_waiting() < max_batch and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(remaining)
                self._discard_cancelled_queued()
            admitted: list[Job] = []
            room = max_batch - sum(len(job.states) for job in self._active)
            while self._queue and (mode != "none" or not admitted):
                rows = len(self._queue[0].requests)
                if rows > room and (admitted or self._active):
                    break  # first come, first served: a large job is not overtaken by smaller ones behind it
                job = self._queue.popleft()
                admitted.append(job)
                room -= rows
            self.observer("queue_depth", depth=len(self._queue))
            self._tell_positions()
            return admitted

    def _tell_positions(self) -> None:
        """Each queued job that listens hears its new position where it has changed (caller holds the condition)."""
        for position, job in enumerate(self._queue):
            if job.position != position:
                job.position = position
                job.emit("queued", position=position)

    def _held(self) -> bool:
        """The step gate holds: no job is admitted and no step starts (expired and departed jobs still leave)."""
        return self.step_gate is not None and not self.step_gate.allows(self._unet_calls)

    def _rows_waiting(self) -> int:
        return sum(len(job.requests) for job in self._queue)

    def _discard_cancelled_queued(self) -> None:
        """Drop queued jobs whose client left or whose deadline passed (caller holds the condition)."""
        live = _live_jobs(self._queue)
        if len(live) != len(self._queue):
            self._queue = collections.deque(live)
            self.observer("queue_depth", depth=len(self._queue))
            self._tell_positions()

    def _start_jobs(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        now = time.monotonic()
        if self._abandoned:
            for job in jobs:
                job.resolve(error=NotAccepting("draining"))
            return
        jobs = [job for job in jobs if not job.cancelled]
        requests = [request for job in jobs for request in job.requests]
        try:
            states = self.pipeline.start(requests)
        except Exception as error:
            for job in jobs:
                self._fail(job, error)
            return
        for job in jobs:
            job.started_at = now
            job.states, states = states[:len(job.requests)], states[len(job.requests):]
            self._active.append(job)
            if job.events is not None:
                steps = max(len(state.trajectory) for state in job.states)
                job.preview_steps = preview_steps(steps, job.previews) if self.previewer is not None else frozenset()
                job.emit("progress", step=0, steps=steps)

    def _drop_cancelled_and_expired(self) -> None:
        self._active = _live_jobs(self._active)

    def _step(self) -> None:
        """One UNet call per latent shape over every unfinished state, then answer the jobs that finished."""
        groups: dict[tuple[int, ...], list[tuple[Job, int]]] = {}
        for job in self._active:
            for index, state in enumerate(job.states):
                if not state.done:
                    groups.setdefault(state.latent_shape, []).append((job, index))
        failed: set[int] = set()
        for members in groups.values():
            started = time.perf_counter()
            try:
                advanced = self.pipeline.advance([job.states[index] for job, index in members])
            except Exception as error:
                for job in {id(job): job for job, _ in members}.values():
                    failed.add(id(job))
                    self._fail(job, error)
                continue
            self._unet_calls += 1
            self.observer("unet_call", rows=len(members), seconds=time.perf_counter() - started)
            for (job, index), state in zip(members, advanced):
                job.states[index] = state
        still_running = []
        for job in self._active:
            if id(job) in failed or job.cancelled:
                continue
            if all(state.done for state in job.states):
                self._finish(job)
            else:
                still_running.append(job)
                if job.events is not None:
                    self._tell_progress(job)
        self._active = still_running

    def _tell_progress(self, job: Job) -> None:
        """A running streamed job hears its step, and gets its previews at the steps planned for them."""
        step = min(state.step_index for state in job.states)
        steps = max(len(state.trajectory) for state in job.states)
        job.emit("progress", step=step, steps=steps)
        if step not in job.preview_steps:
            return
        try:
            images = self.previewer.images(self.pipeline.engine, [state.latents for state in job.states])
        except Exception:  # a preview is a nicety: the job goes on without the rest of them
            logger.exception("a preview failed")
            job.preview_steps = frozenset()
            return
        index = sorted(job.preview_steps).index(step)
        for image, pixels in enumerate(images):
            job.emit("preview", image=image, index=index, step=step, steps=steps, pixels=pixels)

    def _finish(self, job: Job) -> None:
        try:
            images = self.pipeline.decode(job.states)
        except Exception as error:
            self._fail(job, error)
            return
        finished = time.monotonic()
        assert job.started_at is not None
        self._recent_job_seconds = 0.8 * self._recent_job_seconds + 0.2 * (finished - job.enqueued_at)
        job.resolve(JobResult(images=images, queue_s=job.started_at - job.enqueued_at,
                              compute_s=finished - job.started_at))

    def _fail(self, job: Job, error: Exception) -> None:
        if not isinstance(error, RequestError):  # a request error is the client's; anything else goes to the log
            logger.error("a job failed", exc_info=error)
        job.resolve(error=error)


def _live_jobs(jobs) -> list[Job]:
    """``jobs`` less those whose client left, and less those past their deadline, which are answered with
    ``JobTimeout``."""
    now = time.monotonic()
    kept = []
    for job in jobs:
        if job.cancelled:
            continue
        if now > job.deadline:
            job.resolve(error=JobTimeout())
            continue
        kept.append(job)
    return kept
