"""A RemoteScheduler transport to a ModelWorker in this process (the tests' stand-in for Ray Serve's handles):
the worker's coroutines run on an event loop thread of their own, and every argument, message and answer goes
through pickle, as it does between processes. `cut()` breaks every open stream as a lost worker does."""
from __future__ import annotations

import asyncio
import pickle
import queue
import threading

from fastldm.errors import WorkerLost

_END = object()


def _copy(value):
    return pickle.loads(pickle.dumps(value))


class InProcessClient:
    def __init__(self, worker):
        self.worker = worker
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.streams: list[Stream] = []

    def _call(self, coro):
        return _copy(asyncio.run_coroutine_threadsafe(coro, self.loop).result())

    def run(self, model, request) -> Stream:
        stream = Stream(self, *_copy((model, request)))
        self.streams.append(stream)
        return stream

    def stop_early(self, job_id: str) -> bool:
        return self.worker.stop_early(job_id)

    def check(self, model, request):
        return self._call(self.worker.check(*_copy((model, request))))

    def load(self, model):
        return self._call(self.worker.load(model))

    def cut(self) -> None:
        for stream in self.streams:
            stream.cut()

    def close(self) -> None:
        self.worker.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Stream:
    def __init__(self, client: InProcessClient, model, request):
        self.items: queue.Queue = queue.Queue()

        async def pump():
            try:
                async for message in client.worker.run(model, request):
                    self.items.put(pickle.dumps(message))
            except BaseException as e:     # cancelled by cancel() or cut()
                self.items.put(e)
            finally:
                self.items.put(_END)
        self.task = asyncio.run_coroutine_threadsafe(pump(), client.loop)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.items.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return pickle.loads(item)

    def cancel(self) -> None:
        self.task.cancel()

    def cut(self) -> None:
        self.items.put(WorkerLost("the model worker running this request stopped (cut by the test)"))
        self.task.cancel()
