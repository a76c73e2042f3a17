"""Where the Triton kernels can run: CUDA tensors, or CPU tensors through the Triton interpreter.

`triton.jit` decides at import time whether a kernel is compiled or interpreted (TRITON_INTERPRET=1, how
the tests run the kernels on CPU), so INTERPRET records that decision rather than re-reading the variable.
"""
from __future__ import annotations

import torch
from triton import knobs

INTERPRET: bool = knobs.runtime.interpret
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported(*tensors: torch.Tensor | None) -> str | None:
    """Why these tensors cannot go to a Triton kernel (device, dtype), or None. `None` entries are skipped."""
    ts = [t for t in tensors if t is not None]
    for t in ts:
        if t.device.type != "cuda" and not (INTERPRET and t.device.type == "cpu"):
            return (f"Triton kernels need CUDA tensors, got {t.device.type} "
                    f"(set TRITON_INTERPRET=1 before importing fastldm to run them on CPU, slowly)")
        if t.dtype not in DTYPES:
            return f"dtype {t.dtype} is not supported (float16, bfloat16 or float32)"
        if t.numel() >= 2 ** 31:
            return "tensors of 2^31 elements or more need 64-bit offsets, which these kernels do not compute"
    if len({t.device for t in ts}) > 1:
        return "tensors are on different devices"
    return None
