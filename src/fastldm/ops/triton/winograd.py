"""Winograd F(4×4, 3×3) convolution with Triton input and output transforms (Lavin & Gray 2016).

The math, the weight transform and its cache are fastldm.ops.winograd's; this file replaces the two
tile transforms, which in plain PyTorch take several memory passes (pad, unfold, einsum, permute), with
one kernel each, as in ML Drift's `Winograd4x4To36` / `Winograd36To4x4` (Chen et al. 2023, §3.3):
- `_input_transform` reads each 6×6 input tile straight from x (the zero padding is a load mask) and
  writes V = Bᵀ d B as (36, C, P);
- the 36 GEMMs M = U @ V stay with cuBLAS (torch.bmm);
- `_output_transform` reads M (36, K, P), writes y = Aᵀ M A + bias into x's layout (NCHW or
  channels_last) and crops the last partial tiles.
The 6×6 transforms are broadcast-and-sum contractions over tiles padded to 8×8 in registers.

Limits: those of fastldm.ops.winograd (3×3, stride 1, padding 1, inference only), plus CUDA tensors (or
the interpreter) and NCHW- or channels_last-contiguous input.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import winograd
from .device import unsupported

BLOCK = 32  # (channel, tile) pairs per program; each holds a 8×8×8 contraction in registers


@functools.cache
def _matrices(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bᵀ (6×6) and Aᵀ (4×6) zero-padded to 8 columns (and Bᵀ to 8 rows), fp32, on `device`."""
    bt = torch.zeros(8, 8, dtype=torch.float32)
    bt[:6, :6] = winograd.BT
    at = torch.zeros(4, 8, dtype=torch.float32)
    at[:, :6] = winograd.AT
    return bt.to(device), at.to(device)


@triton.jit
def _input_transform(
    X,  # pointer to the input (B, C, H, W), NCHW or channels_last
    V,  # pointer to the transformed tiles (36, C, P), contiguous, P = B·nH·nW
    BT,  # pointer to Bᵀ zero-padded to (8, 8), fp32
    C, H, W, nH, nW, P,
    stride_b, stride_c, stride_h, stride_w,  # element strides of x
    BLOCK: tl.constexpr,  # (channel, tile) pairs per program
):
    q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # pair index c·P + p: V's innermost two dims
    c, p = q // P, q % P
    b, t = p // (nH * nW), p % (nH * nW)
    r8 = tl.arange(0, 8)
    row = (t // nW * 4 - 1)[:, None, None] + r8[None, :, None]  # (BLOCK, 8, 1): tile row a
    col = (t % nW * 4 - 1)[:, None, None] + r8[None, None, :]  # (BLOCK, 1, 8): tile column z
    inside = (q < C * P)[:, None, None] & (r8 < 6)[None, :, None] & (r8 < 6)[None, None, :]
    inside = inside & (row >= 0) & (row < H) & (col >= 0) & (col < W)
    offs = (b * stride_b + c * stride_c)[:, None, None] + row * stride_h + col * stride_w
    d = tl.load(X + offs, mask=inside, other=0.0).to(tl.float32)  # (BLOCK, 8, 8): d[q, a, z]
    bt = tl.load(BT + r8[:, None] * 8 + r8[None, :])  # (8, 8): bt[i, a]
    t1 = tl.sum(bt[None, :, :, None] * d[:, None, :, :], 2)  # (BLOCK, 8, 8): (Bᵀ d)[q, i, z]
    v = tl.sum(t1[:, :, None, :] * bt[None, None, :, :], 3)  # (BLOCK, 8, 8): (Bᵀ d B)[q, i, j]
    i = r8[None, :, None]
    j = r8[None, None, :]
    tl.store(V + (i * 6 + j) * C * P + q[:, None, None], v.to(V.dtype.element_ty),
             mask=(q < C * P)[:, None, None] & (i < 6) & (j < 6))


@triton.jit
def _output_transform(
    M,  # pointer to the GEMM result (36, K, P), contiguous
    Y,  # pointer to the output (B, K, H, W), NCHW or channels_last
    AT,  # pointer to Aᵀ zero-padded to (4, 8), fp32
    Bias,  # pointer to the bias (K,), unused if not HAS_BIAS
    K, H, W, nH, nW, P,
    stride_b, stride_k, stride_h, stride_w,  # element strides of y
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,  # (output channel, tile) pairs per program
):
    q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # pair index k·P + p: M's innermost two dims
    k, p = q // P, q % P
    r8 = tl.arange(0, 8)
    r4 = tl.arange(0, 4)
    i = r8[None, :, None]
    j = r8[None, None, :]
    m = tl.load(M + (i * 6 + j) * K * P + q[:, None, None],
                mask=(q < K * P)[:, None, None] & (i < 6) & (j < 6), other=0.0).to(tl.float32)  # (BLOCK, 8, 8)
    at = tl.load(AT + r4[:, None] * 8 + r8[None, :])  # (4, 8): at[r, i]
    t1 = tl.sum(at[None, :, :, None] * m[:, None, :, :], 2)  # (BLOCK, 4, 8): (Aᵀ M)[q, r, j]
    y = tl.sum(t1[:, :, None, :] * at[None, None, :, :], 3)  # (BLOCK, 4, 4): (Aᵀ M A)[q, r, s]
    if HAS_BIAS:
        y += tl.load(Bias + k, mask=q < K * P, other=0.0).to(tl.float32)[:, None, None]
    b, t = p // (nH * nW), p % (nH * nW)
    row = (t // nW * 4)[:, None, None] + r4[None, :, None]
    col = (t % nW * 4)[:, None, None] + r4[None, None, :]
    offs = (b * stride_b + k * stride_k)[:, None, None] + row * stride_h + col * stride_w
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=(q < K * P)[:, None, None] & (row < H) & (col < W))


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1,
             padding: int = 0) -> str | None:
    why = unsupported(x, weight, bias) or winograd.supports(x, weight, bias, stride, padding)
    if why:
        return why
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return "x must be NCHW- or channels_last-contiguous"
    return None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1,
           padding: int = 0, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """3×3 stride-1 padding-1 convolution x (B, C, H, W) * weight (K, C, 3, 3) -> (B, K, H, W) in x's
    memory format (`out`, any strides, is written instead if given)."""
    B, C, H, W = x.shape
    K = weight.shape[0]
    nH, nW = winograd.tile_counts(H, W)
    P = B * nH * nW
    bt, at = _matrices(x.device)
    v = torch.empty(36, C, P, device=x.device, dtype=x.dtype)
    _input_transform[(triton.cdiv(C * P, BLOCK),)](x, v, bt, C, H, W, nH, nW, P, *x.stride(), BLOCK=BLOCK)
    m = torch.bmm(winograd.weights().get(weight), v)  # (36, K, P)
    if out is None:
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        out = torch.empty(B, K, H, W, device=x.device, dtype=x.dtype, memory_format=fmt)
    _output_transform[(triton.cdiv(K * P, BLOCK),)](m, out, at, bias, K, H, W, nH, nW, P, *out.stride(),
                                                     HAS_BIAS=bias is not None, BLOCK=BLOCK)
    return out
