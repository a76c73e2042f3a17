"""Dynamic per-tensor uint8 quantization for CPUs in C++ (csrc/quantize_u8_cpu.cpp, built on first use by
native_build.py): runtime/quant.py's `quantize_activation` bit for bit, in two passes (a threaded min/max, then the
quantization), called as one op.

Why not TorchInductor's fusion of the same function, which int8 layers ran before: as fast per element, but each
call also crosses TorchDynamo's guards and the compiled region's entry, ~0.1 ms, at each of the ~200 quantized
inputs of an SD 1.5 UNet call (docs/benchmarks.md, "int8 attention").

Limits, checked by `supports`: a CPU tensor in fp32 or bf16, contiguous or channels_last (q keeps its strides), no
autograd, an x86 CPU with AVX2 or AVX-512 and a working C++ toolchain the first time.
"""
from __future__ import annotations

import torch

from ..errors import BackendUnavailable
from . import native_build

LIBRARY = "quantize_u8_cpu"

unavailable = native_build.loader(LIBRARY)


def supports(x: torch.Tensor) -> str | None:
    why = native_build.cpu_limits("quantize_u8", x)
    if why is None and not (x.is_contiguous() or x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        why = "quantize_u8 takes a contiguous or channels_last tensor"
    return why if why is not None else unavailable()


def quantize_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x -> (q uint8 with x's strides, scale fp32 0-dim, zero point int64 0-dim): x ≈ scale · (q − zero point)."""
    why = supports(x)
    if why is not None:
        raise BackendUnavailable(why)
    return torch.ops.fastldm.quantize_u8(x)


# The op's schema and fake function live here, so torch.compile can trace a call as one opaque op before the
# library is loaded; the library registers its CPU kernel (TORCH_LIBRARY_IMPL in the .cpp).
torch.library.define("fastldm::quantize_u8", "(Tensor x) -> (Tensor, Tensor, Tensor)")


@torch.library.register_fake("fastldm::quantize_u8")
def _(x: torch.Tensor):
    return (torch.empty_like(x, dtype=torch.uint8), x.new_empty((), dtype=torch.float32),
            x.new_empty((), dtype=torch.int64))
