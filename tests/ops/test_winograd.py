"""Winograd F(4x4, 3x3): the algorithm (exact in float64), its larger rounding error, the weight cache,
and the Triton transforms."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastldm.ops import registry, winograd


def conv_inputs(B, C, K, H, W, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    w = torch.randn(K, C, 3, 3, generator=g) / (3 * C ** 0.5)  # unit-variance outputs
    b = 0.1 * torch.randn(K, generator=g)
    return x.to(device, dtype), w.to(device, dtype), b.to(device, dtype)


def test_transforms_compute_a_tile_exactly():
    g = torch.Generator().manual_seed(0)
    d, k = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64)
    u = winograd.G @ k @ winograd.G.T
    v = winograd.BT @ d @ winograd.BT.T
    y = winograd.AT @ (u * v) @ winograd.AT.T  # (4, 4)
    direct = F.conv2d(d[None, None], k[None, None])[0, 0]  # (4, 4): the valid correlation
    torch.testing.assert_close(y, direct, rtol=0, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("hw", [(8, 8), (7, 13), (1, 5)])  # full tiles, partial tiles, a single row
def test_matches_conv2d_in_float64(channels_last, hw):
    x, w, b = conv_inputs(2, 5, 6, *hw, torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = winograd.conv2d(x, w, b, 1, 1)
        y_nobias = winograd.conv2d(x, w, None, 1, 1)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(y, F.conv2d(x, w, b, padding=1), rtol=0, atol=1e-12)  # exact up to rounding
    torch.testing.assert_close(y_nobias, F.conv2d(x, w, None, padding=1), rtol=0, atol=1e-12)


# Observed max|winograd − ref| / max|F.conv2d − ref| (ref in float64), C = 8..128, 4 seeds each:
# fp32 5-36x (~1e-5 of max|y|), fp16 24-53x (~1% of max|y|), bf16 23-55x (~10% of max|y|). The
# transforms' coefficients (up to 5 in Bᵀ, 8 in Aᵀ, fractions in G) amplify each rounding of U, V and M.
# The bounds below hold that observation with margin, and check the loss is real (> 2x).
@pytest.mark.parametrize("dtype,factor,rel", [(torch.float32, 64, 2e-5), (torch.bfloat16, 96, 0.15),
                                              (torch.float16, 96, 0.02)])
def test_error_is_larger_than_direct_conv_but_bounded(dtype, factor, rel):
    x, w, b = conv_inputs(2, 32, 32, 11, 13, dtype)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    with torch.no_grad():
        err = (winograd.conv2d(x, w, b, 1, 1).double() - ref).abs().max().item()
    direct = (F.conv2d(x, w, b, padding=1).double() - ref).abs().max().item()
    assert 2 * direct < err <= factor * direct
    assert err <= rel * ref.abs().max().item()


def test_weight_cache_follows_identity_version_and_lifetime():
    cache = winograd.TransformedWeights()
    w = torch.randn(4, 3, 3, 3)
    u = cache.get(w)
    assert u.shape == (36, 4, 3) and cache.get(w) is u  # computed once
    w.add_(1.0)  # in-place edit: the version counter moves, the entry is stale
    u2 = cache.get(w)
    assert u2 is not u
    torch.testing.assert_close(u2, winograd.transform_weight(w))
    same_values = w.clone()
    assert cache.get(same_values) is not u2  # another tensor is another entry, whatever its values
    del w, same_values
    gc.collect()
    assert cache.nbytes == 0  # entries go with their weights


def test_weight_cache_is_bounded():
    ws = [torch.randn(8, 8, 3, 3) for _ in range(4)]
    one = 36 * 8 * 8 * 4
    cache = winograd.TransformedWeights(max_bytes=2 * one)
    us = [cache.get(w) for w in ws]
    assert cache.nbytes == 2 * one
    assert cache.get(ws[3]) is us[3] and cache.get(ws[0]) is not us[0]  # LRU: the oldest were evicted


def test_prepare_transforms_eligible_convs_only():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    with registry.using(registry.Kernels()):                 # a selection of its own: an empty cache
        assert winograd.prepare(model) == 36 * 8 * 4 * 4
        assert winograd.weights().get(model[0].weight) is winograd.weights().get(model[0].weight)
    assert winograd.weights().nbytes == 0                    # the default selection's cache was not touched


def test_supports_states_limits():
    x, w, b = conv_inputs(1, 4, 4, 8, 8, torch.float32)
    assert winograd.supports(x, w, b, 1, 1) is None
    assert "stride 1" in winograd.supports(x, w, b, 2, 1)
    assert "padding 1" in winograd.supports(x, w, b, 1, 0)
    assert "3x3" in winograd.supports(x, w[:, :, :1, :1], b, 1, 0)
    assert "grouped" in winograd.supports(x, w[:, :2], b, 1, 1)
    assert "inference-only" in winograd.supports(x, w.requires_grad_(), b, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_transforms(device, dtype, channels_last):
    triton_winograd = pytest.importorskip("fastldm.ops.triton.winograd")
    from fastldm.ops.triton.device import INTERPRET
    x, w, b = conv_inputs(2, 16, 8, 9, 6, dtype, seed=1, device=device)  # 9x6: partial tiles both ways
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = torch.full((2, 8, 9, 6), float("nan"), device=device, dtype=dtype)
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert triton_winograd.conv2d(x, w, b, 1, 1, out=out) is out
        torch_winograd = winograd.conv2d(x, w, b, 1, 1)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    # Same algorithm, with the transforms in fp32: within 2x the plain-PyTorch Winograd's error
    # (plus 1e-5 for fp32 summation order, and under the interpreter one bf16 ulp of max|y| lost to its
    # truncating fp32 -> bf16 cast).
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    bound = 2 * (torch_winograd.double() - ref).abs().max().item() + 1e-5
    if dtype == torch.bfloat16 and INTERPRET:
        bound += torch.finfo(dtype).eps * 2 ** ref.abs().max().log2().floor().item()
    assert err <= bound
