"""The one run loop (fastldm.run): requests batched together give the images they give alone, a request can join
a running batch between steps and leave when its own steps are done, and one failing request ends alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastldm
from fastldm.errors import Cancelled, MemoryBudgetError
from fastldm.request import GenerationRequest
from fastldm.run import BatchedRun, run

pytestmark = pytest.mark.usefixtures("one_thread")

# fp32. A batch changes only the row count of the UNet's matrix products, which can change their blocking and
# so the rounding of the sums: observed max |Δ| 0 to 2.7e-6 on decoded images in [0, 1] and identical 8-bit
# PNGs (embedded model, 1 thread, AMD EPYC AVX2); the bound is one 8-bit level, the "same image".
BOUND = 1 / 255


@pytest.fixture(scope="module")
def pipe():
    return fastldm.load(fastldm.default_model(), dtype="fp32")


REQUESTS = [
    GenerationRequest("a red cube on the left", steps=6, seed=1),
    GenerationRequest("a small blue sphere", negative_prompt="a red cube", steps=9, seed=7, guidance=3.0, n=2),
    GenerationRequest("a green cylinder in front of a yellow cube", steps=4, seed=3, sampler="Euler a"),
    GenerationRequest("a yellow sphere on the right", steps=12, seed=5, early_stop=0.05),
    GenerationRequest("a large grey cube", steps=5, seed=11, guidance=1.0),
]


@pytest.fixture(scope="module")
def alone(pipe):
    return [pipe.generate(r) for r in REQUESTS]


def _max_diff(a, b) -> float:
    return float(np.abs(a.raw - b.raw).max())


def test_batched_equals_alone(pipe, alone):
    batched = pipe.generate_many(REQUESTS)
    for a, b in zip(alone, batched):
        assert b.seeds == a.seeds and b.steps == a.steps
        assert _max_diff(a, b) <= BOUND


def test_requests_share_unet_calls(pipe):
    """Compatible requests run as one UNet batch: 2 requests of 4 steps take 4 UNet calls, not 8."""
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        pipe.generate_many([GenerationRequest("a red cube", steps=4, seed=s) for s in (1, 2)])
    finally:
        handle.remove()
    assert calls == [4] * 4          # [uncond; cond] of two requests


def test_join_between_steps_and_leave_when_done(pipe, alone):
    batch = BatchedRun(pipe)
    plans = [pipe.plan(r) for r in REQUESTS]
    first = batch.add(plans[1])              # 9 steps
    for _ in range(3):
        assert batch.step() == []
    late = batch.add(plans[0])               # joins at step 4 of the first; needs 6
    ended = []
    while batch.jobs:
        ended += batch.step()
    assert ended == [first, late] and first.steps_run == 9 and late.steps_run == 6   # the first left first
    assert _max_diff(first.result, alone[1]) <= BOUND and _max_diff(late.result, alone[0]) <= BOUND


def test_different_sizes_share_a_run(pipe):
    small = GenerationRequest("a red cube", steps=3, seed=1, width=32, height=32)
    wide = GenerationRequest("a red cube", steps=3, seed=1, width=64, height=32)
    a, b = pipe.generate_many([small, wide])
    assert a.images[0].size == (32, 32) and b.images[0].size == (64, 32)
    assert _max_diff(a, pipe.generate(small)) <= BOUND


def test_cancel_one_job(pipe, alone):
    batch = BatchedRun(pipe)
    keep, drop = batch.add(pipe.plan(REQUESTS[0])), batch.add(pipe.plan(REQUESTS[2]))
    batch.step()
    batch.cancel(drop)
    while batch.jobs:
        batch.step()
    assert isinstance(drop.error, Cancelled) and drop.result is None
    assert _max_diff(keep.result, alone[0]) <= BOUND


def test_a_failing_request_ends_alone(pipe, alone):
    def broken(info):
        if info["i"] == 1:
            raise RuntimeError("callback bug")

    batch = BatchedRun(pipe)
    bad, good = batch.add(pipe.plan(REQUESTS[0]), broken), batch.add(pipe.plan(REQUESTS[0]))
    while batch.jobs:
        batch.step()
    assert isinstance(bad.error, RuntimeError) and str(bad.error) == "callback bug"   # a bug keeps its type
    assert _max_diff(good.result, alone[0]) <= BOUND
    with pytest.raises(RuntimeError, match="callback bug"):
        run(pipe, [pipe.plan(REQUESTS[0])], [broken])


def test_out_of_memory_ends_the_request_with_a_clear_error(pipe, monkeypatch):
    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 99999999999 bytes")

    monkeypatch.setattr(pipe.unet_runtime, "executor", lambda kind, interval=1: oom)
    with pytest.raises(MemoryBudgetError, match="ran out of memory during the run"):
        pipe.generate("a red cube", steps=2, seed=0)
    monkeypatch.undo()
    assert pipe.generate("a red cube", steps=2, seed=0).images   # and the pipeline still works


def test_deep_cache_requests_get_their_own_executor(pipe):
    batch = BatchedRun(pipe)
    a = batch.add(pipe.plan(GenerationRequest("a red cube", steps=4, seed=1, cache_interval=2)))
    b = batch.add(pipe.plan(GenerationRequest("a red cube", steps=4, seed=1, cache_interval=2)))
    c = batch.add(pipe.plan(GenerationRequest("a red cube", steps=4, seed=1)))
    assert a.executor is not b.executor and c.executor is pipe.unet
    while batch.jobs:
        batch.step()
    assert a.executor.full_calls == 2 and a.executor.cached_calls == 2
    assert np.array_equal(a.result.raw, b.result.raw)


def test_plan_is_complete_and_immutable(pipe):
    plan = pipe.plan(GenerationRequest("a red cube", steps=10, seed=None, strength=0.5))
    assert plan.seeds and plan.guidance == pipe.config.default_guidance and plan.executor == "eager"
    assert plan.width == plan.height == pipe.config.default_size and plan.denoising_steps == 10
    with pytest.raises(Exception):
        plan.steps = 3
    again = run(pipe, [plan])[0]
    assert np.array_equal(again.raw, run(pipe, [plan])[0].raw)   # the random seed was fixed by the plan
    assert torch.is_tensor(again.latents)
