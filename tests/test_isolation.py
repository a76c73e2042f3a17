"""No hidden process-global state: loading changes nothing outside the pipeline, and two pipelines with different
dtypes and different forced kernels run concurrently from two threads, each giving exactly its images alone."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

import fastldm
from fastldm.ops import registry
from fastldm.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")
REQUESTS = [GenerationRequest("a red cube on the left", steps=3, seed=s) for s in (1, 2)]


def _images(pipe) -> list[np.ndarray]:
    return [r.raw for r in (pipe.generate(q) for q in REQUESTS)]


def test_load_changes_nothing_outside_the_pipeline():
    threads, env = torch.get_num_threads(), dict(os.environ)
    pipe = fastldm.load(fastldm.default_model(), dtype="fp32", backends={"attention": "reference"})
    pipe.generate("a red cube", steps=2, seed=0)
    assert torch.get_num_threads() == threads and dict(os.environ) == env
    assert registry.active() == registry.Kernels()          # the caller's selection is untouched
    assert pipe.kernels.forced == {"attention": "reference"}


def test_two_pipelines_side_by_side_in_two_threads():
    model = fastldm.default_model()
    a = fastldm.load(model, dtype="fp32")
    # Winograd for the 3x3 convolutions (where it can run), its transformed weights in a's own cache
    a.kernels = registry.Kernels(preferred={("conv2d", "cpu", torch.float32): "winograd"})
    b = fastldm.load(model, dtype="bf16", backends={"attention": "reference"})   # auto would take "blocked"
    alone = {"a": _images(a), "b": _images(b)}
    plain = {"a": fastldm.load(model, dtype="fp32").generate(REQUESTS[0]).raw,
             "b": fastldm.load(model, dtype="bf16").generate(REQUESTS[0]).raw}
    for name in ("a", "b"):     # the settings really change the arithmetic
        assert not np.array_equal(plain[name], alone[name][0]), name

    together, errors = {}, []

    def worker(name, pipe):
        try:
            together[name] = [img for _ in range(2) for img in _images(pipe)]
        except Exception as e:  # surfaced below with the thread's name
            errors.append((name, e))

    workers = [threading.Thread(target=worker, args=item) for item in (("a", a), ("b", b))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    for name in ("a", "b"):
        for got, want in zip(together[name], alone[name] * 2):
            assert np.array_equal(got, want), name
    assert a.kernels.caches["winograd"].nbytes > 0 and "winograd" not in b.kernels.caches
