"""Winograd F(4x4, 3x3) with C++ transforms (ops/winograd_cpu.py) against an fp64 convolution, within the same
bounds as the plain-PyTorch Winograd (test_winograd.py), and the same algorithm as it.

The first test to run builds the transforms (once per machine, ~10-30 s; native_build.py) unless a build is
cached; without a C++ toolchain these tests skip.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastldm import ops
from fastldm.ops import winograd, winograd_cpu

from .test_winograd import conv_inputs


@pytest.fixture(scope="module", autouse=True)
def built():
    why = winograd_cpu.unavailable()
    if why is not None:
        pytest.skip(why)


def _errors(x, w, b):
    """(max|winograd_cpu - ref|, max|F.conv2d - ref|, max|ref|), ref the fp64 convolution."""
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    with torch.inference_mode():
        y = winograd_cpu.conv2d(x, w, b, 1, 1)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    direct = (F.conv2d(x, w, b, padding=1).double() - ref).abs().max().item()
    return (y.double() - ref).abs().max().item(), direct, ref.abs().max().item()


# SD 1.5's full-resolution layers at a 256² image (CFG batch 2), then edges: partial tiles, a single pixel,
# channel counts that are not whole vectors (8 lanes with AVX2, 16 with AVX-512), no bias, NCHW input.
@pytest.mark.parametrize("B,C,K,H,W", [(2, 320, 320, 32, 32), (2, 960, 320, 32, 32), (1, 64, 64, 13, 7),
                                       (1, 3, 5, 1, 1), (2, 19, 9, 6, 10), (3, 33, 17, 4, 9)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_conv2d_within_winograds_bound(B, C, K, H, W, bias):
    x, w, b = conv_inputs(B, C, K, H, W, torch.float32, seed=C + H)
    x = x.contiguous(memory_format=torch.channels_last) if C % 2 else x  # both layouts are accepted
    err, direct, scale = _errors(x, w, b if bias else None)
    # The bounds of test_winograd.py's fp32 case (observed 5-36× direct convolution's error, ~1e-5 of max|y|);
    # the floor is for the few-channel cases, whose direct error can be 0.
    assert err <= max(64 * direct, 1e-6 * scale)
    assert err <= 2e-5 * scale


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_images_are_computed_in_fp32_and_rounded_once(bias):
    """A bf16 image and weight give the fp32 result on the same values, rounded to bf16: bitwise, as the
    transforms widen what they read and round what they write, and the GEMMs are fp32."""
    x, w, b = conv_inputs(2, 40, 24, 9, 12, torch.float32, seed=7)
    x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16() if bias else None
    with torch.inference_mode():
        y = winograd_cpu.conv2d(x, w, b, 1, 1)
        wide = winograd_cpu.conv2d(x.float(), w.float(), None if b is None else b.float(), 1, 1)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, wide.bfloat16())
    direct = F.conv2d(x, w, b, padding=1)   # a bf16 direct convolution rounds its output too: the same error
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    assert (y.double() - ref).abs().max() <= 2 * (direct.double() - ref).abs().max() + 1e-5 * ref.abs().max()


def test_is_the_same_algorithm_as_the_pytorch_winograd():
    x, w, b = conv_inputs(2, 40, 24, 9, 12, torch.float64, seed=3)
    with torch.inference_mode():
        ours = winograd_cpu.conv2d(x.float(), w.float(), b.float(), 1, 1).double()
        theirs = winograd.conv2d(x, w, b, 1, 1)  # fp64: the algorithm without its rounding
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())


def test_transforms_give_what_the_formulas_say():
    """The input transform is Bᵀ d B of each 6×6 tile (zero-padded), the output transform Aᵀ M A + bias."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 4, 8, generator=g).contiguous(memory_format=torch.channels_last)  # 1 × 2 tiles
    v = torch.ops.fastldm.winograd_input(x)  # (36, 2, 8)
    xp = F.pad(x.double(), (1, 1, 1, 1))[0]  # (8, 6, 10)
    for p, x0 in enumerate((0, 4)):
        d = xp[:, :, x0:x0 + 6]  # (C, 6, 6)
        expect = (winograd.BT @ d @ winograd.BT.T).reshape(8, 36).T  # (36, C)
        torch.testing.assert_close(v[:, p].double(), expect, rtol=1e-6, atol=1e-5)
    m, bias = torch.randn(36, 2, 5, generator=g), torch.randn(5, generator=g)
    y = torch.ops.fastldm.winograd_output(m, bias, 1, 4, 7)  # the second tile is cropped to 3 columns
    for p, x0 in enumerate((0, 4)):
        expect = winograd.AT @ m[:, p].double().T.reshape(5, 6, 6) @ winograd.AT.T + bias.double()[:, None, None]
        torch.testing.assert_close(y[0, :, :, x0:x0 + 4].double(), expect[:, :, :7 - x0], rtol=1e-6, atol=1e-5)


def test_is_a_conv2d_backend_and_says_what_it_cannot_run():
    x, w, b = conv_inputs(2, 16, 16, 8, 8, torch.float32)
    with torch.inference_mode(), ops.use(conv2d="winograd_cpu"):
        assert ops.select("conv2d", x, w, b, stride=1, padding=1) == "winograd_cpu"
        y = ops.conv2d(x, w, b, 1, 1)
    torch.testing.assert_close(y, F.conv2d(x, w, b, padding=1), rtol=0, atol=1e-4)
    assert "float32 or bfloat16" in winograd_cpu.supports(x.half(), w.half(), b.half(), 1, 1)
    assert "stride" in winograd_cpu.supports(x, w, b, 2, 1)
    assert "3x3" in winograd_cpu.supports(x, w[:, :, :1, :1], b, 1, 0)


def test_the_ops_check_their_inputs():
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(RuntimeError, match="channels_last"):
        torch.ops.fastldm.winograd_input(x)  # NCHW
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.fastldm.winograd_input(x.double().contiguous(memory_format=torch.channels_last))
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.fastldm.winograd_output(torch.randn(36, 1, 8), None, 1, 4, 4, torch.float16)
    with pytest.raises(RuntimeError, match="tiles"):
        torch.ops.fastldm.winograd_output(torch.randn(36, 3, 8), None, 1, 4, 4)  # a 4×4 image is one tile
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.fastldm.winograd_output(torch.randn(36, 1, 8), torch.randn(7), 1, 4, 4)


def test_registered_shapes_match_the_kernels():
    """The fake (shape) functions torch.compile traces with agree with the kernels (torch.library.opcheck)."""
    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fastldm.winograd_input, (x,), test_utils=("test_schema", "test_faketensor"))
    m = torch.randn(36, 2 * 2 * 2, 4)
    torch.library.opcheck(torch.ops.fastldm.winograd_output, (m, torch.randn(4), 2, 5, 6),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastldm.winograd_input, (x.bfloat16(),),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastldm.winograd_output, (m, torch.randn(4).bfloat16(), 2, 5, 6, torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor"))
