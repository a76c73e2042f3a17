"""The two Triton attention kernels (FlashAttention, partially fused softmax) against the reference."""
from __future__ import annotations

import pytest
import torch

from fastldm.ops import reference

flash = pytest.importorskip("fastldm.ops.triton.flash_attention")
softmax = pytest.importorskip("fastldm.ops.triton.softmax_attention")
KERNELS = {"flash": flash.attention, "softmax": softmax.attention}

FP32_FLOOR = 1e-6  # outputs are averages of unit-variance values: ~10 fp32 ulps for summation order
# (queries, keys, causal): self-attention and the 77-token cross-attention, lengths that are not block
# multiples (blocks are 32 or 64), causal self-attention as in CLIP.
SHAPES = {"self": (67, 67, False), "cross": (40, 77, False), "causal": (77, 77, True)}


def qkv(B, H, NQ, NK, D, dtype, device, seed=0):
    """q, k, v with the UNet's strides: (B, N, H, D) memory viewed as (B, H, N, D)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, NQ, H, D, generator=g).to(device, dtype).transpose(1, 2)
    k = torch.randn(B, NK, H, D, generator=g).to(device, dtype).transpose(1, 2)
    v = torch.randn(B, NK, H, D, generator=g).to(device, dtype).transpose(1, 2)
    return q, k, v


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [40, 64, 80, 160])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(device, close, skip_bf16_dot, kernel, dtype, head_dim, shape):
    skip_bf16_dot(dtype)
    NQ, NK, causal = SHAPES[shape]
    q, k, v = qkv(1, 2, NQ, NK, head_dim, dtype, device)
    out = torch.full((1, 2, NQ, head_dim), float("nan"), device=device, dtype=dtype)
    assert KERNELS[kernel](q, k, v, causal=causal, out=out) is out
    ref = reference.attention(q.double(), k.double(), v.double(), causal=causal)
    close(out, ref, reference.attention(q, k, v, causal=causal), FP32_FLOOR if dtype == torch.float32 else 0.0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_upcast_and_batch(device, close, kernel):
    q, k, v = qkv(2, 3, 70, 33, 64, torch.float16, device, seed=1)
    y = KERNELS[kernel](q, k, v, upcast=True)
    assert y.shape == (2, 3, 70, 64)
    ref = reference.attention(q.double(), k.double(), v.double())
    close(y, ref, reference.attention(q, k, v, upcast=True))


def test_softmax_kernel_rounds_like_flash(device):
    """The 16-bit P·V operand of the softmax kernel is exp(s − m), normalised after the matmul, as in
    FlashAttention: its error, as a multiple of torch's own, stays at FlashAttention's (median ~1.0 over seeds
    and shapes). Normalising before the matmul rounds each row's largest weight too: median 1.3× under the
    interpreter, 1.1–1.4× on an H200, which the 2× rule of test_matches_reference let through on most seeds."""
    ratios = {name: [] for name in KERNELS}
    for NQ, NK, causal in SHAPES.values():
        for seed in range(4):
            q, k, v = qkv(1, 2, NQ, NK, 40, torch.float16, device, seed=seed)
            ref = reference.attention(q.double(), k.double(), v.double(), causal=causal)
            torch_err = (reference.attention(q, k, v, causal=causal).double() - ref).abs().max().item()
            for name, fn in KERNELS.items():
                ratios[name].append((fn(q, k, v, causal=causal).double() - ref).abs().max().item() / torch_err)
    median = {name: sorted(r)[len(r) // 2] for name, r in ratios.items()}
    assert median["softmax"] <= 1.1 * median["flash"], median


def test_large_logits_stay_finite(device, close):
    # Scores of ±100s: exp overflows unless the row max is subtracted (both kernels do).
    q, k, v = qkv(1, 1, 20, 50, 64, torch.float32, device, seed=2)
    q = q * 30
    ref = reference.attention(q.double(), k.double(), v.double())
    for fn in KERNELS.values():
        close(fn(q, k, v), ref, reference.attention(q, k, v), FP32_FLOOR)


def test_supports_states_limits(device):
    q, k, v = qkv(1, 2, 8, 8, 64, torch.float32, device)
    assert flash.supports(q, k, v) is None and softmax.supports is flash.supports
    wide = qkv(1, 1, 4, 4, 320, torch.float32, device)
    assert "head dim 320 exceeds" in flash.supports(*wide)
    kc, vc = k[:, :, :5], v[:, :, :5]
    assert "causal attention needs as many queries as keys" in flash.supports(q, kc, vc, causal=True)
    assert "dtype" in flash.supports(q.double(), k.double(), v.double())
    meta = torch.empty(1, 2, 8, 64, device="meta")
    assert "CUDA" in flash.supports(meta, meta, meta)
