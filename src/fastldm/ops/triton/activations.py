"""GELU (Hendrycks & Gimpel 2016) and GEGLU (Shazeer 2020) as single elementwise kernels.

Chen et al. 2023 ("Speed Is All You Need", §3.1) give GELU its own kernel; here the GEGLU of the UNet's
feed-forward is fused too: one kernel reads the (…, 2F) projection and writes value · GELU(gate) (…, F),
so the two halves and the GELU output never exist as separate tensors.

GELU forms (computed in fp32): "none" = x·Φ(x) with erf; "tanh" = 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))),
written as x·σ(2u) since 0.5·(1 + tanh(u)) = σ(2u); "quick" = x·σ(1.702x) (OpenAI CLIP).
Limits, checked by `supports`: contiguous input; fp16, bf16, fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import unsupported

APPROXIMATE = {"none": 0, "tanh": 1, "quick": 2}
BLOCK = 1024


@triton.jit
def _gelu(x, APPROX: tl.constexpr):
    """GELU of an fp32 block; APPROX: 0 erf, 1 tanh, 2 quick."""
    if APPROX == 0:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))  # 1/√2
    elif APPROX == 1:
        return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2·√(2/π)
    else:
        return x * tl.sigmoid(1.702 * x)


@triton.jit
def _gelu_kernel(
    X,  # pointer to the input, contiguous, n elements
    Y,  # pointer to the output, contiguous, n elements
    n,  # number of elements
    APPROX: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, _gelu(x, APPROX).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_kernel(
    X,  # pointer to the projection (rows, 2F), contiguous: value = x[:, :F], gate = x[:, F:]
    Y,  # pointer to the output (rows, F), contiguous
    F,  # output features per row
    BLOCK: tl.constexpr,
):
    row, blk = tl.program_id(0), tl.program_id(1)
    f = blk * BLOCK + tl.arange(0, BLOCK)
    mask = f < F
    row_x = X + row.to(tl.int64) * 2 * F
    value = tl.load(row_x + f, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(row_x + F + f, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row.to(tl.int64) * F + f, (value * _gelu(gate, 0)).to(Y.dtype.element_ty), mask=mask)


def supports_gelu(x: torch.Tensor, approximate: str = "none") -> str | None:
    why = unsupported(x)
    if why:
        return why
    if not x.is_contiguous():
        return "x must be contiguous"
    if approximate not in APPROXIMATE:
        return f"unknown GELU approximation {approximate!r} (none, tanh, quick)"
    return None


def supports_geglu(x: torch.Tensor) -> str | None:
    why = unsupported(x)
    if why:
        return why
    if not x.is_contiguous():
        return "x must be contiguous"
    if x.shape[-1] % 2:
        return f"last dimension {x.shape[-1]} is odd; GEGLU needs (..., 2F)"
    return None


def gelu(x: torch.Tensor, approximate: str = "none", *, out: torch.Tensor | None = None) -> torch.Tensor:
    """GELU(x), elementwise, same shape and dtype; `out` (contiguous, like x) is written if given."""
    y = torch.empty_like(x) if out is None else out
    n = x.numel()
    if n:
        _gelu_kernel[(triton.cdiv(n, BLOCK),)](x, y, n, APPROX=APPROXIMATE[approximate], BLOCK=BLOCK)
    return y


def geglu(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., 2F) -> (..., F): x[..., :F] · GELU_erf(x[..., F:]); `out` (contiguous) is written if given."""
    F = x.shape[-1] // 2
    y = x.new_empty(*x.shape[:-1], F) if out is None else out
    rows = x.numel() // (2 * F) if F else 0
    block = min(BLOCK, triton.next_power_of_2(max(F, 1)))
    if rows:
        _geglu_kernel[(rows, triton.cdiv(F, block))](x, y, F, BLOCK=block)
    return y
