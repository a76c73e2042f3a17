"""Bulk generation on a Ray cluster: the batch engine (tools/batch.py) as a Ray Data actor pool.

`ds.map_batches(Renderer, compute=ActorPoolStrategy(size=workers), num_cpus=C, batch_size=B)` (Ray Data's
offline batch inference pattern): each actor sets its own process up (`configure_process`, C threads), loads
the model once, and runs every block of B items it is handed through the same `render` as the local engine.
Results stream back to the driver block by block as they finish (the order is not kept), and the driver's
`Batch` writes the files and the manifest, so resume works exactly as in one process. An actor that dies (a
node lost, Ray's memory monitor) is restarted by Ray Data and its block run again; if the driver dies, the
manifest says what is done.

Why the driver writes: on a cluster of several machines the workers' disks are not the driver's, and a shared
file system cannot be assumed; an image is a few hundred KB of PNG against seconds of sampling, so carrying it
through Ray's object store costs little, and one writer keeps the manifest and its lock simple. The model path
must exist on every node (the embedded model ships in the package; install fastldm on every node).
"""
from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import BackendUnavailable
from ..loading.load import read_config
from .batch import Engine, Item, Outcome, render

LOCAL_OBJECT_STORE = 256 << 20   # bytes; a local instance's object store (Ray's default takes 30 % of RAM)
INSTALL = 'Ray is not installed: pip install "fastldm[ray]"'


def require_ray():
    """The `ray` module with Ray Data, or BackendUnavailable saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BackendUnavailable(INSTALL) from None
    return ray


def connect(ray, address: str | None, cpus: float, gpus: float = 0) -> bool:
    """Join the cluster at `address` ("auto", HOST:PORT, ray://...), or with None start a local instance on this
    machine bounded to `cpus` CPUs and LOCAL_OBJECT_STORE bytes, without the dashboard. Returns whether this call
    connected (the caller then shuts down). Ray (2.60) gives a local node the machine's own address, not
    127.0.0.1, and its servers listen on every interface; its token authentication (on by default) guards them."""
    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, logging_level="warning")
    else:
        ray.init(num_cpus=cpus, num_gpus=gpus, object_store_memory=LOCAL_OBJECT_STORE, include_dashboard=False,
                 logging_level="warning")
    return True


class Renderer:
    """A Ray Data actor: one process, one model, `render` over each block of items handed to it."""

    def __init__(self, model: str, load_options: Mapping[str, Any], threads: int, batch: int):
        from ..api import load
        from ..runtime.device import configure_process

        configure_process(threads)   # this actor owns its process
        self.pipe, self.batch = load(model, **load_options), batch
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, rows: dict) -> "pyarrow.Table":   # rows: {"line": (B,), "request": (B,) JSON text}
        import pyarrow as pa

        items = [Item(int(line), json.loads(request)) for line, request in zip(rows["line"], rows["request"])]
        outcomes = list(render(self.pipe, items, self.batch, self.worker))
        return pa.table({
            "line": pa.array([o.line for o in outcomes], pa.int64()),
            "record": pa.array([json.dumps(_record(o)) for o in outcomes], pa.string()),
            "names": pa.array([list(o.files) for o in outcomes], pa.list_(pa.string())),
            "blobs": pa.array([list(o.files.values()) for o in outcomes], pa.list_(pa.large_binary())),
        })


def _record(outcome: Outcome) -> dict:
    return {"seeds": outcome.seeds, "steps": outcome.steps, "seconds": outcome.seconds, "worker": outcome.worker,
            "error": outcome.error}


def _outcome(row: Mapping[str, Any]) -> Outcome:
    return Outcome(int(row["line"]), dict(zip(row["names"], row["blobs"])), **json.loads(row["record"]))


def engine(model: str | Path, load_options: Mapping[str, Any] | None = None, *, workers: int = 2,
           cpus_per_worker: float = 1, gpus_per_worker: float = 0, batch: int = 8, address: str | None = None,
           actor: type = Renderer) -> Engine:
    """An Engine that renders on Ray: `workers` actors of `cpus_per_worker` CPUs (and `gpus_per_worker` GPUs),
    each with `batch` images in flight. Ray is started (or joined, `address`) only when there is work. `actor`:
    the actor class, built and called as Renderer is (benchmarks/batch_scale.py swaps in one without a model)."""
    ray = require_ray()

    def run(items: list[Item]) -> Iterator[Outcome]:
        if not items:
            return
        if address is None:   # the actors will run here: a bad model path is one error now, not each actor's
            read_config(model)
        ours = connect(ray, address, workers * cpus_per_worker, workers * gpus_per_worker)
        try:
            # One block per actor call: its results come back when it ends (Ray Data's default, at least 200
            # blocks, would return them only per block of len(items) / 200 requests).
            ds = ray.data.from_items([{"line": item.line, "request": json.dumps(item.request)} for item in items],
                                     override_num_blocks=math.ceil(len(items) / batch))
            ds.context.enable_progress_bars = False      # the caller shows progress per result
            ds = ds.map_batches(actor, batch_size=batch, compute=ray.data.ActorPoolStrategy(size=workers),
                                num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None,
                                fn_constructor_kwargs=dict(model=str(model), load_options=dict(load_options or {}),
                                                           threads=max(1, int(cpus_per_worker)), batch=batch))
            for row in ds.iter_rows():
                yield _outcome(row)
        finally:
            if ours:
                ray.shutdown()
    return run
