"""A server job: one planned request on its way through a model's worker, seen from the HTTP side.

A job goes queued -> running -> done | failed | cancelled. The worker thread (scheduler.py) moves it along and
announces each change as an event; HTTP handlers (on the event loop) subscribe to the events of the jobs they
serve: a waiting A1111/OpenAI handler for the end, the jobs API's event stream for every step. Subscribers are
called in the thread that emits, so they hand over thread-safely (`until_done`, `events`).

Events (dicts, `event` names the kind): queued; started; step {step, steps}; done; failed {error}; cancelled
{error}. The last three end the job and its stream.

`JobStore` keeps the jobs of the async jobs API by id: unfinished ones always, finished ones for
`ttl_s` seconds and at most `count` of them (the oldest finished first out).
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch
from PIL import Image

from ..errors import UnknownJob
from ..plan import Plan
from ..run import GenerationResult
from .preview import LatentPreview, preview_image

ENDED = ("done", "failed", "cancelled")


@dataclass(eq=False)
class ServeJob:
    model: str
    plan: Plan
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "queued"
    step: int = 0                             # denoising steps done
    steps: int = 0                            # steps it will run (after "auto" and img2img strength)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: GenerationResult | None = None
    error: BaseException | None = None
    x0: torch.Tensor | None = None            # (C, h, w) the latest x0 estimate of image 0 (UNet latents)
    projection: LatentPreview | None = None   # the worker's latent -> RGB map for previews
    stop_early: bool = False                  # interrupt / skip: end at the next step with what is there
    cancel_with: BaseException | None = None  # set by another thread; the worker cancels the job before a step
    infotexts: list[str] = field(default_factory=list)   # A1111 `parameters` of each image, once done
    model_hash: str | None = None
    files: dict = field(default_factory=dict)  # encoded outputs by name, made once on demand (jobs API)
    _listeners: list[Callable[[dict], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.steps = self.plan.denoising_steps

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def images(self) -> int:
        return self.plan.n

    def preview(self) -> Image.Image | None:
        """The live preview of image 0 (its x0 estimate, projected without the VAE), or None before step 1."""
        x0, projection = self.x0, self.projection
        if x0 is None or projection is None or self.ended:
            return None
        return preview_image(projection.rgb(x0), self.plan.width, self.plan.height)

    def emit(self, event: str, **data) -> None:
        """Record `event` (its status change, if any) and tell the subscribers."""
        with self._lock:
            if self.ended:
                return
            if event in ("started", *ENDED):
                self.status = "running" if event == "started" else event
            if event == "started":
                self.started = time.time()
            if event in ENDED:
                self.finished = time.time()
            listeners = list(self._listeners)
        for fn in listeners:
            fn({"event": event, **data})

    def subscribe(self, fn: Callable[[dict], None]) -> Callable[[], None]:
        """Call `fn(event)` on every later event; if the job has already ended, once now with its end. Returns
        the unsubscribe function."""
        with self._lock:
            if not self.ended:
                self._listeners.append(fn)
                return lambda: self._unsubscribe(fn)
        fn({"event": self.status})
        return lambda: None

    def _unsubscribe(self, fn) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    async def until_done(self) -> None:
        """Wait (on the event loop) until the job has ended."""
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        def on_event(ev: dict) -> None:
            if ev["event"] in ENDED:
                loop.call_soon_threadsafe(lambda: ended.done() or ended.set_result(None))

        unsubscribe = self.subscribe(on_event)
        try:
            await ended
        finally:
            unsubscribe()

    async def events(self, keepalive_s: float | None = None) -> AsyncIterator[dict]:
        """The job's events from now on (starting with queued or started, as it is now), ending with its end; an
        {"event": "ping"} after each `keepalive_s` seconds without one."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict] = asyncio.Queue()
        unsubscribe = self.subscribe(lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        try:
            if not self.ended:
                yield {"event": "queued" if self.status == "queued" else "started"}
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), keepalive_s)
                except asyncio.TimeoutError:
                    yield {"event": "ping"}
                    continue
                if ev["event"] == "step" and not queue.empty():
                    continue            # a slow reader skips to the latest step
                yield ev
                if ev["event"] in ENDED:
                    return
        finally:
            unsubscribe()


class JobStore:
    """Jobs of the async API by id, with finished ones kept for a bounded time and count."""

    def __init__(self, ttl_s: float, count: int):
        self.ttl_s, self.count = ttl_s, count
        self._jobs: OrderedDict[str, ServeJob] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, job: ServeJob) -> None:
        with self._lock:
            self._jobs[job.id] = job
            self._prune()

    def get(self, job_id: str) -> ServeJob:
        with self._lock:
            self._prune()
            job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJob(job_id)
        return job

    def _prune(self) -> None:
        now = time.time()
        finished = [j for j in self._jobs.values() if j.ended]
        finished.sort(key=lambda j: j.finished)
        excess = len(finished) - self.count
        for i, j in enumerate(finished):
            if i < excess or now - j.finished > self.ttl_s:
                del self._jobs[j.id]
