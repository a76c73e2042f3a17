"""The model worker of a multi-process server: a Scheduler (scheduler.py: its pipelines, step-level batching, its
own bounded queue) behind a few asyncio methods whose arguments and answers are picklable (messages.py).
ray_app.py makes it a Ray Serve deployment; nothing here knows Ray, so it also runs in one process (the tests).

    run(model, request)   a job's stream of messages (messages.py); closing the stream early cancels the job
    stop_early(job_id)    A1111 interrupt/skip of one job: it ends at its next step with what it has
    check(model, request) (listed name, Plan) or Refused, as POST /fastldm/v1/plan wants it
    load(model)           load a listed model (None: the default); its ModelInfo, or Refused

Job ids are "<worker id>.<the job's own id>", so whoever holds an id knows which worker owns the job.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from ..errors import Cancelled, FastLDMError
from ..request import GenerationRequest
from . import messages as m
from .catalog import ModelCatalog
from .metrics import Metrics
from .scheduler import Scheduler
from .settings import Settings


class ModelWorker:
    def __init__(self, settings: Settings, worker_id: str, load=None):
        """`worker_id`: unique among the server's workers, without a dot. `load`: as Scheduler's (default
        fastldm.load). The default model is loaded now, so a worker is ready when it is up."""
        from ..api import load as load_model

        self.worker_id = worker_id
        self.scheduler = Scheduler(settings, ModelCatalog(settings.model, settings.models_dir), Metrics(),
                                   load or load_model)
        self._jobs: dict = {}          # job id -> ServeJob, while its stream is open
        self.scheduler.load(None)

    async def run(self, model: str | None, request: GenerationRequest) -> AsyncIterator:
        try:
            job = await asyncio.to_thread(self.scheduler.submit, model, request)
        except FastLDMError as e:
            yield m.Refused(e)
            return
        job_id = f"{self.worker_id}.{job.id}"
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict] = asyncio.Queue()
        unsubscribe = job.subscribe(lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        self._jobs[job_id] = job
        try:
            yield m.Accepted(job_id, m.ModelInfo(job.model, self.scheduler.model_hashes().get(job.model, "")),
                             job.plan, job.created)
            if job.status == "running":       # started before we subscribed
                yield m.Started(job.started, job.projection)
            while True:
                ev = await events.get()
                kind = ev["event"]
                if kind == "step" and not events.empty():
                    continue                  # a slow reader skips to the latest step
                message = self._message(job, kind)
                if message is not None:
                    yield message
                if isinstance(message, m.ENDS):
                    return
        finally:
            # The reader went away (its client disconnected, the HTTP process cancelled the stream): drop the job.
            unsubscribe()
            del self._jobs[job_id]
            if not job.ended:
                self.scheduler.cancel(job, Cancelled("the client disconnected"))

    def _message(self, job, kind: str):
        if kind == "started":
            return m.Started(job.started, job.projection)
        if kind == "step":
            x0 = job.x0
            return m.Step(job.step, job.steps, self.scheduler.eta(job), None if x0 is None else x0.cpu())
        if kind == "done":
            return m.Done(job.result, job.infotexts, job.finished or time.time())
        if kind == "failed":
            return m.Failed(job.error, job.finished or time.time())
        if kind == "cancelled":
            return m.Cancelled(job.error, job.finished or time.time())
        return None                           # queued: Accepted said so

    def stop_early(self, job_id: str) -> bool:
        """End the job at its next step with its current image (A1111 interrupt/skip); False if not ours."""
        job = self._jobs.get(job_id)
        if job is None:
            return False
        job.stop_early = True
        return True

    async def check(self, model: str | None, request: GenerationRequest):
        try:
            return await asyncio.to_thread(self.scheduler.check, model, request)
        except FastLDMError as e:
            return m.Refused(e)

    async def load(self, model: str | None):
        try:
            name = await asyncio.to_thread(self.scheduler.load, model)
        except FastLDMError as e:
            return m.Refused(e)
        return m.ModelInfo(name, self.scheduler.model_hashes()[name])

    def close(self) -> None:
        self.scheduler.close(wait_s=0.0)
