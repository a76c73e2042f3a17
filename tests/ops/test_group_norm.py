"""Triton GroupNorm(+SiLU) against the reference: one-pass and split paths, both layouts, three dtypes."""
from __future__ import annotations

import pytest
import torch

from fastldm import ops
from fastldm.ops import reference

group_norm_kernel = pytest.importorskip("fastldm.ops.triton.group_norm")

FP32_FLOOR = 1e-5  # outputs are O(1) after normalization: ~100 fp32 ulps of slack for summation order


def inputs(shape, groups, dtype, channels_last, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 2  # an offset mean exercises the variance computation
    w, b = 1 + 0.2 * torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    x, w, b = (t.to(device, dtype) for t in (x, w, b))
    return x.to(memory_format=torch.channels_last) if channels_last else x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("tile", [4096, 32], ids=["one_pass", "split"])
def test_matches_reference(device, close, dtype, channels_last, act, tile):
    # 12 channels in 4 groups: 3 channels per group (block 4), 5x7 pixels: nothing is a block multiple.
    x, w, b = inputs((2, 12, 5, 7), 4, dtype, channels_last, device, seed=0)
    out = torch.full_like(x, float("nan"))
    y = group_norm_kernel.group_norm(x, 4, w, b, 1e-5, act, out=out, tile=tile)
    assert y is out and y.stride() == x.stride()
    ref = reference.group_norm(x.double(), 4, w.double(), b.double(), 1e-5, act)
    close(y, ref, reference.group_norm(x, 4, w, b, 1e-5, act), FP32_FLOOR if dtype == torch.float32 else 0.0)


def test_split_partials_combine_many_chunks(device, close):
    # 40 channels in 2 groups (20 per group, block 32) over 9x9 pixels, tile 64: 41 chunks per group.
    x, w, b = inputs((1, 40, 9, 9), 2, torch.float32, True, device, seed=3)
    y = group_norm_kernel.group_norm(x, 2, w, b, 1e-6, "silu", tile=64)
    ref = reference.group_norm(x.double(), 2, w.double(), b.double(), 1e-6, "silu")
    close(y, ref, reference.group_norm(x, 2, w, b, 1e-6, "silu"), FP32_FLOOR)


def test_through_registry_without_affine(device, close):
    x, _, _ = inputs((2, 16, 4, 4), 8, torch.float16, False, device, seed=4)
    with ops.use(group_norm="triton"):
        y = ops.group_norm(x, 8, None, None, 1e-5)
    close(y, reference.group_norm(x.double(), 8, None, None, 1e-5), reference.group_norm(x, 8, None, None, 1e-5))


def test_supports_states_limits(device):
    x = torch.randn(2, 12, 4, 4, device=device)
    assert group_norm_kernel.supports(x, 5, None, None, 1e-5) == "12 channels do not split into 5 groups"
    assert "activation" in group_norm_kernel.supports(x, 4, None, None, 1e-5, act="gelu")
    assert "contiguous" in group_norm_kernel.supports(x[:, :, :, :2], 4, None, None, 1e-5)
    assert group_norm_kernel.supports(x, 4, None, None, 1e-5, act="silu") is None
