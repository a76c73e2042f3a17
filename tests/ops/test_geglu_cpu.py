"""GEGLU in one C++ pass (ops/geglu_cpu.py) against the fp64 reference, within the bound the Triton kernels meet
(twice the reference backend's own error in the dtype under test), and what `auto` picks on a CPU.

The first test to run builds the kernel (once per machine, ~10-30 s; native_build.py) unless a build is cached;
without a C++ toolchain these tests skip.
"""
from __future__ import annotations

import pytest
import torch

from fastldm import ops
from fastldm.ops import geglu_cpu, reference

from .conftest import assert_close

FP32_FLOOR = 4e-6  # |GELU(x)|·|value| ≲ 16 here: a few fp32 ulps for another erf and exp (A&S 7.1.26, 1.5e-7)


@pytest.fixture(scope="module", autouse=True)
def built():
    why = geglu_cpu.unavailable()
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 2 * 37), (3, 2 * 1300), (2, 64, 2 * 1280), (1, 2)])
def test_geglu_matches_the_reference(dtype, shape):
    # 37: a partial vector; 1300: whole vectors and a partial one; SD 1.5's deepest (64 tokens, 1280); F = 1
    x = (2 * torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))).to(dtype)
    y = geglu_cpu.geglu(x)
    assert y.shape == (*shape[:-1], shape[-1] // 2) and y.dtype == dtype and y.is_contiguous()
    assert_close(y, reference.geglu(x.double()), reference.geglu(x), FP32_FLOOR if dtype == torch.float32 else 0.0)


def test_strided_rows_and_extreme_gates():
    x = 3 * torch.randn(6, 2 * 40, generator=torch.Generator().manual_seed(3))
    x[0, 40:] = torch.tensor([-30.0, -9.0, -0.0, 0.0, 1e-30, 9.0, 30.0, 1e4] * 5)  # GELU's tails, ±0, tiny
    x[0, :40] = 1.0
    strided = x[::2]  # rows 2 apart: read in place, the output contiguous
    for inp in (x, strided, x.t().contiguous().t()):  # the last: unit stride across rows, not along them
        assert_close(geglu_cpu.geglu(inp), reference.geglu(inp.double()), reference.geglu(inp), FP32_FLOOR)
    y = geglu_cpu.geglu(x[:1])[0, :8]
    assert torch.equal(y[:4], torch.zeros(4)) and y[5] == 9.0 and y[7] == 1e4


def test_auto_picks_it_on_cpu_and_refuses_what_it_does_not_take():
    x = torch.randn(4, 16)
    assert ops.select("geglu", x) == "fused_cpu"
    torch.testing.assert_close(ops.geglu(x), reference.geglu(x), rtol=0, atol=4e-6)
    assert "odd" not in (geglu_cpu.supports(x) or "") and "even" in geglu_cpu.supports(torch.randn(4, 5))
    assert "float16" in geglu_cpu.supports(x.half()) and "backward" in geglu_cpu.supports(x.requires_grad_())
    assert ops.select("geglu", x.half().detach()) == "reference"


def test_the_shape_torch_compile_sees_is_the_real_one():
    torch.library.opcheck(torch.ops.fastldm.geglu_cpu, (torch.randn(2, 3, 10),),
                          test_utils=("test_schema", "test_faketensor"))
