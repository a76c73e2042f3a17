"""The int8 layers' activation quantizer in C++ (ops/quantize_u8_cpu.py): what it refuses and the shapes
torch.compile sees. Its bits against the eager quantizer: tests/runtime/test_optimize.py
(test_fused_quantizer_matches_eager). The first test to run builds the kernel; without a toolchain these skip."""
from __future__ import annotations

import pytest
import torch

from fastldm.errors import BackendUnavailable
from fastldm.ops import quantize_u8_cpu


@pytest.fixture(scope="module", autouse=True)
def built():
    why = quantize_u8_cpu.unavailable()
    if why is not None:
        pytest.skip(why)


def test_refuses_what_it_does_not_take():
    x = torch.randn(4, 8, 6, 6)
    assert quantize_u8_cpu.supports(x) is None
    assert quantize_u8_cpu.supports(x.to(memory_format=torch.channels_last)) is None
    assert "channels_last" in quantize_u8_cpu.supports(x[:, :, ::2])
    assert "float16" in quantize_u8_cpu.supports(x.half())
    with pytest.raises(BackendUnavailable, match="contiguous"):
        quantize_u8_cpu.quantize_u8(x.transpose(0, 1))


def test_channels_last_keeps_its_strides_and_the_range_covers_zero():
    x = (torch.rand(2, 16, 5, 7) + 1).to(memory_format=torch.channels_last)   # all positive: zero point 0
    q, scale, zero = quantize_u8_cpu.quantize_u8(x)
    assert q.stride() == x.stride() and q.dtype == torch.uint8 and zero.item() == 0
    assert torch.allclose(scale * (q.float() - zero), x, atol=scale.item() / 2 + 1e-6)


def test_the_shapes_torch_compile_sees_are_the_real_ones():
    torch.library.opcheck(torch.ops.fastldm.quantize_u8, (torch.randn(3, 40),),
                          test_utils=("test_schema", "test_faketensor"))
