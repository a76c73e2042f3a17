"""`fastldm serve --ray`: the server as a Ray Serve application of two deployments (imports Ray; ray_server.py
checks that it is installed first).

    HTTP          the ingress: the same FastAPI app (create_app) on a RemoteScheduler; one replica (the A1111
                  API's global state, progress and the current model, lives in it), no CPU
                  reserved (it plans nothing and decodes nothing: it parses, waits, encodes PNGs)
    ModelWorker   model_worker.ModelWorker: owns the pipelines and the step-level batching; N replicas, or
                  autoscaled between MIN and MAX on the jobs in flight per replica, each reserving C CPUs
                  (and its torch threads) and G GPUs

Serve's HTTP proxy forwards every request to HTTP; HTTP calls ModelWorker through a DeploymentHandle:
`run` as a stream (Serve's default routing: the less busy of two replicas), and `stop_early` to the replica
that owns the job. Serve's handles route by load, not by owner, so JobOwnerRouter reads the owner from the job
id, sent as the request's session id; calls without one go to the less busy of two random replicas, as Serve's
default router does.

A replica that dies (its process killed, its node lost) is replaced by Serve's controller; the streams of its
jobs raise RayActorError in HTTP, which fails those jobs with WorkerLost (503, "send it again") instead of
leaving their clients waiting. Routing stops choosing the dead replica once Serve notices, so the next request
goes to a live one.
"""
from __future__ import annotations

import random

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, RequestRouter

from ..errors import WorkerLost
from ..runtime.device import configure_process
from .app import create_app
from .model_worker import ModelWorker
from .remote_scheduler import RemoteScheduler
from .settings import Settings

HEADROOM = 16   # calls a worker replica accepts beyond its queue and batch: stop_early, check, load


class JobOwnerRouter(FIFOMixin, RequestRouter):
    """Routes a call whose session id is a job id ("<replica>.<job>") to that replica while it is up; any other
    call to the less loaded of two random replicas."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        session = pending_request.metadata.session_id if pending_request is not None else ""
        owner = [r for r in candidate_replicas if session and r.replica_id.unique_id == session.split(".")[0]]
        if owner:
            return [owner]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]


@serve.deployment(name="ModelWorker", graceful_shutdown_timeout_s=5)
class WorkerDeployment:
    def __init__(self, settings: Settings, threads: int):
        configure_process(threads)   # a replica owns its process
        self.worker = ModelWorker(settings, serve.get_replica_context().replica_id.unique_id)

    async def run(self, model, request):
        async for message in self.worker.run(model, request):
            yield message

    def stop_early(self, job_id: str) -> bool:
        return self.worker.stop_early(job_id)

    async def check(self, model, request):
        return await self.worker.check(model, request)

    async def load(self, model):
        return await self.worker.load(model)

    def __del__(self):   # Serve's graceful shutdown: answer the jobs in flight (ShuttingDown) rather than drop them
        if hasattr(self, "worker"):
            self.worker.close()


@serve.deployment(name="HTTP", graceful_shutdown_timeout_s=5)
@serve.ingress()
class Ingress:
    def __init__(self, settings: Settings, worker):
        self.settings, self.worker = settings, worker

    def __serve_build_asgi_app__(self):
        self.scheduler = RemoteScheduler(self.settings, RayClient(self.worker))
        return create_app(self.settings, scheduler=self.scheduler)

    def close(self) -> None:
        """Cancel the jobs in flight, answering their clients (ShuttingDown, 503) before Serve drains this replica
        (ray_server.py calls it on Ctrl-C; Serve's drain alone would cut the waiting clients off)."""
        self.scheduler.close()


class RayClient:
    """RemoteScheduler's transport over the ModelWorker deployment's handle (blocking calls: HTTP's thread pool
    and the job threads make them, never its event loop)."""

    def __init__(self, handle):
        self.handle = handle

    def run(self, model, request) -> RayStream:
        return RayStream(self.handle.options(stream=True).run.remote(model, request))

    def stop_early(self, job_id: str) -> bool:
        return _answer(self.handle.options(session_id=job_id).stop_early.remote(job_id))

    def check(self, model, request):
        return _answer(self.handle.check.remote(model, request))

    def load(self, model):
        return _answer(self.handle.load.remote(model))


class RayStream:
    """A job's messages from its replica; a replica lost on the way is WorkerLost."""

    def __init__(self, response):
        self.response = response

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.response)
        except RayActorError as e:
            raise lost(e) from None

    def cancel(self) -> None:
        self.response.cancel()


def _answer(response):
    try:
        return response.result()
    except RayActorError as e:
        raise lost(e) from None


def lost(e: RayActorError) -> WorkerLost:
    return WorkerLost("the model worker running this request stopped (its Ray Serve replica died: "
                      f"{type(e).__name__}); Ray starts a replacement, send the request again")


def application(settings: Settings, replicas: int = 1, autoscale: tuple[int, int] | None = None,
                cpus_per_replica: float = 1, gpus_per_replica: float = 0):
    """The bound Serve application: HTTP in front of ModelWorker with `replicas` replicas, or autoscaled within
    `autoscale` = (min, max), aiming at `max_batch` jobs in flight per replica (what one batched step takes)."""
    in_flight = settings.max_queue + settings.max_batch
    scale = {"num_replicas": replicas} if autoscale is None else {"autoscaling_config": {
        "min_replicas": autoscale[0], "max_replicas": autoscale[1], "target_ongoing_requests": settings.max_batch}}
    worker = WorkerDeployment.options(
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        max_ongoing_requests=in_flight + HEADROOM, max_queued_requests=-1,
        request_router_config=RequestRouterConfig(request_router_class=JobOwnerRouter), **scale,
    ).bind(settings, max(1, int(cpus_per_replica)))
    # Every client of every replica waits in HTTP: its limit is all the workers' queues and batches.
    most = replicas if autoscale is None else autoscale[1]
    return Ingress.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=most * in_flight + HEADROOM
                           ).bind(settings, worker)
