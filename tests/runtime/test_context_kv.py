"""The text's keys and values kept across a generation's steps (runtime/context_kv.py): the same numbers as
computing them at every step, used only for the very context tensor they were computed from."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import fastldm
from fastldm.models.layers import Attention
from fastldm.request import GenerationRequest
from fastldm.run import BatchedRun
from fastldm.runtime.context_kv import ContextKV, current


def _layer_and_inputs(seed: int = 0):
    torch.manual_seed(seed)
    attn = Attention(32, heads=4, context_dim=16).requires_grad_(False)
    return attn, torch.randn(2, 9, 32), torch.randn(2, 5, 16)


def test_a_cross_attention_reuses_its_keys_for_the_same_context_only():
    attn, x, ctx = _layer_and_inputs()
    with torch.inference_mode():
        ref = attn(x, ctx)
        kv = ContextKV()
        with kv.active():
            first, second = attn(x, ctx), attn(x + 1, ctx)   # computed, then reused
            other = attn(x, ctx.clone())                     # equal values, another tensor: computed afresh
        assert kv.hits == 1 and len(kv.kv) == 1
        assert torch.equal(first, ref) and torch.equal(other, ref)
        assert torch.equal(second, attn(x + 1, ctx))        # the same keys and values as computing them again
    assert current() is None


def test_inactive_with_autograd_and_per_thread():
    attn, x, ctx = _layer_and_inputs(1)
    kv = ContextKV()
    with kv.active():
        with torch.enable_grad():
            assert current() is None                        # training / autograd: never cached
        seen = []
        t = threading.Thread(target=lambda: seen.append(current()))
        t.start()
        t.join()
        assert seen == [None]                               # another thread has its own (no) generation
        with torch.inference_mode():
            assert current() is kv


@pytest.fixture(scope="module")
def pipe():
    return fastldm.load(fastldm.default_model(), dtype="fp32")


def test_a_generation_computes_the_text_keys_once_and_draws_the_same_image(pipe, monkeypatch):
    request = GenerationRequest("a red cube on the left", steps=5, seed=3)
    run = BatchedRun(pipe)
    job = run.add(pipe.plan(request))
    while run.jobs:
        run.step()
    layers = sum(isinstance(m, Attention) for m in pipe.unet.modules()) // 2   # attn1 and attn2 per block
    assert job.context_kv is not None and len(job.context_kv.kv) == layers
    assert job.context_kv.hits == (job.steps_run - 1) * layers    # every step after the first
    monkeypatch.setattr("fastldm.run.ContextKV", lambda: None)
    plain = pipe.generate(request)
    assert np.array_equal(job.result.raw, plain.raw)


def test_batched_jobs_and_memory_budgets_compute_as_before(pipe, tmp_path):
    requests = [GenerationRequest("a red cube", steps=3, seed=s) for s in (1, 2)]
    run = BatchedRun(pipe)
    jobs = [run.add(pipe.plan(r)) for r in requests]
    while run.jobs:
        run.step()
    assert all(j.context_kv.hits == 0 for j in jobs)              # one UNet batch: a new context every step
    low = fastldm.load(fastldm.default_model(), dtype="fp32", memory="low")
    assert BatchedRun(low).add(low.plan(requests[0])).context_kv is None


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl", "ldm3d", "lcm"])
def test_every_family_draws_the_same_with_the_keys_kept(tmp_path, monkeypatch, family):
    """SDXL's two text encoders and added conditioning, LDM3D's RGBD output, v-prediction, LCM's guidance
    embedding (no CFG batch), an img2img start: the kept keys and values give bitwise the same output."""
    from fastldm.testing import save_random_folder

    save_random_folder(f"tiny:{family}", tmp_path / "m", dtype=torch.float32)
    pipe = fastldm.load(tmp_path / "m", dtype="fp32")
    kw = {"prompt": "a red cube", "steps": 4, "seed": 3, "width": 24, "height": 16, "n": 2}
    made = []
    monkeypatch.setattr("fastldm.run.ContextKV", lambda: made.append(ContextKV()) or made[-1])
    kept = pipe.generate(**kw)
    init = kept.images[0]
    again = pipe.generate(**kw | {"init_image": init, "strength": 0.6, "n": 1})
    assert len(made) == 2 and all(kv.hits > 0 for kv in made)
    monkeypatch.setattr("fastldm.run.ContextKV", lambda: None)
    assert np.array_equal(kept.raw, pipe.generate(**kw).raw)
    assert np.array_equal(again.raw, pipe.generate(**kw | {"init_image": init, "strength": 0.6, "n": 1}).raw)
