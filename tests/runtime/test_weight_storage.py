"""16-bit weight storage widened per layer (runtime/weight_storage.py) computes exactly what fp32 computes on the
16-bit-rounded weights, layer by layer and in slices."""
from __future__ import annotations

import copy

import pytest
import torch

from fastldm.runtime.weight_storage import (
    ChunkedConv2d,
    ChunkedLinear,
    store_16bit,
    stored_bytes,
)
from fastldm.testing import random_module, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _rounded(module):
    """A copy whose >= 2-D weights are rounded to fp16 and back (fp32 compute on the stored values)."""
    out = copy.deepcopy(module)
    for name, p in out.named_parameters():
        if name.endswith("weight") and p.dim() >= 2:
            p.data = p.data.half().float()
    return out


def _unet_call(unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10.0, 500.0]), ctx)


@pytest.mark.parametrize("max_widen", [None, 2000])
def test_widened_unet_equals_fp32_on_rounded_weights(max_widen):
    """max_widen=2000 sends every conv and linear above 2,000 weights through the chunked path (output-channel
    slices); conv_in (1,152), whose weight dtype the UNet reads, stays whole, as it does at full size."""
    unet = random_module("unet", tiny_config("sd1").unet).to(memory_format=torch.channels_last)
    want = _unet_call(_rounded(unet))
    before = stored_bytes(unet)
    store_16bit(unet, **({} if max_widen is None else {"max_widen": max_widen}))
    chunked = [m for m in unet.modules() if isinstance(m, (ChunkedConv2d, ChunkedLinear))]
    assert bool(chunked) == (max_widen is not None)
    got = _unet_call(unet)
    # The same fp32 arithmetic on the same values; slices can only change a GEMM's blocking.
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert stored_bytes(unet) < 0.6 * before
    assert unet.conv_in.weight.dtype == torch.float32          # what the model reads is widened


def test_widened_weight_reuses_one_buffer():
    unet = random_module("unet", tiny_config("sd1").unet)
    scratch = store_16bit(unet)
    _unet_call(unet)
    ptr = scratch.buffer.data_ptr()
    _unet_call(unet)
    assert scratch.buffer.data_ptr() == ptr                    # no allocation per layer or per call
    scratch.clear()
    assert scratch.buffer is None
