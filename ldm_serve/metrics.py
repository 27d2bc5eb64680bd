"""The Prometheus metrics of ``ldm-serve`` (``GET /metrics``): queue depth, images in the running batch, batch
sizes, latency, requests by outcome (a request cancelled by ``DELETE`` is "cancelled", one whose client left or
closed its stream "disconnected"), UNet calls, denoising steps, and requests by the LoRA adapters they name."""

from __future__ import annotations

from typing import Any, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ldm_runtime.adapters import RESERVED_ADAPTER_NAMES

OUTCOMES = ("ok", "invalid", "unauthorized", "queue_full", "not_ready", "draining", "timeout", "disconnected",
            "cancelled", "error")
NO_ADAPTER = RESERVED_ADAPTER_NAMES[0]  # the adapter label of a request that names none (no adapter's name)


class ServeMetrics:
    """The Prometheus metrics of one server, in their own registry; ``observe`` is the batcher's observer.

    Rates are Prometheus's to compute from the counters: denoising steps per second over the last minute is
    ``rate(ldm_serve_sample_steps_total[1m])``, UNet calls per second ``rate(ldm_serve_unet_calls_total[1m])``.
    """

    def __init__(self, adapter_names: Sequence[str] = ()) -> None:
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("ldm_serve_queue_depth", "Requests waiting to start", registry=self.registry)
        self.active_images = Gauge("ldm_serve_active_images", "Images in the running batch", registry=self.registry)
        self.batch_size = Histogram("ldm_serve_batch_size", "Images per UNet call (before guidance doubles them)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.latency = Histogram("ldm_serve_request_latency_seconds", "Time from arrival to answer, per request",
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                 registry=self.registry)
        self.requests = Counter("ldm_serve_requests", "Requests by outcome", ["outcome"], registry=self.registry)
        self.in_flight = Gauge("ldm_serve_requests_in_flight", "Image requests received and not yet answered",
                               registry=self.registry)
        self.unet_calls = Counter("ldm_serve_unet_calls", "Batched UNet calls", registry=self.registry)
        self.sample_steps = Counter("ldm_serve_sample_steps", "Denoising steps taken, summed over images "
                                    "(steps per second: rate() of this counter)", registry=self.registry)
        self.adapter_requests = Counter("ldm_serve_adapter_requests", "Requests queued, by each LoRA adapter they "
                                        "name (none: no adapter)", ["adapter"], registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for name in (NO_ADAPTER, *adapter_names):
            self.adapter_requests.labels(name)

    def count_adapters(self, lora: Sequence[tuple[str, float]]) -> None:
        """One queued request that names the adapters ``lora`` ((name, scale) pairs; none: ``NO_ADAPTER``)."""
        for name in [name for name, _ in lora] or [NO_ADAPTER]:
            self.adapter_requests.labels(name).inc()

    def observe(self, event: str, **values: Any) -> None:
        if event == "queue_depth":
            self.queue_depth.set(values["depth"])
        elif event == "active":
            self.active_images.set(values["rows"])
        elif event == "unet_call":
            self.batch_size.observe(values["rows"])
            self.unet_calls.inc()
            self.sample_steps.inc(values["rows"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
