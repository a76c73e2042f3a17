"""Winograd F(2×2, 3×3) in bf16 with C++ transforms (ops/winograd_f2_cpu.py): its transforms against a plain-PyTorch
F(2×2) that rounds where it does, and the convolution against an fp64 one beside oneDNN's bf16 convolution.

The first test to run builds the transforms (once per machine, ~10-30 s; native_build.py) unless a build is
cached; without a C++ toolchain these tests skip.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastldm.ops import winograd_f2_cpu

BT = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
AT = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64)


@pytest.fixture(scope="module", autouse=True)
def built():
    why = winograd_f2_cpu.unavailable()
    if why is not None:
        pytest.skip(why)


def _inputs(B, C, K, H, W, seed):
    """Post-SiLU bf16 activations (as a UNet's convolutions see them), weights N(0, 1/(9C)) and a bias."""
    g = torch.Generator().manual_seed(seed)
    x = F.silu(torch.randn(B, C, H, W, generator=g)).bfloat16()
    w = (torch.randn(K, C, 3, 3, generator=g) / (3 * C ** 0.5)).bfloat16()
    return x, w, (torch.randn(K, generator=g) * 0.1).bfloat16()


def _tiles(x):
    """Bᵀ d B in fp64 as (16, P, C), P the 2×2 output tiles of x (B, C, H, W) in (b, tile row, tile col) order."""
    B, C, H, W = x.shape
    d = F.pad(x.double(), (1, 1 + W % 2, 1, 1 + H % 2)).unfold(2, 4, 2).unfold(3, 4, 2)  # (B, C, h, w, 4, 4)
    return (BT @ d @ BT.T).permute(4, 5, 0, 2, 3, 1).reshape(16, -1, C)


def _reference(x, u, bias):
    """The same algorithm in plain PyTorch: V rounded to bf16, torch.bmm's bf16 products, Aᵀ M A + bias in fp64
    rounded once."""
    B, C, H, W = x.shape
    m = torch.bmm(_tiles(x).bfloat16(), u).double()  # (16, P, K)
    h, w = -(-H // 2), -(-W // 2)
    m = m.view(4, 4, B, h, w, -1)
    y = torch.einsum("ai,ijbhwk,cj->bkhawc", AT, m, AT).reshape(B, -1, 2 * h, 2 * w)[:, :, :H, :W]
    return (y + (0 if bias is None else bias.double()[:, None, None])).bfloat16()


# SD 1.5's shapes at a 256² image (CFG batch 2), then edges: odd sizes (partial tiles), one pixel, channel
# counts that are not whole vectors (32 bf16 lanes with AVX-512, 16 with AVX2), batch 3.
SHAPES = [(2, 320, 320, 32, 32), (2, 1280, 640, 16, 16), (1, 64, 64, 13, 7), (1, 3, 5, 1, 1), (2, 19, 9, 6, 10),
          (3, 33, 70, 5, 9)]


@pytest.mark.parametrize("B,C,K,H,W", SHAPES)
def test_the_input_transform_is_exact_up_to_its_rounding(B, C, K, H, W):
    x, _, _ = _inputs(B, C, K, H, W, seed=B * C + H)
    v = torch.ops.fastldm.winograd_f2_input(x.contiguous(memory_format=torch.channels_last))
    # Sums of four bf16 values are exact in fp32: each value is bf16(fp64 sum), bit for bit.
    assert v.dtype == torch.bfloat16 and torch.equal(v, _tiles(x).bfloat16())


@pytest.mark.parametrize("B,C,K,H,W", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_convolution_is_the_algorithm_and_close_to_fp64(B, C, K, H, W, with_bias):
    x, w, b = _inputs(B, C, K, H, W, seed=K + W)
    b = b if with_bias else None
    u = winograd_f2_cpu.transform_weight(w)
    assert u.shape == (16, C, K) and u.dtype == torch.bfloat16 and u.is_contiguous()
    with torch.inference_mode():
        y = winograd_f2_cpu.conv(x, u, b)
    assert y.shape == (B, K, H, W) and y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    # The algorithm: the C++ sums the nine products of a tile in fp32 where the reference sums in fp64; both
    # round once to bf16, so they differ by at most one bf16 step (2^-7 relative) where they differ at all.
    want = _reference(x, u, b).double()
    assert ((y.double() - want).abs() <= 2 ** -7 * want.abs() + 1e-6).all()
    # Against fp64: bf16 V, U and M cost 1.6-2.3× a bf16 direct convolution's error (its output rounding;
    # benchmarks/winograd_f2.py), 4-7e-3 of max|y|; bounded at 2.5× oneDNN's (+ one bf16 step) and 1e-2.
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    peak = ref.abs().max()
    err = (y.double() - ref).abs().max()
    direct = (F.conv2d(x, w, b, padding=1).double() - ref).abs().max()
    assert err <= 1e-2 * peak and err <= 2.5 * direct + 2 ** -8 * peak


def test_the_weight_transform_is_exact_in_fp32():
    _, w, _ = _inputs(1, 48, 150, 1, 1, seed=1)   # 150 channels: TRANSFORM_CHUNK twice and a partial chunk
    u = winograd_f2_cpu.transform_weight(w)
    ref = torch.einsum("ia,kcab,jb->ijck", winograd_f2_cpu.G, w.double(), winograd_f2_cpu.G).reshape(16, 48, 150)
    assert torch.equal(u, ref.bfloat16())


def test_what_it_does_not_take_is_refused():
    x, w, b = _inputs(1, 8, 8, 4, 4, seed=0)
    assert winograd_f2_cpu.supports(x, w, b, 1, 1) is None
    assert "bfloat16" in winograd_f2_cpu.supports(x.float(), w.float(), None, 1, 1)
    assert winograd_f2_cpu.supports(x, w, b, 2, 1) is not None
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.fastldm.winograd_f2_input(x.float().contiguous(memory_format=torch.channels_last))
    with pytest.raises(RuntimeError, match="tiles"):
        torch.ops.fastldm.winograd_f2_output(torch.zeros(16, 3, 8, dtype=torch.bfloat16), None, 1, 4, 4)


def test_the_shapes_torch_compile_sees_are_the_real_ones():
    x, w, b = _inputs(2, 19, 9, 5, 6, seed=2)
    x = x.contiguous(memory_format=torch.channels_last)
    u = winograd_f2_cpu.transform_weight(w)
    v = torch.ops.fastldm.winograd_f2_input(x)
    m = torch.bmm(v, u)
    for op, args in ((torch.ops.fastldm.winograd_f2_input, (x,)),
                     (torch.ops.fastldm.winograd_f2_output, (m, b, 2, 5, 6))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
