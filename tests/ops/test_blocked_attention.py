"""Query-blocked CPU attention against fp64 SDPA, within 2x the plain bf16 softmax(q kᵀ) v's error."""
from __future__ import annotations

import pytest
import torch

from fastldm import ops
from fastldm.ops import blocked_attention, reference, softmax_cpu


def qkv(N: int, M: int, D: int, seed: int = 0, H: int = 2):
    """q, k, v in bf16 with the UNet's strides: (B, N, H, D) memory viewed as (B, H, N, D)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, N, H, D, generator=g).bfloat16().transpose(1, 2)
    k = torch.randn(2, M, H, D, generator=g).bfloat16().transpose(1, 2)
    v = torch.randn(2, M, H, D, generator=g).bfloat16().transpose(1, 2)
    return q, k, v


def naive_bf16(q, k, v):
    """softmax(q kᵀ / √D) v with every product in bf16: the framework's own low-precision error."""
    s = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    return torch.matmul(torch.softmax(s, dim=-1), v)


# (queries, keys, head dim): SD 1.5's three self-attention levels, shrunk in tokens (the blocking is per
# query block, so 300 queries against 1024 keys exercise partial blocks and several blocks per head).
@pytest.mark.parametrize("N,M,D", [(300, 1024, 40), (256, 256, 80), (70, 512, 160)])
@pytest.mark.parametrize("native_softmax", [True, False], ids=["softmax_cpu", "torch_softmax"])
def test_matches_reference(N, M, D, native_softmax):
    if native_softmax and softmax_cpu.unavailable() is not None:
        pytest.skip(softmax_cpu.unavailable())
    q, k, v = qkv(N, M, D)
    ref = reference.attention(q.double(), k.double(), v.double())
    out = torch.ops.fastldm.blocked_attention(q, k, v, native_softmax).transpose(1, 2)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    if native_softmax:  # what the registry runs where the kernel builds
        assert torch.equal(out, blocked_attention.attention(q, k, v))
    # DESIGN rule 6 (flash-attn's rule): at most 2x the error of torch's own bf16 computation of the same
    # formula (P rounded to bf16 before P·v, as here); fp64 SDPA is the truth.
    bound = 2 * (naive_bf16(q, k, v).double() - ref).abs().max()
    assert (out.double() - ref).abs().max() <= bound


def test_block_rows_fill_two_mib_per_thread():
    assert blocked_attention.block_rows(4096) == 256  # 256 · 4096 · 2 bytes = 2 MiB
    assert blocked_attention.block_rows(1024) == 1024
    assert blocked_attention.block_rows(3000) == 256  # rounded down to a power of two
    assert blocked_attention.block_rows(4096, threads=2) == 512  # 2 MiB per thread


def test_auto_picks_it_only_where_it_applies():
    q, k, v = qkv(64, 256, 40)
    assert ops.select("attention", q, k, v) == "blocked"
    # short (text) context, fp32, upcast: another backend (flash_cpu where it is built, else the reference)
    assert ops.select("attention", q, k[:, :, :77], v[:, :, :77]) != "blocked"
    assert ops.select("attention", q.float(), k.float(), v.float()) != "blocked"
    assert ops.select("attention", q, k, v, upcast=True) != "blocked"
    assert blocked_attention.supports(q, k, v, causal=True) is not None


def test_training_falls_back_to_a_differentiable_kernel():
    """Under autograd (fine-tuning a model in bf16 autocast) the op has no backward: auto must skip it,
    and the result must still carry gradients."""
    q, k, v = (t.detach().requires_grad_() for t in qkv(64, 256, 40))
    assert ops.select("attention", q, k, v) == "reference"
    ops.attention(q, k, v).float().sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape
    with torch.no_grad():
        assert ops.select("attention", q, k, v) == "blocked"
