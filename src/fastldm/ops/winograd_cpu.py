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

fp32 only: in bf16 the transforms' cancellation costs ~10 % of max|y| (winograd.py), and bf16 machines have
faster direct convolutions anyway. Limits, checked by `supports`: CPU, float32, 3×3 kernel, stride 1,
padding 1, groups 1, no autograd, an x86 CPU with AVX2 or AVX-512 and a working C++ toolchain the first time.
"""
from __future__ import annotations

import torch

from ..errors import BackendUnavailable
from . import native_build, winograd

LIBRARY = "winograd_cpu"


@torch.compiler.assume_constant_result
def unavailable() -> str | None:
    """Why the transforms cannot run on this machine (their library can be neither loaded nor built), or None.
    The first call may compile it (once per machine; see native_build)."""
    return native_build.load(LIBRARY)


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1,
             padding: int = 0) -> str | None:
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return f"winograd_cpu is for CPU tensors, got {x.device.type}"
    if x.dtype != torch.float32:
        return f"winograd_cpu runs float32 only (bf16/fp16 lose ~1-10 % of max|y| in its transforms), got {x.dtype}"
    why = winograd.supports(x, weight, bias, stride, padding)
    return why if why is not None else unavailable()


def conv(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (B, C, H, W) float32, u the transformed weights as (36, C, K), any strides (`winograd.transform_weight`
    gives (36, K, C): pass it transposed; contiguous (36, C, K) is up to 7 % faster at 32×32) -> the 3×3
    stride-1 padding-1 convolution (B, K, H, W), channels_last."""
    why = unavailable()
    if why is not None:
        raise BackendUnavailable(why)
    B, _, H, W = x.shape
    v = torch.ops.fastldm.winograd_input(x.contiguous(memory_format=torch.channels_last))  # (36, P, C)
    m = torch.bmm(v, u)  # (36, P, K)
    return torch.ops.fastldm.winograd_output(m, bias, B, H, W)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1,
           padding: int = 0) -> torch.Tensor:
    """The kernel layer's `conv2d` backend: `conv` with the weight transformed once and cached in the active
    selection's cache (winograd.weights())."""
    return conv(x, winograd.weights().get(weight).transpose(1, 2), bias)  # BLAS reads the transpose in place


# The ops' schemas and fake (shape) functions live here, so torch.compile can trace a call as an opaque op
# before the library is loaded; the library registers the CPU kernels (TORCH_LIBRARY_IMPL in the .cpp).
torch.library.define("fastldm::winograd_input", "(Tensor x) -> Tensor")
torch.library.define("fastldm::winograd_output", "(Tensor m, Tensor? bias, int B, int H, int W) -> Tensor")


@torch.library.register_fake("fastldm::winograd_input")
def _(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) -> V (36, P, C), P the 4×4 output tiles."""
    B, C, H, W = x.shape
    nH, nW = winograd.tile_counts(H, W)
    return x.new_empty(36, B * nH * nW, C)


@torch.library.register_fake("fastldm::winograd_output")
def _(m: torch.Tensor, bias: torch.Tensor | None, B: int, H: int, W: int) -> torch.Tensor:
    """M (36, P, K) -> y (B, K, H, W) channels_last."""
    return m.new_empty(B, m.shape[2], H, W).contiguous(memory_format=torch.channels_last)
