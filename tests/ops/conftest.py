"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

`triton.jit` fixes at import time whether a kernel is interpreted, so TRITON_INTERPRET=1 must be set
before anything imports fastldm.ops. This file sets it when tests/ops is collected first (pytest collects
directories in name order); tests/conftest.py should set it too, for runs where another test module
imports fastldm.ops earlier. On a GPU machine, TRITON_INTERPRET=0 runs the compiled kernels on CUDA.
(tests/ops is a package so that this file does not shadow tests/conftest.py, which test modules import
as `conftest`.)
"""
from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    from fastldm.ops.triton.device import INTERPRET
except ImportError:  # triton is not installed: the Triton tests skip, the rest still run
    INTERPRET = None


@pytest.fixture
def device() -> torch.device:
    """Where the Triton kernels run: the GPU with compiled kernels, else the CPU through the interpreter."""
    if INTERPRET is None:
        pytest.skip("triton is not installed")
    if INTERPRET != (os.environ["TRITON_INTERPRET"] == "1"):
        pytest.fail("fastldm.ops was imported before tests/ops/conftest.py set TRITON_INTERPRET; run "
                    "`TRITON_INTERPRET=1 pytest` or set it at the top of tests/conftest.py")
    if INTERPRET:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    return torch.device("cuda")


@pytest.fixture
def skip_bf16_dot():
    """Skip bf16 cases of kernels built on tl.dot under the interpreter: triton 3.9's interpreter
    multiplies bf16 operands as their raw 16-bit patterns (numpy has no bfloat16), giving garbage."""
    def skip(dtype: torch.dtype) -> None:
        if INTERPRET and dtype == torch.bfloat16:
            pytest.skip("the Triton interpreter cannot run tl.dot on bf16; covered on GPU")
    return skip


def assert_close(out: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor, floor: float = 0.0) -> None:
    """The flash-attn rule: max|out − ref| ≤ 2·max|torch_lowp − ref| + floor, with ref computed in float64
    and torch_lowp the reference backend in the dtype under test. `floor` is for fp32, where torch's own
    error can be near zero while another summation order, equally valid, is not.

    Under the interpreter, triton 3.9 casts fp32 to bf16 by truncation rather than round-to-nearest, so a
    bf16 output can be off by up to one bf16 ulp from the cast alone: one ulp of max|ref| is added."""
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten elements?)"
    err = (out.double() - ref.double()).abs().max().item()
    bound = 2 * (lowp.double() - ref.double()).abs().max().item() + floor
    if INTERPRET and out.dtype == torch.bfloat16:
        bound += torch.finfo(torch.bfloat16).eps * 2 ** math.floor(math.log2(ref.abs().max().item()))
    assert err <= bound, f"max error {err:.3e} > bound {bound:.3e}"


@pytest.fixture
def close():
    return assert_close


@pytest.fixture
def ieee_fp32():
    """fp32 references computed in fp32: cuDNN runs fp32 convolutions in TF32 by default on Ampere and later GPUs
    (a 10-bit mantissa, ~1e-3 relative error per conv), which would swamp the kernels' own errors. (torch's fp32
    matmuls already default to full precision.)"""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield
