"""The scheduler of an HTTP process whose model workers (model_worker.py) run elsewhere: the same methods as
scheduler.Scheduler, so create_app(settings, scheduler=RemoteScheduler(...)) serves every route unchanged.

Each job submitted here has a mirror, a ServeJob in this process that the routes wait on, stream and preview from
as usual. The worker's stream of messages (messages.py) drives the mirror: one thread per job in flight reads it
and re-emits each message as the job's event. `client` is the transport to the workers (ray_app.py over Ray
Serve; the tests in one process), with blocking calls:

    client.run(model, request)       an iterator over the job's messages, with .cancel()
    client.stop_early(job_id)        to the worker that owns the job (its id names it)
    client.check(model, request)     (name, Plan) or messages.Refused
    client.load(model)               messages.ModelInfo or messages.Refused

A transport that loses a worker raises WorkerLost from the stream; the job then fails with it (503), and so does
a stream that ends without an ending message. Cancelling a job ends its mirror at once and closes its stream,
which makes the worker drop the job. `queued`, `running` and the metrics count this process's jobs; queue limits
are each worker's own (`max_queue` per worker).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from ..errors import Cancelled, FastLDMError, QueueFull, ShuttingDown, WorkerLost
from ..request import GenerationRequest
from . import messages as m
from .catalog import ModelCatalog
from .jobs import ServeJob
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("fastldm.serve")


@dataclass(eq=False)
class _Follow:
    job: ServeJob
    stream: object              # the client's message iterator
    model_hash: str
    eta_s: float | None = None   # as the worker said at its last step message, `eta_at` (time.monotonic())
    eta_at: float = 0.0


class RemoteScheduler:
    def __init__(self, settings: Settings, client):
        self.settings, self.client = settings, client
        self.catalog = ModelCatalog(settings.model, settings.models_dir)
        self.metrics = Metrics()
        self._follows: dict[str, _Follow] = {}
        self._models: dict[str, str] = {}      # listed name -> hash, of the models a worker said it loaded
        self._lock = threading.Lock()
        self._closed: ShuttingDown | None = None
        self.metrics.track(lambda: len(self.queued()), lambda: len(self.running()), lambda: len(self._models))

    # ---- jobs ---------------------------------------------------------------------------------------------

    def submit(self, model: str | None, request: GenerationRequest) -> ServeJob:
        """Queue `request` on a worker; its mirror. The worker's refusal (RequestError, QueueFull, ...) is raised.
        Blocking: call from a thread pool."""
        if self._closed is not None:
            raise self._closed
        stream = self.client.run(model, request)
        first = next(stream, None)
        if first is None:
            raise WorkerLost("the model worker closed the job's stream before answering; try again")
        if isinstance(first, m.Refused):
            if isinstance(first.error, QueueFull):
                self.metrics.rejected.inc()
            raise first.error
        job = ServeJob(first.model.name, first.plan, id=first.job_id, created=first.created)
        follow = _Follow(job, stream, first.model.model_hash)
        with self._lock:
            self._models[first.model.name] = first.model.model_hash
            self._follows[job.id] = follow
        job.emit("queued")
        threading.Thread(target=self._follow, args=(follow,), name=f"fastldm-job-{job.id[-8:]}", daemon=True).start()
        return job

    def _follow(self, follow: _Follow) -> None:
        job = follow.job
        try:
            for message in follow.stream:
                self._apply(follow, message)
                if isinstance(message, m.ENDS):
                    break
            else:
                raise WorkerLost(f"the model worker of job {job.id} closed its stream before the job ended")
        except BaseException as e:   # whatever ends the stream ends the job (a cancelled stream raises CancelledError)
            if not job.ended:        # (after our own cancel the stream's error is expected)
                if not isinstance(e, FastLDMError):
                    log.error("job %s: the stream from its worker failed", job.id, exc_info=e)
                self._end(job, "failed", e)
        finally:
            with self._lock:
                self._follows.pop(job.id, None)

    def _apply(self, follow: _Follow, message) -> None:
        job = follow.job
        if isinstance(message, m.Started):
            job.projection = message.projection
            job.emit("started")
        elif isinstance(message, m.Step):
            job.step, job.steps, job.x0, follow.eta_s = message.step, message.steps, message.x0, message.eta_s
            follow.eta_at = time.monotonic()
            job.emit("step", step=job.step, steps=job.steps)
        elif isinstance(message, m.Done):
            job.result, job.infotexts, job.model_hash = message.result, message.infotexts, follow.model_hash
            self.metrics.images.inc(len(message.result.images))
            self._end(job, "done")
        elif isinstance(message, (m.Failed, m.Cancelled)):
            self._end(job, "failed" if isinstance(message, m.Failed) else "cancelled", message.error)

    def _end(self, job: ServeJob, outcome: str, error: BaseException | None = None) -> None:
        if error is not None:
            job.error = error
        self.metrics.jobs.labels(outcome).inc()
        job.emit(outcome, **({} if error is None else {"error": str(error)}))

    def check(self, model: str | None, request: GenerationRequest):
        """(listed name, Plan) for `request`, or the error a submit would raise. Blocking."""
        answer = self.client.check(model, request)
        if isinstance(answer, m.Refused):
            raise answer.error
        return answer

    def cancel(self, job: ServeJob, error: BaseException | None = None) -> None:
        """End the mirror now (its waiters are answered) and close the stream (the worker drops the job)."""
        if job.ended:
            return
        with self._lock:
            follow = self._follows.get(job.id)
        self._end(job, "cancelled", error or Cancelled("the job was cancelled"))
        if follow is not None:
            follow.stream.cancel()

    def interrupt(self) -> int:
        jobs = self.running()
        for job in jobs:
            self._stop_early(job)
        return len(jobs)

    def skip(self) -> int:
        job = self.current()
        if job is not None:
            self._stop_early(job)
        return int(job is not None)

    def _stop_early(self, job: ServeJob) -> None:
        job.stop_early = True        # (A1111 progress shows it)
        self.client.stop_early(job.id)

    def current(self) -> ServeJob | None:
        return min(self.running(), key=lambda j: j.started or 0.0, default=None)

    def eta(self, job: ServeJob) -> float | None:
        with self._lock:
            follow = self._follows.get(job.id)
        if follow is None or job.status != "running" or follow.eta_s is None:
            return None
        return max(follow.eta_s - (time.monotonic() - follow.eta_at), 0.0)

    def queued(self) -> list[ServeJob]:
        return [j for j in self._jobs() if j.status == "queued"]

    def running(self) -> list[ServeJob]:
        return [j for j in self._jobs() if j.status == "running"]

    def _jobs(self) -> list[ServeJob]:
        with self._lock:
            return [f.job for f in self._follows.values()]

    # ---- models -------------------------------------------------------------------------------------------

    def load(self, name: str | None) -> str:
        """Have a worker load the listed model `name` (None: the default); its listed name. Blocking."""
        answer = self.client.load(name)
        if isinstance(answer, m.Refused):
            raise answer.error
        with self._lock:
            self._models[answer.name] = answer.model_hash
        return answer.name

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def model_hashes(self) -> dict[str, str]:
        with self._lock:
            return dict(self._models)

    def close(self, wait_s: float = 0.0) -> None:
        """Refuse new jobs and cancel the ones in flight (their clients get ShuttingDown, 503)."""
        self._closed = ShuttingDown("the server is shutting down; the job was cancelled")
        for job in self._jobs():
            self.cancel(job, self._closed)
