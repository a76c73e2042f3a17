"""GEGLU for CPUs in one pass (csrc/geglu_cpu.cpp, built on first use by native_build.py): each row's value and
gate read once, value · GELU(gate) computed in fp32 (exact GELU, ATen's vectorised erf) and rounded once.

Why not the plain-PyTorch form (reference.geglu): it makes three passes over the (rows, F) result — a contiguous
copy of the gate, GELU in place, the product in place — each rounding to the model's dtype. At SD 1.5's first
level (a (2, 4096, 2560) projection) they take several ms per transformer block on a 2-core CPU, where one
pass reads 2F and writes F values once (docs/benchmarks.md, "Fused GEGLU on CPU").

Limits, checked by `supports`: a CPU tensor in fp32 or bf16 whose last dim is even, no autograd, an x86 CPU with
AVX2 or AVX-512 and a working C++ toolchain the first time (see native_build.py).
"""
from __future__ import annotations

import torch

from ..errors import BackendUnavailable
from . import native_build

LIBRARY = "geglu_cpu"


unavailable = native_build.loader(LIBRARY)


def supports(x: torch.Tensor) -> str | None:
    why = native_build.cpu_limits("geglu_cpu", x)
    if why is None and (x.dim() == 0 or x.shape[-1] % 2):
        why = "geglu_cpu needs an even last dim (value and gate halves)"
    return why if why is not None else unavailable()


def geglu(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2F) -> (..., F): first half · GELU(second half)."""
    why = supports(x)
    if why is not None:
        raise BackendUnavailable(why)
    return torch.ops.fastldm.geglu_cpu(x)


# The op's schema and fake function live here, so torch.compile can trace a call as one opaque op before the
# library is loaded; the library registers its CPU kernel (TORCH_LIBRARY_IMPL in the .cpp).
torch.library.define("fastldm::geglu_cpu", "(Tensor x) -> Tensor")


@torch.library.register_fake("fastldm::geglu_cpu")
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
