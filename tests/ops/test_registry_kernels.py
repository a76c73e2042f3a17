"""How the kernels sit in the registry: forced backends fail loudly, `auto` falls back to the reference,
interpreted and approximate kernels are opt-in, and a preference table reorders `auto`."""
from __future__ import annotations

import pytest
import torch

from fastldm import ops
from fastldm.ops import registry


def test_forced_triton_on_unsupported_input_raises(device):
    q = torch.randn(1, 2, 8, 320, device=device)  # head dim 320: beyond the kernel's 256
    with ops.use("triton"), pytest.raises(ops.BackendUnavailable) as e:
        ops.attention(q, q, q)
    assert str(e.value) == ("backend 'triton' cannot run attention: head dim 320 exceeds the kernel's 256; "
                            "choose another with fastldm.ops.use(...)")


def test_auto_falls_back_to_reference(device):
    q = torch.randn(1, 2, 8, 320, device=device)
    assert ops.select("attention", q, q, q) == "reference"
    torch.testing.assert_close(ops.attention(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q))
    x = torch.randn(2, 12, 4, 4, device=device, dtype=torch.float64)  # float64: no Triton kernel takes it
    assert ops.select("group_norm", x, 4, None, None, 1e-5) == "reference"


def test_auto_never_picks_an_interpreted_kernel(device):
    if device.type != "cpu":
        pytest.skip("only meaningful under the interpreter")
    x = torch.randn(2, 12, 4, 4)
    assert ops.select("group_norm", x, 4, None, None, 1e-5) == "reference"
    with ops.use("triton"):
        assert ops.select("group_norm", x, 4, None, None, 1e-5) == "triton"


def test_winograd_is_opt_in_and_preference_reorders_auto():
    x, w3, w1 = torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3), torch.randn(4, 4, 1, 1)
    with torch.no_grad():
        assert ops.select("conv2d", x, w3, None, stride=1, padding=1) == "reference"
    with torch.no_grad(), registry.prefer({("conv2d", "cpu", torch.float32): "winograd"}):
        assert ops.select("conv2d", x, w3, None, stride=1, padding=1) == "winograd"
        assert ops.select("conv2d", x.double(), w3.double(), None, stride=1, padding=1) == "reference"  # other dtype
        assert ops.select("conv2d", x, w1, None, stride=1, padding=0) == "reference"  # winograd cannot: fall back
        y = ops.conv2d(x, w3, None, 1, 1)  # outputs O(10): Winograd's fp32 error is ~1e-5 of that
        torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w3, padding=1), rtol=0, atol=1e-4)


def test_prefer_rejects_unknown_backends():
    with pytest.raises(ValueError, match="not a registered backend"):
        registry.prefer({("conv2d", "cpu", torch.float32): "cudnn"})
