"""Flash attention for CPUs: softmax(q kᵀ / √D) v without ever writing the N × M scores.

The kernel is C++ (csrc/flash_attention_cpu.cpp, built on first use by native_build.py): FlashAttention-2
(Dao 2023, Alg. 1) with the online softmax of Milakov & Gimelshein 2018. Each task takes BLOCK_Q
queries of one (batch, head), sweeps the keys BLOCK_K at a time and keeps a running max and sum per
query; tasks are handed out from a shared counter to torch's intra-op threads. Both products are
register-tiled fused multiply-adds with ATen's Vectorized<float>, computed transposed so the queries lie
along the SIMD lanes: no horizontal reductions, any head dim. exp is a base-2 polynomial (2.3e-7
relative error, see the .cpp). bf16 inputs are widened to fp32 as they are packed; the output is
rounded once.

Why not torch's kernel (`scaled_dot_product_attention`, ATen's FlashAttentionKernel.cpp on CPU): it is an
online-softmax kernel too, but computes each q-block × kv-block score tile with a BLAS call, runs the
scale-and-max, exp-and-sum and rescale as separate passes over the tile with per-row reductions, and
makes a second BLAS call for P·V. Per core on the AVX2 box it ran SD 1.5's attention at 0.4-0.8 of a
large fp32 matmul, this kernel at 0.5-0.9 (1.04-1.6x faster at every SD 1.5 shape at 256² and 512²;
docs/benchmarks.md, "Flash attention on CPU").

Block sizes (AVX2, one thread, CPU time of alternated calls, medians): BLOCK_Q 96 with BLOCK_K 64 was
fastest or within 3 % of it at every SD shape, against BLOCK_Q 48 or 144 and BLOCK_K 128; BLOCK_K 256 lost
10-15 % (a key block of pᵀ no longer fits the L1 cache next to V's rows), BLOCK_Q 192 up to 20 % at head
dim 160 (qᵀ and oᵀ spill the L2).

Limits, checked by `supports`: CPU tensors in fp32 or bf16 (one dtype), an x86 CPU with AVX2 or AVX-512,
head dim ≤ MAX_HEAD_DIM, no causal mask, no autograd (training uses torch's kernel), and a working C++
toolchain the first time (see native_build.py). `upcast` is always honoured: the arithmetic is fp32.
"""
from __future__ import annotations

import torch

from ..errors import BackendUnavailable
from . import native_build

BLOCK_Q = 96    # queries per task, rounded up to whole register tiles (24 queries with AVX2, 48 with AVX-512)
BLOCK_K = 64    # keys per online-softmax step (M is cut into ⌊M / BLOCK_K⌋ equal blocks)
MAX_HEAD_DIM = 256
LIBRARY = "flash_attention_cpu"


unavailable = native_build.loader(LIBRARY)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
             upcast: bool = False) -> str | None:
    if q.device.type != "cpu" or k.device.type != "cpu" or v.device.type != "cpu":
        return f"flash_cpu is for CPU tensors, got {q.device.type}"
    if q.dtype not in (torch.float32, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"flash_cpu runs float32 or bfloat16 (q, k, v of one dtype), got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "flash_cpu takes (B, H, N, D) tensors"
    if causal:
        return "flash_cpu has no causal mask"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"flash_cpu handles head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}"
    if k.shape[2] == 0:
        return "flash_cpu needs at least one key"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "flash_cpu is inference-only (no backward); training uses torch's kernel"
    return unavailable()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              upcast: bool = False) -> torch.Tensor:
    """q (B, H, N, D), k and v (B, H, M, D) -> (B, H, N, D), any strides (the UNet passes (B, N, H, D)
    transposed views). The result is a (B, N, H, D) tensor viewed as (B, H, N, D), so the caller's
    transpose back to tokens is free. `causal` must be False (see `supports`)."""
    why = unavailable()
    if why is not None:
        raise BackendUnavailable(why)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # the kernel reads rows of D
    return torch.ops.fastldm.flash_attention_cpu(q, k, v, BLOCK_Q, BLOCK_K).transpose(1, 2)


# The op's schema and fake (shape) function live here, so torch.compile can trace a call as one opaque op
# before the library is loaded; the library registers its CPU kernel (TORCH_LIBRARY_IMPL in the .cpp).
torch.library.define("fastldm::flash_attention_cpu",
                     "(Tensor q, Tensor k, Tensor v, int block_q, int block_k) -> Tensor")


@torch.library.register_fake("fastldm::flash_attention_cpu")
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """q (B, H, N, D), k and v (B, H, M, D) with unit stride along D -> (B, N, H, D)."""
    B, H, N, D = q.shape
    return q.new_empty(B, N, H, D)
