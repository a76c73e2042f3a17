"""Attention with int8 GEMMs for CPUs, for int8 UNets: softmax(q kᵀ / √D) v with both products in 8-bit integers.

SageAttention's recipe (Zhang et al. 2025, "SageAttention: Accurate 8-bit attention for plug-and-play inference
acceleration", ICLR) on a CPU: q and k are quantized per token, k after subtracting its mean over the tokens
(softmax is unchanged by a per-row constant, q · mean(k), and k's channel-wise offsets no longer eat the int8
range), q kᵀ runs as an int8 GEMM into int32; a C++ row softmax (csrc/int8_attention_cpu.cpp) turns each row of
scores into 255 probability levels, stored as signed int8; P·v runs as a second int8 GEMM against v quantized
per channel, and each row is divided by its sum of levels. Blocked over queries as blocked_attention.py is
(each block's scores stay in the caches), with oneDNN's integer GEMMs (`torch._int_mm`, VNNI dot products)
where blocked attention runs bf16 ones: on a 2-core AVX-512 VNNI EPYC q·kᵀ at SD 1.5's first level (D = 40)
ran ~1.3× and P·v ~1.9× the bf16 products' rate (docs/benchmarks.md, "int8 attention").

SageAttention keeps P·v in 16-bit floats: 255 uniform levels lose the smallest probabilities (below 1/510 of
the row's largest they round to 0). What that costs a whole int8 UNet is measured, not assumed: the UNet test
and the benchmark compare its output with the float model's. It is for `quant="int8"` only, where the tuning
measured it faster (runtime/tuning.py `int8_attention`); nothing picks it by priority.

Limits, checked by `supports`: CPU tensors in bf16 or fp32, no causal mask, no fp32 upcast, no autograd, at
least blocked_attention.MIN_KEYS keys, head dims up to 1040 (so int32 scores stay exact in fp32), and a working
C++ toolchain the first time (see native_build.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BackendUnavailable
from . import native_build
from .blocked_attention import BLOCK_BYTES, MIN_KEYS

LIBRARY = "int8_attention_cpu"
BACKEND = "int8_cpu"    # its name in the ops registry
MAX_HEAD_DIM = 1040     # D · 127² < 2^24: the kernel's int32 scores convert to fp32 exactly

unavailable = native_build.loader(LIBRARY)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
             upcast: bool = False) -> str | None:
    why = native_build.cpu_limits("int8 attention", q)
    if why is not None:
        return why
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "int8 attention needs q, k and v in one dtype"
    if causal or upcast:
        return "int8 attention has no causal mask and no fp32 upcast"
    if q.dim() != 4 or k.shape[2] < MIN_KEYS:
        return f"int8 attention pays from {MIN_KEYS} keys on"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"int8 attention takes head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}"
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        return "int8 attention is inference-only (no backward)"
    return unavailable()


def block_rows(n_keys: int, threads: int = 1) -> int:
    """Query rows per block: a power of two with rows · n_keys · 4 bytes (int32 scores) ≈ threads · BLOCK_BYTES."""
    rows = max(1, threads * BLOCK_BYTES // (4 * n_keys))
    return 1 << (rows.bit_length() - 1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              upcast: bool = False) -> torch.Tensor:
    """q (B, H, N, D), k and v (B, H, M, D) -> (B, H, N, D), any strides; the result is a (B, N, H, D) tensor
    viewed as (B, H, N, D), as blocked attention's. `causal` and `upcast` must be False (see `supports`)."""
    why = supports(q, k, v, causal=causal, upcast=upcast)
    if why is not None:
        raise BackendUnavailable(why)
    return torch.ops.fastldm.int8_blocked_attention(q, k, v).transpose(1, 2)


def _quantize(x: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor]:
    """x (fp32) -> (round(x / scale) in int8, scale) with scale = max |x| / 127 over `dims` (kept)."""
    scale = x.abs().amax(dims, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return (x / scale).round_().to(torch.int8), scale


# A custom op, so torch.compile keeps the block loop as one opaque call, as blocked attention's.
@torch.library.custom_op("fastldm::int8_blocked_attention", mutates_args=())
def _int8_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, H, N, D), k and v (B, H, M, D) -> (B, N, H, D) in q's dtype."""
    B, H, N, D = q.shape
    M = k.shape[2]
    qi, sq = _quantize(q.float() * D ** -0.5, -1)           # (B, H, N, D) int8, (B, H, N, 1): per token
    kf = k.float()
    ki, sk = _quantize(kf - kf.mean(2, keepdim=True), -1)     # (B, H, M, D), (B, H, M, 1): per token
    vi, sv = _quantize(v.float(), 2)                          # (B, H, M, D), (B, H, 1, D): per channel
    vi = F.pad(vi, (0, -D % 16))                              # (B, H, M, Dp): oneDNN's fastest widths
    offset = 128 * vi.sum(2, dtype=torch.int32)               # (B, H, Dp): the int8 levels are level − 128
    row_scale, col_scale = sq.squeeze(-1), sk.squeeze(-1)     # (B, H, N), (B, H, M): q kᵀ's scales
    rows = min(N, block_rows(M, torch.get_num_threads()))
    scores = torch.empty(rows, M, dtype=torch.int32)         # (R, M): one block's buffers, reused
    p = torch.empty(rows, M, dtype=torch.int8)
    levels = torch.empty(rows)
    out = torch.empty(B, N, H, D, dtype=q.dtype)             # (B, N, H, D)
    for b in range(B):
        for h in range(H):
            kt = ki[b, h].T                                   # (D, M)
            for i in range(0, N, rows):
                r = min(rows, N - i)
                torch._int_mm(qi[b, h, i:i + r], kt, out=scores[:r])                          # (r, M) int32
                torch.ops.fastldm.int8_softmax_(scores[:r], row_scale[b, h, i:i + r], col_scale[b, h], p[:r],
                                                levels[:r])
                acc = torch._int_mm(p[:r], vi[b, h]) + offset[b, h]                           # (r, Dp) int32
                out[b, i:i + r, h] = acc[:, :D] * (sv[b, h] / levels[:r, None])              # (r, D)
    return out


@_int8_blocked.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    B, H, N, D = q.shape
    return q.new_empty(B, N, H, D)


# The kernel's schema and fake function live here, so torch.compile can trace a call as one opaque op before
# the library is loaded; the library registers its CPU kernel (TORCH_LIBRARY_IMPL in the .cpp).
torch.library.define("fastldm::int8_softmax_",
                     "(Tensor scores, Tensor row_scale, Tensor col_scale, Tensor(a!) p, Tensor(b!) levels) -> ()")


@torch.library.register_fake("fastldm::int8_softmax_")
def _(scores: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, p: torch.Tensor,
      levels: torch.Tensor) -> None:
    return None
