"""Prometheus metrics of one server (prometheus-client), in a registry of its own: two apps in one process keep
separate counts. Served as text at /metrics."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("fastldm_queue_depth", "jobs waiting to start", registry=r)
        self.running = Gauge("fastldm_running_jobs", "jobs being denoised", registry=r)
        self.loaded_models = Gauge("fastldm_loaded_models", "pipelines in memory", registry=r)
        self.batch_size = Histogram("fastldm_batch_images", "images denoised together in one step (all of a "
                                    "model's jobs in flight)", buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("fastldm_step_seconds", "wall time of one denoising step of a model's "
                                      "jobs in flight", buckets=STEP_BUCKETS, registry=r)
        self.images = Counter("fastldm_images", "images generated", registry=r)
        self.jobs = Counter("fastldm_jobs", "jobs ended, by outcome", ["outcome"], registry=r)
        self.errors = Counter("fastldm_http_errors", "error responses, by status", ["status"], registry=r)
        self.rejected = Counter("fastldm_queue_rejections", "requests answered 429 (queue full)", registry=r)
        self.disconnects = Counter("fastldm_disconnects", "clients that went away before their job ended",
                                   registry=r)

    def track(self, queued: Callable[[], int], running: Callable[[], int], loaded: Callable[[], int]) -> None:
        """Read the gauges from the scheduler when scraped."""
        self.queue_depth.set_function(queued)
        self.running.set_function(running)
        self.loaded_models.set_function(loaded)

    def text(self) -> bytes:
        return generate_latest(self.registry)
