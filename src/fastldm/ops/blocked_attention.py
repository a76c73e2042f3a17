"""Query-blocked attention for CPUs: softmax(q kᵀ / √D) v one cache-sized score block at a time.

For each (batch, head), the queries are cut into blocks of R rows; a block's scores S = q_R kᵀ
(R × M) are produced by one oneDNN GEMM, normalised in place by a row softmax while they are still in the
cores' caches (softmax_cpu.py's C++ kernel, 2.2-2.7× torch.softmax on a (512, 4096) bf16 block; torch's
where it cannot be built), and multiplied into v by a second GEMM. R is chosen so each thread's rows of a bf16 score
block take 2 MiB (R = threads · 2^20 / M, a power of two): bigger blocks mean fewer, larger GEMM calls,
until they spill the L3 (a sweep of 0.5-4 MiB found 2 MiB fastest: docs/benchmarks.md, "Blocked
attention"). This is
the query-blocking of memory-efficient attention (Rabe & Staats 2021, "Self-attention Does Not Need O(n²)
Memory") without the key-blocking: with the whole key range in one block the softmax needs no running
rescale.

Why not torch's fused CPU kernel (`scaled_dot_product_attention`)? At Stable Diffusion's shapes (head
dim 40/80/160) it runs its inner GEMMs as many tiny calls; in bf16 on an AVX-512 machine this blocking
was 2.6-2.7× faster at 1024-4096 tokens (docs/benchmarks.md, "Blocked attention").

oneDNN's bf16 GEMM is slow for an output width that is not a multiple of 16 (its AVX-512 register
width), so v is zero-padded to one for P·v (1.6× faster at head dim 40); q kᵀ, whose 40 is the reduction
length, is fastest as it is.

Limits, checked by `supports`: CPU tensors in bf16 (fp32 keeps torch's kernel), no causal mask, no fp32
upcast, no autograd (training falls back to torch's kernel), and at least MIN_KEYS keys (with a short
context, as in cross-attention on 77 text tokens, torch's kernel is as fast). Precision: P is rounded to
bf16 before P·v, as in the plain bf16 softmax(q kᵀ) v it is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BackendUnavailable
from . import softmax_cpu

MIN_KEYS = 256
BLOCK_BYTES = 2 << 20  # per thread


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
             upcast: bool = False) -> str | None:
    if q.device.type != "cpu":
        return f"blocked attention is for CPU tensors, got {q.device.type}"
    if q.dtype != torch.bfloat16 or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"blocked attention runs bf16 only, got {q.dtype}"
    if causal or upcast:
        return "blocked attention has no causal mask and no fp32 upcast"
    if q.dim() != 4 or k.shape[2] < MIN_KEYS:
        return f"blocked attention pays from {MIN_KEYS} keys on, got {k.shape[2]}"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "blocked attention is inference-only (no backward); training uses torch's kernel"
    return None


def block_rows(n_keys: int, threads: int = 1) -> int:
    """Query rows per block: a power of two with rows · n_keys · 2 bytes ≈ threads · BLOCK_BYTES."""
    rows = max(1, threads * BLOCK_BYTES // (2 * n_keys))
    return 1 << (rows.bit_length() - 1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              upcast: bool = False) -> torch.Tensor:
    """q (B, H, N, D), k and v (B, H, M, D) -> (B, H, N, D), any strides (the UNet passes (B, N, H, D)
    transposed views). The result is a (B, N, H, D) tensor viewed as (B, H, N, D), so the caller's
    transpose back to tokens is free. `causal` and `upcast` must be False (see `supports`)."""
    return _blocked(q, k, v, softmax_cpu.unavailable() is None).transpose(1, 2)


# A custom op, so torch.compile keeps the block loop as one opaque call instead of unrolling it.
@torch.library.custom_op("fastldm::blocked_attention", mutates_args=())
def _blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, native_softmax: bool) -> torch.Tensor:
    """q (B, H, N, D), k and v (B, H, M, D) -> (B, N, H, D); the scores normalised by softmax_cpu's kernel
    if `native_softmax`, else by torch's."""
    B, H, N, D = q.shape
    M = k.shape[2]
    rows = min(N, block_rows(M, torch.get_num_threads()))
    q = q * D ** -0.5                               # (B, H, N, D), the scale applied once
    pad = -D % 16                                   # P·v with D = 40 columns: pad v to 48 (see above)
    out = torch.empty(B, N, H, D, dtype=q.dtype)   # (B, N, H, D)
    if native_softmax and softmax_cpu.unavailable() is not None:  # also loads the library on a direct call
        raise BackendUnavailable(softmax_cpu.unavailable())
    softmax_ = torch.ops.fastldm.softmax_cpu_ if native_softmax else lambda s: s.copy_(s.softmax(-1))
    # One block's buffers, reused: a fresh multi-MB tensor per block pays its page faults every time (3-10 %
    # of a call at SD 1.5's shapes).
    scores = torch.empty(rows, M, dtype=q.dtype)   # (R, M)
    pv = torch.empty(rows, D + pad, dtype=q.dtype)  # (R, D + pad)
    for b in range(B):
        for h in range(H):
            kt, vh = k[b, h].T, F.pad(v[b, h], (0, pad))  # (D, M), (M, D + pad)
            for i in range(0, N, rows):
                r = min(rows, N - i)
                torch.mm(q[b, h, i:i + r], kt, out=scores[:r])          # (r, M)
                torch.mm(softmax_(scores[:r]), vh, out=pv[:r])         # (r, D + pad)
                out[b, i:i + r, h] = pv[:r, :D]
    return out


@_blocked.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, native_softmax: bool) -> torch.Tensor:
    B, H, N, D = q.shape
    return q.new_empty(B, N, H, D)
