"""Triton GELU (erf, tanh, quick) and fused GEGLU against the reference."""
from __future__ import annotations

import pytest
import torch

from fastldm import ops
from fastldm.ops import reference

activations = pytest.importorskip("fastldm.ops.triton.activations")

FP32_FLOOR = 1e-6  # |GELU(x)| ≤ |x| ≈ 4 here: ~10 fp32 ulps of slack for a different erf/sigmoid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh", "quick"])
def test_gelu(device, close, dtype, approximate):
    x = (2 * torch.randn(3, 5, 1031, generator=torch.Generator().manual_seed(0))).to(device, dtype)  # 1031: odd
    out = torch.full_like(x, float("nan"))
    assert activations.gelu(x, approximate, out=out) is out
    close(out, reference.gelu(x.double(), approximate), reference.gelu(x, approximate),
          FP32_FLOOR if dtype == torch.float32 else 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("features", [37, 1300])  # one partial block; two blocks, the second partial
def test_geglu(device, close, dtype, features):
    x = (2 * torch.randn(2, 7, 2 * features, generator=torch.Generator().manual_seed(1))).to(device, dtype)
    out = torch.full((2, 7, features), float("nan"), device=device, dtype=dtype)
    assert activations.geglu(x, out=out) is out
    close(out, reference.geglu(x.double()), reference.geglu(x), 4 * FP32_FLOOR if dtype == torch.float32 else 0.0)


def test_through_registry(device):
    x = torch.randn(4, 2 * 24, device=device)
    with ops.use("triton"):
        assert ops.select("geglu", x) == "triton" and ops.select("gelu", x) == "triton"
        y = ops.geglu(x)
    assert y.shape == (4, 24)
    torch.testing.assert_close(y, reference.geglu(x), rtol=1e-5, atol=1e-6)


def test_supports_states_limits(device):
    x = torch.randn(4, 6, device=device)
    assert "odd" in activations.supports_geglu(x[:, :5].contiguous())
    assert "contiguous" in activations.supports_gelu(x.t())
    assert "approximation" in activations.supports_gelu(x, "sigmoid")
    assert "dtype" in activations.supports_gelu(x.double())


def test_reference_geglu_in_place_at_inference_only():
    """Without autograd the reference writes GELU and the product over a copy of the gate (one buffer less);
    with it, it allocates both so backward works. Same values either way to a few fp32 ulps (the contiguous copy
    takes ATen's vectorised erf, the strided half its scalar one), and the input is never written."""
    x = torch.randn(3, 5, 16, requires_grad=True)
    before = x.detach().clone()
    with torch.no_grad():
        y = reference.geglu(x)
    z = reference.geglu(x)
    z.sum().backward()
    torch.testing.assert_close(y, z.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(x.detach(), before) and x.grad is not None
