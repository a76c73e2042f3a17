"""Attention with int8 GEMMs (ops/int8_attention_cpu.py) against the fp64 reference at SD's head dims and token
counts, its row-softmax kernel against the formula, what it refuses, and how a layer's own choice of it meets the
pipeline's selection.

Tolerances: int8 attention is lossy by design (an int8 UNet's, not the float backends' 2 %). Its error comes from
q·kᵀ's 8-bit operands (each logit off by up to ~|q||k|/127 of its scale) and P's 255 levels; both grow with the
logits' spread. With q, k ~ N(0, σ²) and σ ≤ 3 (logits q·k/√D of standard deviation up to 9) it measured at most
0.084 of max|v| and 0.03 relative (Frobenius) here: the bounds below give those ~1.5-2× room. Sharper attention
(σ = 5, logits of std 25) reaches 0.14 of max|v| where rows' two largest logits swap: docs/benchmarks.md,
"int8 attention".

The first test to run builds the kernel (once per machine; native_build.py); without a toolchain these skip.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastldm import ops
from fastldm.models.layers import Attention
from fastldm.ops import int8_attention_cpu

MAX_OF_V = 0.14   # max |out − ref| / max |v|
REL = 0.06        # ‖out − ref‖ / ‖ref‖


@pytest.fixture(scope="module", autouse=True)
def built():
    why = int8_attention_cpu.unavailable()
    if why is not None:
        pytest.skip(why)


def _qkv(B, H, N, M, D, scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = (scale * torch.randn(B, N, H, D, generator=g)).to(dtype).transpose(1, 2)       # (B, H, N, D) views
    k = (scale * torch.randn(B, M, H, D, generator=g) + 1).to(dtype).transpose(1, 2)   # offset: the smoothing's
    v = torch.randn(B, M, H, D, generator=g).to(dtype).transpose(1, 2)
    return q, k, v


@pytest.mark.parametrize("B,H,N,M,D,scale,dtype", [
    (2, 8, 4096, 4096, 40, 1.0, torch.bfloat16),     # SD 1.5's 512² first level
    (2, 8, 1024, 1024, 80, 3.0, torch.bfloat16),     # its second level, sharper logits
    (2, 8, 256, 256, 160, 1.0, torch.float32),       # its third level, an fp32 model
    (1, 3, 1000, 257, 64, 2.0, torch.bfloat16),      # rows not a block's multiple, keys not a chunk's
    (1, 2, 700, 300, 40, 2.0, torch.float32),
])
def test_matches_the_reference(B, H, N, M, D, scale, dtype):
    q, k, v = _qkv(B, H, N, M, D, scale, dtype, seed=N + M + D)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    with torch.inference_mode():
        out = int8_attention_cpu.attention(q, k, v)
    assert out.shape == (B, H, N, D) and out.dtype == dtype
    err = (out.double() - ref).abs().max() / v.double().abs().max()
    assert err <= MAX_OF_V and (out.double() - ref).norm() / ref.norm() <= REL, float(err)


@pytest.mark.parametrize("M", [1003, 64, 7])   # whole vector pairs and a tail; a tail only
def test_softmax_levels_follow_the_formula(M):
    """level = round(255 · exp(a_r · (b_j s_j − max_j b_j s_j))) for row scales a and key scales b, stored as
    level − 128; levels sums them. The kernel's exp2 polynomial (7.5e-5 relative) may move a value sitting on a
    half-level by one."""
    g = torch.Generator().manual_seed(M)
    scores = torch.randint(-200_000, 200_000, (37, M), generator=g, dtype=torch.int32)
    row, col = torch.rand(37, generator=g) * 1e-4, 0.5 + torch.rand(M, generator=g)
    p, levels = torch.empty(37, M, dtype=torch.int8), torch.empty(37)
    torch.ops.fastldm.int8_softmax_(scores, row, col, p, levels)
    x = scores.double() * col.double()
    want = torch.round(255 * torch.exp(row.double()[:, None] * (x - x.amax(1, keepdim=True))))
    got = p.double() + 128
    assert (got - want).abs().max() <= 1 and torch.equal(levels.double(), got.sum(1))
    torch.ops.fastldm.int8_softmax_(torch.full((2, M), 5, dtype=torch.int32), row[:2], torch.ones(M), p[:2],
                                    levels[:2])
    assert torch.equal(p[:2], torch.full((2, M), 127, dtype=torch.int8)) and torch.equal(levels[:2],
                                                                                          torch.full((2,), 255.0 * M))


def test_refuses_what_it_does_not_take():
    q, k, v = _qkv(1, 2, 300, 300, 40, 1.0, torch.bfloat16, seed=0)
    assert int8_attention_cpu.supports(q, k, v) is None
    assert "causal" in int8_attention_cpu.supports(q, k, v, causal=True)
    assert "256 keys" in int8_attention_cpu.supports(q, k[:, :, :77], v[:, :, :77])
    assert "float16" in int8_attention_cpu.supports(q.half(), k.half(), v.half())
    big = torch.zeros(1, 1, 300, 1100)
    assert "1040" in int8_attention_cpu.supports(big, big, big)


def test_a_layer_prefers_it_where_it_can_and_a_forced_backend_still_wins():
    """An int8 UNet's attention layers name int8 attention (runtime/optimize.py): self-attention over 256+ tokens
    runs it, cross-attention over 77 text tokens keeps the selection's backend, and `ops.use` overrides both."""
    q, k, v = _qkv(1, 2, 300, 300, 40, 1.0, torch.bfloat16, seed=2)
    backend = int8_attention_cpu.BACKEND
    assert ops.select("attention", q, k, v) != backend
    assert ops.select("attention", q, k, v, _prefer=backend) == backend
    assert ops.select("attention", q, k[:, :, :77], v[:, :, :77], _prefer=backend) != backend
    with ops.use(attention="reference"):
        assert ops.select("attention", q, k, v, _prefer=backend) == "reference"
    layer = Attention(80, 2).requires_grad_(False).to(torch.bfloat16)
    x = torch.randn(1, 300, 80, generator=torch.Generator().manual_seed(3)).bfloat16()
    with torch.inference_mode():
        plain = layer(x)
        layer.backend = backend
        int8 = layer(x)
    assert not torch.equal(plain, int8) and (int8.float() - plain.float()).norm() / plain.float().norm() < REL


def test_the_shapes_torch_compile_sees_are_the_real_ones():
    q, k, v = _qkv(1, 2, 300, 300, 40, 1.0, torch.float32, seed=4)
    torch.library.opcheck(torch.ops.fastldm.int8_blocked_attention, (q, k, v),
                          test_utils=("test_schema", "test_faketensor"))
