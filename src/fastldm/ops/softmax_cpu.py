"""Row softmax for CPUs, in place, for blocked attention's score blocks.

The kernel is C++ (csrc/softmax_cpu.cpp, built on first use by native_build.py): per row a max pass, an
exp-and-sum pass into an fp32 buffer (exp2 as in flash_attention_cpu, 2.3e-7 relative error) and a
normalising pass that rounds once to the row's dtype; rows split over torch's intra-op threads.

Why not `torch.softmax`: on the (512, 4096) bf16 score blocks of SD 1.5's 512² self-attention it took
0.46 s of a 4.5 s step on a 2-core AVX-512 machine, several times what three cached passes cost
(docs/benchmarks.md, "Softmax on CPU"). `softmax_` is in place, so a block needs no second buffer.

Limits, checked by `supports`: a 2-D CPU tensor in fp32 or bf16 with unit stride along its rows, no
autograd, an x86 CPU with AVX2 or AVX-512 and a working C++ toolchain the first time (see native_build.py).
"""
from __future__ import annotations

import torch

from ..errors import BackendUnavailable
from . import native_build

LIBRARY = "softmax_cpu"


unavailable = native_build.loader(LIBRARY)


def supports(x: torch.Tensor) -> str | None:
    why = native_build.cpu_limits("softmax_cpu", x)
    if why is None and (x.dim() != 2 or (x.stride(1) != 1 and x.shape[1] > 1)):
        why = "softmax_cpu takes a (rows, M) tensor with unit stride along its rows"
    return why if why is not None else unavailable()


def softmax_(x: torch.Tensor) -> torch.Tensor:
    """x (rows, M) -> x, each row replaced by its softmax."""
    why = supports(x)
    if why is not None:
        raise BackendUnavailable(why)
    return torch.ops.fastldm.softmax_cpu_(x)


# The op's schema and fake function live here, so torch.compile can trace a call as one opaque op before the
# library is loaded; the library registers its CPU kernel (TORCH_LIBRARY_IMPL in the .cpp).
torch.library.define("fastldm::softmax_cpu_", "(Tensor(a!) x) -> Tensor(a!)")


@torch.library.register_fake("fastldm::softmax_cpu_")
def _(x: torch.Tensor) -> torch.Tensor:
    return x
