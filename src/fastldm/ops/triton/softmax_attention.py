"""Partially fused softmax attention: softmax(q kᵀ / √D) v without writing the N × N probabilities.

Chen et al. 2023 ("Speed Is All You Need", §3.2.1, Fig. 2): the softmax is split into its reductions and
its elementwise part. `_softmax_row_stats`, a reduction kernel, writes only each query row's max m and
sum of exponentials l (two floats per row); `_softmax_pv`, the P·V matmul kernel, applies exp(s − m) to
each score block as it reads it, multiplies by V, and divides the accumulator by l once at the end. Unlike
FlashAttention there is no rescaling of the output accumulator: the statistics are final before the matmul
starts.

A second departure: the paper's kernel normalises the probabilities before the matmul. Here the division by l
waits for the epilogue, so the 16-bit matmul operand is exp(s − m) ∈ (0, 1] with each row's largest weight
exactly 1, as in FlashAttention. Normalised first, every weight — the largest, which dominates the output,
included — is rounded after the division: on an H200, fp16 and bf16, that gave 1.1–1.4× torch's SDPA error
(median over seeds; up to 2.6×), against ~1.0× for the FlashAttention kernel. It is also fewer multiplies: one
per output element instead of one per score.

One departure from the paper: its reduction reads q kᵀ logits that a preceding matmul wrote once; here
both kernels recompute q kᵀ block by block, so no N × N tensor (logits or probabilities) touches memory,
at the price of computing q kᵀ twice.

Limits, checked by `supports`: as flash_attention — q (B, H, Nq, D), k and v (B, H, Nk, D), any strides,
D ≤ 256 (padded to a power of two in registers), any Nq, Nk, causal only when Nq == Nk, fp16/bf16/fp32.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .flash_attention import blocks, load_kt, load_q, load_v, scores, supports, tile  # same limits, same tiles

__all__ = ["attention", "supports"]


@triton.jit
def _softmax_row_stats(
    Q,  # pointer to the queries (B, H, Nq, D)
    K,  # pointer to the keys (B, H, Nk, D)
    Max,  # pointer to the row maxima of the scaled scores, (B·H, Nq) fp32, log2 units
    Sum,  # pointer to the row sums of exp2(score − max), (B·H, Nq) fp32
    sqb, sqh, sqn, sqd,  # element strides of q
    skb, skh, skn, skd,  # element strides of k
    H, NQ, NK, D,  # heads, query and key lengths, head dim
    qk_scale,  # log2(e) / √D
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m, bh, b, h, offs_m, offs_n, offs_d = tile(H, BLOCK_M, BLOCK_N, BLOCK_D)
    q = load_q(Q, b, h, offs_m, offs_d, sqb, sqh, sqn, sqd, NQ, D, UPCAST)  # (BLOCK_M, BLOCK_D)
    k_base = K + b * skb + h * skh
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    end_n = tl.minimum(NK, (start_m + 1) * BLOCK_M) if CAUSAL else NK
    for start_n in range(0, end_n, BLOCK_N):
        keys = start_n + offs_n
        kt = load_kt(k_base, keys, offs_d, skn, skd, NK, D, UPCAST)  # (BLOCK_D, BLOCK_N)
        s, valid = scores(q, kt, qk_scale, keys, offs_m, NK, CAUSAL)  # (BLOCK_M, BLOCK_N)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    rows = bh * NQ + offs_m
    tl.store(Max + rows, m_i, mask=offs_m < NQ)
    tl.store(Sum + rows, l_i, mask=offs_m < NQ)


@triton.jit
def _softmax_pv(
    Q,  # pointer to the queries (B, H, Nq, D)
    K,  # pointer to the keys (B, H, Nk, D)
    V,  # pointer to the values (B, H, Nk, D)
    Max,  # pointer to the row maxima from _softmax_row_stats, (B·H, Nq) fp32
    Sum,  # pointer to the row sums from _softmax_row_stats, (B·H, Nq) fp32
    Out,  # pointer to the output (B, H, Nq, D)
    sqb, sqh, sqn, sqd,  # element strides of q
    skb, skh, skn, skd,  # element strides of k
    svb, svh, svn, svd,  # element strides of v
    sob, soh, son, sod,  # element strides of the output
    H, NQ, NK, D,
    qk_scale,  # log2(e) / √D
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m, bh, b, h, offs_m, offs_n, offs_d = tile(H, BLOCK_M, BLOCK_N, BLOCK_D)
    q = load_q(Q, b, h, offs_m, offs_d, sqb, sqh, sqn, sqd, NQ, D, UPCAST)  # (BLOCK_M, BLOCK_D)
    row_max = tl.load(Max + bh * NQ + offs_m, mask=offs_m < NQ, other=0.0)
    row_sum = tl.load(Sum + bh * NQ + offs_m, mask=offs_m < NQ, other=1.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    end_n = tl.minimum(NK, (start_m + 1) * BLOCK_M) if CAUSAL else NK
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        keys = start_n + offs_n
        kt = load_kt(k_base, keys, offs_d, skn, skd, NK, D, UPCAST)  # (BLOCK_D, BLOCK_N)
        v = load_v(v_base, keys, offs_d, svn, svd, NK, D, UPCAST)  # (BLOCK_N, BLOCK_D)
        s, valid = scores(q, kt, qk_scale, keys, offs_m, NK, CAUSAL)
        # The softmax's elementwise part, fused into the matmul's operand load; its division waits (see above).
        p = tl.where(valid, tl.exp2(s - row_max[:, None]), 0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
    out = acc / row_sum[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, out.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, upcast: bool = False,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √D) v: q (B, H, Nq, D), k, v (B, H, Nk, D) -> (B, H, Nq, D), a view of (B, Nq, H, D)
    memory (`out`, any strides, is written instead if given). Extra memory: 8 bytes per query row."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    o = torch.empty(B, NQ, H, D, device=q.device, dtype=q.dtype).transpose(1, 2) if out is None else out
    row_max = torch.empty(B * H, NQ, device=q.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    block_m, block_n, block_d = blocks(D)
    grid = (triton.cdiv(NQ, block_m), B * H)
    consts = dict(CAUSAL=causal, UPCAST=upcast, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    qk_scale = math.log2(math.e) / math.sqrt(D)
    _softmax_row_stats[grid](q, k, row_max, row_sum, *q.stride(), *k.stride(), H, NQ, NK, D, qk_scale, **consts)
    _softmax_pv[grid](q, k, v, row_max, row_sum, o, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                      H, NQ, NK, D, qk_scale, **consts)
    return o
