"""FlashAttention forward: softmax(q kᵀ / √D) v in one pass over the keys with an online softmax.

Dao et al. 2022 ("FlashAttention", Alg. 1) with the FlashAttention-2 loop order (Dao 2023, Alg. 1): each
program owns a block of query rows, streams key/value blocks through on-chip memory, keeps a running
row max m and row sum l, rescales its accumulator by exp(m_old − m_new) when the max grows, and divides
by l once at the end. Nothing of size Nq × Nk is ever written. Chen et al. 2023 (§3.2.2) use it for the
d = 40 attention of the SD UNet. Exponentials are exp2 with log2(e) folded into the scale.

Limits, checked by `supports`: q (B, H, Nq, D), k and v (B, H, Nk, D), any strides; head dim D ≤ 256
(40, 80 and 160 are padded to the next power of two inside the kernel, never in memory); any Nq, Nk
(77 text tokens included); causal only when Nq == Nk (CLIP); fp16, bf16, fp32 (fp32 dots in IEEE fp32,
matching torch's default of no TF32). `upcast` runs both matmuls in fp32 for half inputs.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .device import unsupported

MAX_HEAD_DIM = 256


@triton.jit
def tile(H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's query block and head: (block index, b·H + h, b, h, query rows, key columns of a block,
    head-dim columns)."""
    start_m, bh = tl.program_id(0), tl.program_id(1)
    return (start_m, bh, bh // H, bh % H, start_m * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N),
            tl.arange(0, BLOCK_D))


@triton.jit
def load_q(Q, b, h, offs_m, offs_d, sqb, sqh, sqn, sqd, NQ, D, UPCAST: tl.constexpr):
    """One query block (BLOCK_M, BLOCK_D) of head (b, h); rows past NQ and columns past D read 0."""
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D), other=0.0)  # (BLOCK_M, BLOCK_D)
    return q.to(tl.float32) if UPCAST else q


@triton.jit
def load_kt(k_base, keys, offs_d, skn, skd, NK, D, UPCAST: tl.constexpr):
    """One key block, transposed: (BLOCK_D, BLOCK_N); keys past NK read 0."""
    kt = tl.load(k_base + keys[None, :] * skn + offs_d[:, None] * skd,
                 mask=(keys[None, :] < NK) & (offs_d[:, None] < D), other=0.0)  # (BLOCK_D, BLOCK_N)
    return kt.to(tl.float32) if UPCAST else kt


@triton.jit
def load_v(v_base, keys, offs_d, svn, svd, NK, D, UPCAST: tl.constexpr):
    """One value block (BLOCK_N, BLOCK_D); keys past NK read 0."""
    v = tl.load(v_base + keys[:, None] * svn + offs_d[None, :] * svd,
                mask=(keys[:, None] < NK) & (offs_d[None, :] < D), other=0.0)  # (BLOCK_N, BLOCK_D)
    return v.to(tl.float32) if UPCAST else v


@triton.jit
def scores(q, kt, qk_scale, keys, offs_m, NK, CAUSAL: tl.constexpr):
    """q kᵀ · qk_scale (BLOCK_M, BLOCK_N) in log2 units, and which entries are real keys (not padding, not
    masked by causality)."""
    s = tl.dot(q, kt, input_precision="ieee") * qk_scale
    valid = keys[None, :] < NK
    if CAUSAL:
        valid = valid & (keys[None, :] <= offs_m[:, None])
    return s, valid


@triton.jit
def _flash_attention_fwd(
    Q,  # pointer to the queries (B, H, Nq, D)
    K,  # pointer to the keys (B, H, Nk, D)
    V,  # pointer to the values (B, H, Nk, D)
    Out,  # pointer to the output (B, H, Nq, D)
    sqb, sqh, sqn, sqd,  # element strides of q
    skb, skh, skn, skd,  # element strides of k
    svb, svh, svn, svd,  # element strides of v
    sob, soh, son, sod,  # element strides of the output
    H, NQ, NK, D,  # heads, query and key lengths, head dim
    qk_scale,  # log2(e) / √D: scores go straight to exp2
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m, bh, b, h, offs_m, offs_n, offs_d = tile(H, BLOCK_M, BLOCK_N, BLOCK_D)
    q = load_q(Q, b, h, offs_m, offs_d, sqb, sqh, sqn, sqd, NQ, D, UPCAST)  # (BLOCK_M, BLOCK_D)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    end_n = tl.minimum(NK, (start_m + 1) * BLOCK_M) if CAUSAL else NK
    for start_n in range(0, end_n, BLOCK_N):
        keys = start_n + offs_n
        kt = load_kt(k_base, keys, offs_d, skn, skd, NK, D, UPCAST)  # (BLOCK_D, BLOCK_N)
        v = load_v(v_base, keys, offs_d, svn, svd, NK, D, UPCAST)  # (BLOCK_N, BLOCK_D)
        s, valid = scores(q, kt, qk_scale, keys, offs_m, NK, CAUSAL)  # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every row sees key 0 in the first block
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, out.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D))


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
             upcast: bool = False) -> str | None:
    why = unsupported(q, k, v)
    if why:
        return why
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        return f"expected q (B, H, Nq, D), k and v (B, H, Nk, D); got {tuple(q.shape)}, {tuple(k.shape)}, " \
               f"{tuple(v.shape)}"
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, heads or head dim"
    if not q.dtype == k.dtype == v.dtype:
        return "q, k and v must share a dtype"
    if q.shape[3] > MAX_HEAD_DIM:
        return f"head dim {q.shape[3]} exceeds the kernel's {MAX_HEAD_DIM}"
    if causal and q.shape[2] != k.shape[2]:
        return f"causal attention needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}"
    return None


def blocks(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) for a head dim: the padded dim, and smaller tiles for wide heads so
    q, the accumulator and a key block stay in registers. A heuristic, not tuned."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    return (64, 64, block_d) if block_d <= 64 else (64, 32, block_d) if block_d <= 128 else (32, 32, block_d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, upcast: bool = False,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √D) v: q (B, H, Nq, D), k, v (B, H, Nk, D) -> (B, H, Nq, D).

    The result is a (B, H, Nq, D) view of (B, Nq, H, D) memory, so the caller's transpose back to tokens
    is free; `out` (any strides) is written instead if given."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    o = torch.empty(B, NQ, H, D, device=q.device, dtype=q.dtype).transpose(1, 2) if out is None else out
    block_m, block_n, block_d = blocks(D)
    _flash_attention_fwd[(triton.cdiv(NQ, block_m), B * H)](
        q, k, v, o, *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, NQ, NK, D,
        math.log2(math.e) / math.sqrt(D), CAUSAL=causal, UPCAST=upcast,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    return o
