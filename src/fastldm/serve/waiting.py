"""Waiting for a job on behalf of a client that holds its connection open (A1111 and OpenAI routes).

The handler waits for whichever comes first: the job's end, or the client going away. ASGI servers report a
closed connection as an `http.disconnect` message on the request's receive channel, which (the body having been
read) has nothing else to deliver; so one task waiting on it is a free disconnect detector. A client that goes
away has its job cancelled: dropped from the queue, or removed from the batch at the next step.
"""
from __future__ import annotations

import asyncio

from fastapi import Request

from ..errors import Cancelled
from .jobs import ServeJob


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_for(job: ServeJob, request: Request, ctx) -> ServeJob:
    """`job` once ended, its error raised; cancels it if the client disconnects (or the handler is cancelled)."""
    ended = asyncio.ensure_future(job.until_done())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({ended, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (ended, gone):
            task.cancel()
        if not job.ended:
            ctx.metrics.disconnects.inc()
            ctx.scheduler.cancel(job, Cancelled("the client disconnected"))
    if job.error is not None:
        raise job.error
    return job
