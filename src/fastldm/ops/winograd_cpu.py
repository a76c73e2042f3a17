"""Winograd F(4×4, 3×3) convolution for CPUs: C++ transforms around one batched GEMM.

The algorithm and its costs are those of fastldm/ops/winograd.py (Lavin & Gray 2016): 36 multiplies per 16
outputs per channel pair instead of 144, transformed weights 4× the 3×3 weights, fp32 error 5-36× direct
convolution's (~1e-5 of max|y|). What differs is where the time goes. The 36 GEMMs of a tile batch run
2.5-3.5× faster than oneDNN's direct convolution at SD 1.5's full-resolution shapes (320→320 at 32×32,
batch 2: 5.7 ms against 18.6 on 2 threads of an AVX2 EPYC), but the plain-PyTorch transforms (einsums over
unfolded tiles, permutes) cost more than that saving: 0.44-0.82× of oneDNN overall. Here the transforms are
one pass each in C++ (csrc/winograd_cpu.cpp, built on first use by native_build.py): channels_last input read
tile by tile with channels along the SIMD lanes, V written as (36, P, C) so that `bmm(V, U)` with U (36, C, K)
gives M (36, P, K) in the layout the output transform reads, which writes the channels_last result with the
bias added. At those shapes the transforms take 0.2-3 ms of a 6-31 ms convolution: 1.9-3.0× oneDNN's time
(docs/benchmarks.md, "Winograd convolution in C++").

The arithmetic is fp32 whatever the image: in bf16 the transforms' cancellation would cost ~10 % of max|y|
(winograd.py). A bf16 image is widened as the input transform reads it and the output rounded to bf16 as the
output transform writes it, so a bf16 model's layer rounds only its output, like a bf16 direct convolution,
and its GEMMs run in fp32 — which can still beat a native bf16 direct convolution (2× fp32's rate) where
Winograd saves 4× the multiplies; runtime/tuning.py measures which. Limits, checked by `supports`: CPU,
float32 or bfloat16, 3×3 kernel, stride 1, padding 1, groups 1, no autograd, an x86 CPU with AVX2 or AVX-512
and a working C++ toolchain the first time.
"""
from __future__ import annotations

import torch

from ..errors import BackendUnavailable
from . import native_build, winograd

LIBRARY = "winograd_cpu"


unavailable = native_build.loader(LIBRARY)


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1,
             padding: int = 0) -> str | None:
    why = native_build.cpu_limits("winograd_cpu", x)
    if why is None and weight.device.type != "cpu":
        why = f"winograd_cpu is for CPU tensors, got a {weight.device.type} weight"
    return why or winograd.supports(x, weight, bias, stride, padding) or unavailable()


def conv(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (B, C, H, W) float32 or bfloat16, u the float32 transformed weights as (36, C, K), any strides
    (`winograd.transform_weight` gives (36, K, C): pass it transposed; contiguous (36, C, K) is up to 7 % faster
    at 32×32) -> the 3×3 stride-1 padding-1 convolution (B, K, H, W) in x's dtype, channels_last."""
    why = unavailable()
    if why is not None:
        raise BackendUnavailable(why)
    B, _, H, W = x.shape
    v = torch.ops.fastldm.winograd_input(x.contiguous(memory_format=torch.channels_last))  # (36, P, C)
    m = torch.bmm(v, u)  # (36, P, K) fp32
    return torch.ops.fastldm.winograd_output(m, bias, B, H, W, x.dtype)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1,
           padding: int = 0) -> torch.Tensor:
    """The kernel layer's `conv2d` backend: `conv` with the weight transformed once and cached in the active
    selection's cache (winograd.weights())."""
    u = winograd.weights().get(weight, torch.float32)  # fp32 arithmetic whatever the image's dtype
    return conv(x, u.transpose(1, 2), bias)  # BLAS reads the transpose in place


# The ops' schemas and fake (shape) functions live here, so torch.compile can trace a call as an opaque op
# before the library is loaded; the library registers the CPU kernels (TORCH_LIBRARY_IMPL in the .cpp).
torch.library.define("fastldm::winograd_input", "(Tensor x) -> Tensor")
torch.library.define("fastldm::winograd_output",
                     "(Tensor m, Tensor? bias, int B, int H, int W, ScalarType? dtype=None) -> Tensor")


@torch.library.register_fake("fastldm::winograd_input")
def _(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) -> V (36, P, C) float32, P the 4×4 output tiles."""
    B, C, H, W = x.shape
    nH, nW = winograd.tile_counts(H, W)
    return x.new_empty(36, B * nH * nW, C, dtype=torch.float32)


@torch.library.register_fake("fastldm::winograd_output")
def _(m: torch.Tensor, bias: torch.Tensor | None, B: int, H: int, W: int,
      dtype: torch.dtype | None = None) -> torch.Tensor:
    """M (36, P, K) -> y (B, K, H, W) channels_last, in dtype (default float32)."""
    return m.new_empty(B, m.shape[2], H, W, dtype=dtype or torch.float32).contiguous(
        memory_format=torch.channels_last)
