"""The C++ in-place row softmax against an fp64 oracle, within 2x torch's own error in the same dtype.

The first test to run builds the kernel (once per machine; native_build.py) unless a build is cached;
without a C++ toolchain they skip, and blocked attention uses torch's softmax.
"""
from __future__ import annotations

import pytest
import torch

from fastldm.errors import BackendUnavailable
from fastldm.ops import softmax_cpu

FP32_FLOOR = 1e-6  # probabilities ≤ 1 from sums of up to 4096 terms: a few fp32 ulps for summation order


@pytest.fixture(scope="module")
def built():
    why = softmax_cpu.unavailable()
    if why is not None:
        pytest.skip(why)


def check(x: torch.Tensor, out: torch.Tensor) -> None:
    """DESIGN rule 6: max|out − ref| ≤ 2·max|torch.softmax in x's dtype − ref| (+ a floor in fp32)."""
    ref = torch.softmax(x.double(), dim=-1)
    err = (out.double() - ref).abs().max().item()
    bound = 2 * (torch.softmax(x, dim=-1).double() - ref).abs().max().item()
    bound += FP32_FLOOR if x.dtype == torch.float32 else 0.0
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    assert err <= bound, f"max error {err:.3e} > bound {bound:.3e}"


# (rows, row length): blocked attention's blocks at SD 1.5's 512² (512 × 4096, 2048 × 1024) and lengths
# that leave a tail after the two-vector main loop (1, 5, 37, 77, 1000) with AVX2's and AVX-512's widths.
SHAPES = [(512, 4096), (2048, 1024), (64, 256), (7, 1000), (9, 77), (3, 37), (4, 5), (2, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,M", SHAPES, ids=[f"{r}x{m}" for r, m in SHAPES])
def test_matches_fp64_oracle_in_place(built, rows, M, dtype):
    g = torch.Generator().manual_seed(rows + M)
    scale = 8.0  # attention-like spread: most of a row's probabilities are far below its largest
    x = (scale * torch.randn(rows, M, generator=g)).to(dtype)
    y = x.clone()
    out = softmax_cpu.softmax_(y)
    assert out.data_ptr() == y.data_ptr()  # in place
    check(x, y)
    assert torch.allclose(y.double().sum(-1), torch.ones(rows, dtype=torch.float64), atol=M * 2 ** -8)


def test_extreme_rows(built):
    """Huge spreads underflow to (near) zero rather than NaN; a constant row is uniform; −∞ entries get 0."""
    x = torch.tensor([[0.0, -1e4, 3e4, -3e38], [5.0] * 4, [1.0, float("-inf"), 2.0, float("-inf")]])
    y = softmax_cpu.softmax_(x.clone())
    ref = torch.softmax(x.double(), dim=-1)
    assert torch.isfinite(y).all() and (y.double() - ref).abs().max() < 1e-6


def test_strided_rows_leave_the_gaps_alone(built):
    """Rows of a wider tensor (row stride > M), as a view: only the viewed columns change."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 100, generator=g).bfloat16()
    before = wide.clone()
    softmax_cpu.softmax_(wide[:, 10:90])
    check(before[:, 10:90], wide[:, 10:90])
    assert torch.equal(wide[:, :10], before[:, :10]) and torch.equal(wide[:, 90:], before[:, 90:])


def test_unsupported_inputs_say_why(built):
    assert "float32 or bfloat16" in softmax_cpu.supports(torch.zeros(2, 4, dtype=torch.float16))
    assert "(rows, M)" in softmax_cpu.supports(torch.zeros(2, 3, 4))
    assert "unit stride" in softmax_cpu.supports(torch.zeros(4, 6).T)
    with pytest.raises(BackendUnavailable, match="float32 or bfloat16"):
        softmax_cpu.softmax_(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="unit stride"):  # the kernel checks too, for direct op calls
        torch.ops.fastldm.softmax_cpu_(torch.zeros(4, 6).T)


def test_registered_schema_and_shape_match_the_kernel(built):
    """The schema (mutates its argument) and fake function torch.compile traces with (torch.library.opcheck)."""
    torch.library.opcheck(torch.ops.fastldm.softmax_cpu_, (torch.randn(3, 40),),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastldm.softmax_cpu_, (torch.randn(3, 40).bfloat16(),),
                          test_utils=("test_schema", "test_faketensor"))
