"""DeepCache (fastldm.runtime.deep_cache.DeepCache, a UNet executor): interval 1 is the plain UNet bit
for bit, interval N runs the deep path once every N calls, and a cached call on the same input as the full call
reproduces the full output (the shallow path is the UNet's own last layers on the stored features)."""
from __future__ import annotations

import pytest
import torch

from conftest import UNET_CASES, randomize_
from fastldm.runtime.deep_cache import DeepCache
from fastldm.config import UNetConfig
from fastldm.models import UNet2DConditionModel


pytestmark = pytest.mark.usefixtures("one_thread")


def _unet(case="sd1"):
    return randomize_(UNet2DConditionModel(UNetConfig.from_diffusers(UNET_CASES[case])).eval(), 0, std=0.08)


def _inputs(case="sd1", batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.rand(batch, generator=g) * 999
    return x, t, torch.randn(batch, 7, UNET_CASES[case]["cross_attention_dim"], generator=g)


def _count_calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda m, a, o: calls.append(1))


@torch.no_grad()
def test_interval_one_is_bit_identical():
    unet = _unet()
    cache = DeepCache(unet, interval=1)
    for seed in range(2):
        x, t, ctx = _inputs(seed=seed)
        assert torch.equal(cache(x, t, ctx), unet(x, t, ctx))
    assert cache.full_calls == 2 and cache.cached_calls == 0


@torch.no_grad()
@pytest.mark.parametrize("interval", [3])
def test_deep_path_runs_every_interval_calls(interval):
    unet = _unet()
    cache = DeepCache(unet, interval=interval)
    deep, h1 = _count_calls(unet.mid_block)
    second, h2 = _count_calls(unet.down_blocks[1])
    try:
        for seed in range(7):
            cache(*_inputs(seed=seed))
    finally:
        h1.remove(), h2.remove()
    full = len(range(0, 7, interval))       # calls 0, N, 2N, ...
    assert len(deep) == len(second) == full
    assert (cache.full_calls, cache.cached_calls) == (full, 7 - full)


@torch.no_grad()
@pytest.mark.parametrize("case,branch", [("sd1", 0), ("sd1", 1), ("sd1", 2), ("sdxl", 1)])
def test_cached_call_on_same_input_reproduces_full_output(case, branch):
    # The shallow path recomputes conv_in, the first `branch` down layers and the last up layers from the stored
    # features: on the input that produced them, it is the full UNet. 1e-6 absolute: the same float ops.
    unet = _unet(case)
    cache = DeepCache(unet, interval=2, branch=branch)
    x, t, ctx = _inputs(case)
    extra = {}
    if case == "sdxl":
        extra = dict(text_embeds=torch.randn(2, 16), time_ids=torch.tensor([[64.0, 48, 0, 0, 64, 48]]).repeat(2, 1))
    full = cache(x, t, ctx, **extra)
    cached = cache(x, t, ctx, **extra)
    assert cache.cached_calls == 1
    assert (cached - full).abs().max() <= 1e-6
    other = cache(x, t + 100, ctx, **extra)    # a full call again (interval 2), new timestep
    assert cache.full_calls == 2 and not torch.allclose(other, full)


@torch.no_grad()
def test_new_batch_size_forces_full_call_and_bad_branch_fails():
    unet = _unet()
    cache = DeepCache(unet, interval=5)
    cache(*_inputs(batch=2))
    cache(*_inputs(batch=1))            # the stored features are for 2 images: recompute
    assert cache.full_calls == 2
    with pytest.raises(ValueError, match="too deep"):
        DeepCache(unet, interval=2, branch=3)   # the last up block has 3 layers: branch 0..2
    with pytest.raises(ValueError, match="at least 1"):
        DeepCache(unet, interval=0)
