"""GroupNorm (Wu & He 2018) with the following SiLU fused in: one kernel writes act(GN(x)).

The "specialized GroupNorm kernel" of Chen et al. 2023 ("Speed Is All You Need", §3.1): every step
(mean, variance, normalize, affine, activation) runs inside the kernel, with no intermediate tensors.
A group is the (C/G, H·W) block of one image; it is addressed through strides, so NCHW and channels_last
inputs both work and the output keeps the input's memory format.

- Small groups (one tile of at most `tile` elements): **one pass**. One program per (image, group) loads
  the group once, takes mean and variance from registers, normalizes and writes: one read, one write.
- Large groups: **two-pass split**. The group's pixels are cut into chunks; `_partial_moments` writes
  each chunk's mean and M2 (sum of squared deviations), and `_group_norm_apply` merges the partials
  (Chan, Golub & LeVeque 1979, the parallel variance update) and normalizes its own chunk. This spreads
  a group over many programs (B·G alone is too few to fill a GPU) and reads x twice.

Statistics are fp32 whatever the I/O dtype (fp16, bf16, fp32). Limits, checked by `supports`:
4-D input, NCHW- or channels_last-contiguous, C divisible by G, C/G ≤ 4096, act None or "silu".
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import unsupported

MAX_GROUP_CHANNELS = 4096
ACTS = {None: 0, "silu": 1}


@triton.jit
def _partial_moments(
    X,  # pointer to the input (B, C, H, W), any of the two layouts
    Mean,  # pointer to the chunk means, (B·G, splits) fp32
    M2,  # pointer to the chunk sums of squared deviations, (B·G, splits) fp32
    G, CG, HW,  # groups, channels per group, pixels per image
    stride_b, stride_c, stride_hw,  # element strides of x between images, channels and pixels
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    bg, split = tl.program_id(0), tl.program_id(1)
    b, g = bg // G, bg % G
    c = tl.arange(0, BLOCK_C)
    hw = split * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = (c[:, None] < CG) & (hw[None, :] < HW)
    ptrs = X + b * stride_b + (g * CG + c[:, None]) * stride_c + hw[None, :] * stride_hw
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_C, BLOCK_HW)
    n = CG * tl.minimum(BLOCK_HW, HW - split * BLOCK_HW)
    mean = tl.sum(tl.sum(x, 1), 0) / n
    d = tl.where(mask, x - mean, 0.0)
    tl.store(Mean + bg * tl.num_programs(1) + split, mean)
    tl.store(M2 + bg * tl.num_programs(1) + split, tl.sum(tl.sum(d * d, 1), 0))


@triton.jit
def _group_norm_apply(
    X,  # pointer to the input (B, C, H, W)
    Y,  # pointer to the output, same shape and strides as X
    W,  # pointer to the per-channel scale (C,), unused if not HAS_W
    Bias,  # pointer to the per-channel shift (C,), unused if not HAS_B
    Mean,  # pointer to the chunk means (B·G, splits) fp32, unused if ONE_PASS
    M2,  # pointer to the chunk M2s (B·G, splits) fp32, unused if ONE_PASS
    G, CG, HW, eps,
    stride_b, stride_c, stride_hw,  # element strides of x (and y) between images, channels and pixels
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,  # ACT: 0 none, 1 SiLU
    ONE_PASS: tl.constexpr,  # the tile holds the whole group: take the statistics from it
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_S: tl.constexpr,  # BLOCK_S ≥ number of chunks
):
    bg, split = tl.program_id(0), tl.program_id(1)
    b, g = bg // G, bg % G
    c = tl.arange(0, BLOCK_C)
    hw = split * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = (c[:, None] < CG) & (hw[None, :] < HW)
    offs = b * stride_b + (g * CG + c[:, None]) * stride_c + hw[None, :] * stride_hw
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_C, BLOCK_HW)
    if ONE_PASS:
        mean = tl.sum(tl.sum(x, 1), 0) / (CG * HW)
        d = tl.where(mask, x - mean, 0.0)
        var = tl.sum(tl.sum(d * d, 1), 0) / (CG * HW)
    else:
        s = tl.arange(0, BLOCK_S)
        splits = tl.num_programs(1)
        n_s = CG * tl.maximum(tl.minimum(BLOCK_HW, HW - s * BLOCK_HW), 0).to(tl.float32)
        n_s = tl.where(s < splits, n_s, 0.0)
        mean_s = tl.load(Mean + bg * splits + s, mask=s < splits, other=0.0)
        m2_s = tl.load(M2 + bg * splits + s, mask=s < splits, other=0.0)
        mean = tl.sum(n_s * mean_s, 0) / (CG * HW)
        var = tl.sum(m2_s + n_s * (mean_s - mean) * (mean_s - mean), 0) / (CG * HW)
    y = (x - mean) * tl.rsqrt(var + eps)
    if HAS_W:
        y = y * tl.load(W + g * CG + c, mask=c < CG, other=0.0).to(tl.float32)[:, None]
    if HAS_B:
        y = y + tl.load(Bias + g * CG + c, mask=c < CG, other=0.0).to(tl.float32)[:, None]
    if ACT == 1:
        y = y * tl.sigmoid(y)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def supports(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
             eps: float, act: str | None = None) -> str | None:
    why = unsupported(x, weight, bias)
    if why:
        return why
    if x.dim() != 4:
        return f"expected x of shape (B, C, H, W), got {tuple(x.shape)}"
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return "x must be NCHW- or channels_last-contiguous"
    C = x.shape[1]
    if C % num_groups:
        return f"{C} channels do not split into {num_groups} groups"
    if C // num_groups > MAX_GROUP_CHANNELS:
        return f"{C // num_groups} channels per group exceeds the kernel's {MAX_GROUP_CHANNELS}"
    if act not in ACTS:
        return f"activation {act!r} is not fused (None or 'silu')"
    return None


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, act: str | None = None, *, out: torch.Tensor | None = None,
               tile: int = 4096) -> torch.Tensor:
    """act(GroupNorm(x)) for x (B, C, H, W) in NCHW or channels_last; `out` (same shape and strides as x)
    is written if given. A group that fits in `tile` elements takes the one-pass kernel."""
    B, C, H, W = x.shape
    G, CG, HW = num_groups, C // num_groups, H * W
    block_c = triton.next_power_of_2(CG)
    block_hw = max(1, min(triton.next_power_of_2(HW), tile // block_c))
    splits = triton.cdiv(HW, block_hw)
    y = torch.empty_like(x) if out is None else out
    # H and W flatten into one pixel index: stride(2) == W·stride(3) holds for both layouts.
    strides = (x.stride(0), x.stride(1), x.stride(3))
    common = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTS[act],
                  BLOCK_C=block_c, BLOCK_HW=block_hw)
    if splits == 1:
        _group_norm_apply[(B * G, 1)](x, y, weight, bias, None, None, G, CG, HW, eps, *strides,
                                      ONE_PASS=True, BLOCK_S=1, **common)
        return y
    mean = torch.empty(B * G, splits, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    _partial_moments[(B * G, splits)](x, mean, m2, G, CG, HW, *strides, BLOCK_C=block_c, BLOCK_HW=block_hw)
    _group_norm_apply[(B * G, splits)](x, y, weight, bias, mean, m2, G, CG, HW, eps, *strides,
                                       ONE_PASS=False, BLOCK_S=triton.next_power_of_2(splits), **common)
    return y
