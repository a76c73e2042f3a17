"""Winograd F(2×2, 3×3) convolution in bf16 for CPUs with native bf16 (Lavin & Gray 2016, §4.1).

F(4×4, 3×3) (winograd_cpu.py) saves 4× the multiplies but must run its GEMMs in fp32: its transforms'
entries reach 5 and 8 and cancel, so bf16 tiles would cost ~10 % of max|y|. F(2×2, 3×3) saves 2.25×, and
its Bᵀ and Aᵀ hold only 0 and ±1 (G: ½), so its transformed tiles V and weights U can be bf16: its 16 GEMMs
run at the bf16 rate — on an AVX-512 bf16 CPU twice fp32's — with fp32 accumulators; V, U, the products M and
the output are each rounded to bf16 once. Measured against an fp64 convolution: 1.6-2.3× the error of oneDNN's bf16 direct convolution
(4.1-6.8e-3 of max|y| against 2.3-3.1e-3 at SD 1.5's shapes, benchmarks/winograd_f2.py); tests bound it. In a
512² SD 1.5 image that does not show: 44.7 dB against fp32, as with direct bf16 convolutions
(benchmarks/winograd_f2_accuracy.py).

The C++ (csrc/winograd_f2_cpu.cpp) does the input and output transforms, each one pass over channels_last
memory with channels along the SIMD lanes; between them `torch.bmm` runs the 16 GEMMs in bf16 (oneDNN, fp32
accumulators), whose products M it rounds to bf16: that third rounding adds little (5.0-5.6e-3 of max|y|
against 4.2-5.4e-3 with M in fp32, at SD 1.5's shapes), and it keeps the GEMMs at oneDNN's bf16 rate
(ATen's bf16 × bf16 -> fp32 routes on a CPU without AMX, cpublas.brgemm's fallback, ran at a third of it).
The transformed weights are 16/9 of the bf16 weights (F(4×4)'s fp32 ones are 8×).

Limits, checked by `supports`: CPU, bfloat16 image and weight, 3×3 kernel, stride 1, padding 1, groups 1,
no autograd, an x86 CPU with AVX2 or AVX-512 and a working C++ toolchain the first time. It runs anywhere
those hold, but pays only where bf16 is native (runtime/tuning.py measures it; elsewhere bf16 is emulated).
"""
from __future__ import annotations

import torch

from ..errors import BackendUnavailable
from . import native_build, winograd

LIBRARY = "winograd_f2_cpu"

# F(2×2, 3×3)'s weight transform (Lavin & Gray 2016, §4.1); Bᵀ and Aᵀ live in the C++ as adds.
G = torch.tensor([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], dtype=torch.float64)
TRANSFORM_CHUNK = 64  # output channels transformed at a time (transform_weight)


unavailable = native_build.loader(LIBRARY)


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1,
             padding: int = 0) -> str | None:
    why = native_build.cpu_limits("winograd_f2_cpu", x)
    if why is None and (x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or weight.device.type != "cpu"):
        why = f"winograd_f2_cpu takes a bfloat16 image and weight on the CPU, got {x.dtype} and {weight.dtype}"
    return why or winograd.supports(x, weight, bias, stride, padding) or unavailable()


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) -> U = G g Gᵀ as (16, C, K) bfloat16, contiguous: the layout `bmm(V, U)` reads. Exact in
    fp32 (G's entries are ½: U's are sums of up to nine weights over 4), done TRANSFORM_CHUNK output channels at
    a time, then rounded to bf16 once."""
    K, C = weight.shape[:2]
    gg = torch.kron(G, G).float().to(weight.device)  # (16, 9): gg[4i + j, 3a + b] = G[i, a]·G[j, b]
    u = torch.empty(16, C, K, dtype=torch.bfloat16, device=weight.device)
    for k0 in range(0, K, TRANSFORM_CHUNK):
        block = weight[k0:k0 + TRANSFORM_CHUNK].detach().float().reshape(-1, C, 9)  # (k, C, 9)
        k = block.shape[0]
        u[:, :, k0:k0 + k] = (gg @ block.permute(2, 1, 0).reshape(9, C * k)).view(16, C, k)  # (16, C, k)
    return u


def conv(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (B, C, H, W) bfloat16, u (16, C, K) bfloat16 from `transform_weight` -> the 3×3 stride-1 padding-1
    convolution (B, K, H, W) bfloat16, channels_last."""
    why = unavailable()
    if why is not None:
        raise BackendUnavailable(why)
    B, _, H, W = x.shape
    v = torch.ops.fastldm.winograd_f2_input(x.contiguous(memory_format=torch.channels_last))  # (16, P, C)
    m = torch.bmm(v, u)  # (16, P, K) bf16
    return torch.ops.fastldm.winograd_f2_output(m, bias, B, H, W)


# The ops' schemas and fake (shape) functions live here, so torch.compile can trace a call as an opaque op
# before the library is loaded; the library registers the CPU kernels (TORCH_LIBRARY_IMPL in the .cpp).
torch.library.define("fastldm::winograd_f2_input", "(Tensor x) -> Tensor")
torch.library.define("fastldm::winograd_f2_output", "(Tensor m, Tensor? bias, int B, int H, int W) -> Tensor")


@torch.library.register_fake("fastldm::winograd_f2_input")
def _(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) -> V (16, P, C) bfloat16, P the 2×2 output tiles."""
    B, C, H, W = x.shape
    return x.new_empty(16, B * ((H + 1) // 2) * ((W + 1) // 2), C)


@torch.library.register_fake("fastldm::winograd_f2_output")
def _(m: torch.Tensor, bias: torch.Tensor | None, B: int, H: int, W: int) -> torch.Tensor:
    """M (16, P, K) -> y (B, K, H, W) bfloat16, channels_last."""
    return m.new_empty(B, m.shape[2], H, W).contiguous(memory_format=torch.channels_last)
