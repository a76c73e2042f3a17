"""Scheduling: one worker thread per loaded model owns its pipeline and a BatchedRun (run.py); HTTP handlers
only plan, enqueue and wait.

Worker loop, between two denoising steps: cancel the jobs asked to be cancelled; admit queued jobs in arrival
order while the images in flight stay within `max_batch` (a job bigger than that runs alone); then one
`BatchedRun.step()`, which runs the jobs whose UNet inputs have the same shapes (size, text length,
conditioning; executor) as one UNet call and the others as calls of their own, and ends the jobs whose own steps
are done. So a request arriving mid-run joins at the next step boundary and leaves when its steps are done, and
its image is the one it gets alone (run.py; the bound is in tests/test_run.py). `max_batch=1` is A1111's
behaviour: one request at a time.

`Scheduler` maps listed model names to workers: a worker is started (its model loaded) on first use, and the
workers are an LRU bounded by `model_memory` (bytes of loaded weights): loading a model first stops the least
recently used idle workers until it fits. The waiting line is bounded too: `max_queue` jobs waiting to start,
all models together; one more is refused (QueueFull, 429) with an estimate of when a slot opens.

Stopping a job: `cancel` (the jobs API, a client that went away, shutdown) ends it now for its waiters and the
worker drops it at the next step boundary; `interrupt` / `skip` (A1111) let it end at the next step with the
image decoded from its current x0 estimate, as A1111 returns what is there.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from typing import Callable

import torch

from ..api import parameters_text, pipeline_hash
from ..errors import Cancelled, FastLDMError, MemoryBudgetError, QueueFull, ShuttingDown
from ..plan import Plan
from ..request import GenerationRequest
from ..runtime.weight_storage import stored_bytes
from ..run import BatchedRun, Job
from .catalog import ModelCatalog
from .jobs import ServeJob
from .metrics import Metrics
from .preview import LatentPreview
from .settings import Settings

log = logging.getLogger("fastldm.serve")
EMA = 0.3   # weight of the newest step time in the running average behind ETAs


class Worker:
    """One loaded pipeline and the thread that owns it (see the module docstring)."""

    def __init__(self, name: str, pipe, max_batch: int, metrics: Metrics):
        self.name, self.pipe, self.max_batch, self.metrics = name, pipe, max_batch, metrics
        self.preview = LatentPreview.fit(pipe)
        self.weights_bytes = weights_bytes(pipe)
        self.model_hash = pipeline_hash(pipe)          # hashed here (the loading thread), not in the first job
        self.step_seconds: float | None = None      # running average of one step of everything in flight
        self.pins = 0                                # handlers planning against this pipeline (Scheduler's lock)
        self._queue: deque[ServeJob] = deque()
        self._running: OrderedDict[ServeJob, Job] = OrderedDict()   # oldest first
        self._run = BatchedRun(pipe)
        self._cond = threading.Condition()
        self._closing: ShuttingDown | None = None
        self._thread = threading.Thread(target=self._loop, name=f"fastldm-worker-{name}", daemon=True)
        self._thread.start()

    # ---- called from other threads ------------------------------------------------------------------------

    def submit(self, job: ServeJob) -> None:
        with self._cond:
            if self._closing is not None:
                raise self._closing
            self._queue.append(job)
            self._cond.notify()
        job.emit("queued")

    def cancel(self, job: ServeJob, error: BaseException) -> None:
        """End `job` now with `error` (a Cancelled); a running one leaves the batch at the next step, and so does
        one the worker is starting (taken from the queue, not yet in the batch: its prompt is being encoded)."""
        with self._cond:
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
            elif not job.ended:
                job.cancel_with = error
                self._cond.notify()
        if queued:
            self._outcome("cancelled")
        if not job.ended:
            job.error = error
            job.emit("cancelled", error=str(error))

    def close(self, error: ShuttingDown, wait_s: float = 0.0) -> None:
        """Stop admitting, cancel every job (waiters are answered now), let the thread exit after its step."""
        with self._cond:
            self._closing = error
            jobs = list(self._queue) + list(self._running)
            self._queue.clear()
            self._cond.notify()
        for job in jobs:
            job.error = error
            job.emit("cancelled", error=str(error))
        self._thread.join(wait_s)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queued(self) -> list[ServeJob]:
        with self._cond:
            return list(self._queue)

    @property
    def running(self) -> list[ServeJob]:
        with self._cond:
            return list(self._running)

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._running and self.pins == 0

    def eta(self, job: ServeJob) -> float | None:
        """Seconds until `job` (running) is done, from the measured step time; before the first step is timed
        (its callback runs inside it), from the job's own time per step so far, as A1111 estimates."""
        per_step = self.step_seconds
        if per_step is None and job.step > 0 and job.started is not None:
            per_step = (time.time() - job.started) / job.step
        return None if per_step is None else (job.steps - job.step) * per_step

    # ---- the worker thread --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._running and self._closing is None:
                    self._cond.wait()
                closing = self._closing
                leaving = [j for j in self._running if closing is not None or j.cancel_with is not None]
                admitted = self._admit() if closing is None else []
            for job in leaving:
                self._run.cancel(self._running[job], job.cancel_with or closing)
                self._outcome("cancelled")
                with self._cond:
                    del self._running[job]
            if closing is not None:
                return
            try:
                for job in admitted:
                    self._start(job)
                if self._run.jobs:
                    self._step()
            except Exception as e:   # a bug in the loop: fail what is in flight, keep serving
                log.error("worker %s: the batch failed", self.name, exc_info=e)
                with self._cond:
                    failed, self._running = list(self._running), OrderedDict()
                self._run = BatchedRun(self.pipe)
                for job in failed:
                    self._end(job, error=e)

    def _admit(self) -> list[ServeJob]:
        """Queued jobs that join the next step (the caller holds the lock)."""
        in_flight = sum(j.images for j in self._running)
        admitted = []
        while self._queue and (in_flight == 0 or in_flight + self._queue[0].images <= self.max_batch):
            job = self._queue.popleft()
            in_flight += job.images
            admitted.append(job)
        return admitted

    def _start(self, job: ServeJob) -> None:
        def on_step(info: dict) -> bool:
            job.step, job.steps = info["i"] + 1, info["total"]
            job.x0 = info["denoised"][0].detach().clone()    # (C, h, w): previewed on demand
            job.emit("step", step=job.step, steps=job.steps)
            return job.stop_early

        job.projection = self.preview
        try:
            run_job = self._run.add(job.plan, on_step)
        except Exception as e:   # encoding the prompt or the init image failed
            run_job = None
            error = e
        else:
            error = run_job.error
        if error is not None:
            self._end(job, error=error)
            return
        with self._cond:
            self._running[job] = run_job
        job.emit("started")

    def _step(self) -> None:
        images = sum(j.images for j in self._running)
        t0 = time.perf_counter()
        ended = self._run.step()
        dt = time.perf_counter() - t0
        self.step_seconds = dt if self.step_seconds is None else (1 - EMA) * self.step_seconds + EMA * dt
        self.metrics.step_seconds.observe(dt)
        self.metrics.batch_size.observe(images)
        owner = {run_job: job for job, run_job in self._running.items()}
        for run_job in ended:
            job = owner[run_job]
            with self._cond:
                del self._running[job]
            self._end(job, run_job.result, run_job.error)

    def _end(self, job: ServeJob, result=None, error: BaseException | None = None) -> None:
        if error is not None:
            if not isinstance(error, FastLDMError):
                log.error("job %s failed", job.id, exc_info=error)
            self._outcome("cancelled" if isinstance(error, Cancelled) else "failed")
            job.error = error
            job.emit("cancelled" if isinstance(error, Cancelled) else "failed", error=str(error))
            return
        result.latents, result.raw = None, None   # kept jobs hold only the images and depth maps
        job.infotexts = [parameters_text(self.pipe, result, i) for i in range(len(result.images))]
        job.model_hash = self.model_hash
        job.result = result
        self.metrics.images.inc(len(result.images))
        self._outcome("done")
        job.emit("done")

    def _outcome(self, outcome: str) -> None:
        self.metrics.jobs.labels(outcome).inc()


class Scheduler:
    """Workers by model name, the bounded queue, and the A1111-style global controls (see the module docstring)."""

    def __init__(self, settings: Settings, catalog: ModelCatalog, metrics: Metrics, load: Callable):
        self.settings, self.catalog, self.metrics, self._load = settings, catalog, metrics, load
        self.budget = settings.model_memory or default_model_memory(settings.device)
        self._workers: OrderedDict[str, Worker] = OrderedDict()   # least recently used first
        self._lock = threading.RLock()       # the workers and their pins; held while checking and queueing
        self._load_lock = threading.Lock()   # one model loads at a time
        self._closed: ShuttingDown | None = None
        metrics.track(lambda: len(self.queued()), lambda: len(self.running()), lambda: len(self._workers))

    # ---- models -------------------------------------------------------------------------------------------

    def worker(self, name: str | None) -> Worker:
        """The worker of the listed model `name` (None: the default), loading it if needed, pinned against
        eviction until `release`. Blocking: call from a thread pool."""
        entry = self.catalog.resolve(name)
        with self._load_lock:
            with self._lock:
                if self._closed is not None:
                    raise self._closed
                worker = self._workers.get(entry.name)
                if worker is not None:
                    self._workers.move_to_end(entry.name)
                    worker.pins += 1
                    return worker
            self._make_room(entry.name, entry.weights_bytes)
            s = self.settings
            log.info("loading model %s", entry.name)
            worker = Worker(entry.name, self._load(entry.path, **s.load_options), s.max_batch,
                            self.metrics)
            with self._lock:
                if self._closed is not None:
                    worker.close(self._closed)
                    raise self._closed
                self._workers[entry.name] = worker
                worker.pins += 1
            return worker

    def release(self, worker: Worker) -> None:
        with self._lock:
            worker.pins -= 1

    def load(self, name: str | None) -> str:
        """Load the listed model `name` (None: the default) if it is not loaded; its listed name. Blocking."""
        worker = self.worker(name)
        self.release(worker)
        return worker.name

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._workers)

    def model_hashes(self) -> dict[str, str]:
        """The A1111 short hash of each loaded model, by name."""
        return {w.name: w.model_hash for w in self.workers()}

    def _make_room(self, name: str, needed: int) -> None:
        """Stop idle workers, least recently used first, until `needed` more bytes fit the budget."""
        with self._lock:
            workers = list(self._workers.values())
        used = sum(w.weights_bytes for w in workers)
        for w in workers:
            if used + needed <= self.budget:
                break
            with self._lock:
                if not w.idle:
                    continue
                del self._workers[w.name]
            log.info("unloading model %s to make room for %s", w.name, name)
            w.close(ShuttingDown(f"model {w.name} was unloaded"))
            used -= w.weights_bytes
        if used + needed > self.budget:
            gib = 1 << 30
            busy = "" if used == 0 else f"; {used / gib:.1f} GiB are held by models with jobs in flight"
            raise MemoryBudgetError(f"model {name} needs about {needed / gib:.1f} GiB, the server's model memory is "
                                    f"{self.budget / gib:.1f} GiB{busy}", needed, self.budget)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- jobs ---------------------------------------------------------------------------------------------

    def check(self, model: str | None, request: GenerationRequest) -> tuple[str, Plan]:
        """(the model's listed name, the plan) `request` would run as, or the error `submit` would raise for it
        (queueing aside). Blocking: call from a thread pool."""
        worker = self.worker(model)
        try:
            return worker.name, worker.pipe.plan(request, self.settings.limits)
        finally:
            self.release(worker)

    def submit(self, model: str | None, request: GenerationRequest) -> ServeJob:
        """Check `request` against the model and the server's limits (RequestError, 422), then queue it
        (QueueFull, 429). Blocking (it may load the model; "auto" steps run the step predictor): call from a
        thread pool."""
        self._check_room()
        worker = self.worker(model)
        try:
            job = ServeJob(worker.name, worker.pipe.plan(request, self.settings.limits))
            with self._lock:
                self._check_room()
                worker.submit(job)
        finally:
            self.release(worker)
        return job

    def _check_room(self) -> None:
        waiting = len(self.queued())
        if waiting >= self.settings.max_queue:
            self.metrics.rejected.inc()
            raise QueueFull(waiting, self.retry_after())

    def retry_after(self) -> int:
        """Seconds until a running job ends (so a queued one starts and a place in the queue opens)."""
        etas = [e for w in self.workers() for j in w.running if (e := w.eta(j)) is not None]
        return min(300, max(1, math.ceil(min(etas, default=1.0))))

    def cancel(self, job: ServeJob, error: BaseException | None = None) -> None:
        """End `job` (queued: dropped; running: it leaves the batch at the next step)."""
        if job.ended:
            return
        worker = self._workers.get(job.model)
        error = error or Cancelled("the job was cancelled")
        if worker is not None:
            worker.cancel(job, error)

    def interrupt(self) -> int:
        """A1111 interrupt: every running job ends at its next step with what it has. Returns how many."""
        jobs = self.running()
        for job in jobs:
            job.stop_early = True
        return len(jobs)

    def skip(self) -> int:
        """A1111 skip: the oldest running job ends at its next step with what it has."""
        job = self.current()
        if job is not None:
            job.stop_early = True
        return int(job is not None)

    def current(self) -> ServeJob | None:
        """The job a client polling progress most likely waits for: the oldest running one."""
        return min(self.running(), key=lambda j: j.started or 0.0, default=None)

    def eta(self, job: ServeJob) -> float | None:
        worker = self._workers.get(job.model)
        return None if worker is None else worker.eta(job)

    def queued(self) -> list[ServeJob]:
        return [j for w in self.workers() for j in w.queued]

    def running(self) -> list[ServeJob]:
        return [j for w in self.workers() for j in w.running]

    def workers(self) -> list[Worker]:
        with self._lock:
            return list(self._workers.values())

    def close(self, wait_s: float = 2.0) -> None:
        """Shut down: refuse new jobs, cancel the queued and running ones (their clients get ShuttingDown, 503),
        and give each worker `wait_s` to finish its step."""
        with self._lock:
            self._closed = ShuttingDown("the server is shutting down; the job was cancelled")
            workers = list(self._workers.values())
        for w in workers:
            w.close(self._closed, wait_s)

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds in all for the workers' threads to end; whether they all did."""
        deadline = time.monotonic() + timeout
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
        return not any(w.alive for w in workers)


def weights_bytes(pipe) -> int:
    """Bytes of a pipeline's parameters and buffers as loaded, each storage once (weight_storage.stored_bytes)."""
    return stored_bytes(*(m for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2) if m is not None))


def default_model_memory(device: str) -> int:
    """Half of the device's memory: the GPU's for CUDA, the machine's RAM otherwise."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device(device)).total_memory // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
