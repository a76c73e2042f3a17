"""A tiny SD-style UNet with every kernel forced on matches the same UNet on the reference backend."""
from __future__ import annotations

import pytest
import torch

from fastldm import ops
from fastldm.config import UNetConfig
from fastldm.models import UNet2DConditionModel
from fastldm.ops import registry, winograd

pytest.importorskip("fastldm.ops.triton.flash_attention")


def tiny_unet() -> UNet2DConditionModel:
    cfg = UNetConfig(block_out_channels=(32, 64), layers_per_block=(1, 1), cross_attn=(True, False),
                     attention_heads=(2, 2), transformer_layers_per_block=(1, 1), norm_num_groups=8,
                     cross_attention_dim=16, sample_size=8)
    model = UNet2DConditionModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # seeded noise everywhere: no path hidden by zero init
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.15 * noise)
    return model


@pytest.mark.parametrize("attention,conv", [("triton", "winograd"), ("triton_softmax", "triton_winograd")])
def test_unet_with_all_kernels_matches_reference(device, ieee_fp32, attention, conv):
    model = tiny_unet().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g).to(device)
    ctx = torch.randn(2, 7, 16, generator=g).to(device)
    t = torch.tensor([10.0, 500.0], device=device)
    with torch.no_grad():
        with ops.use("reference"):
            ref = model(x, t, ctx)
        kernels = registry.Kernels(preferred={("conv2d", device.type, torch.float32): conv})  # 3x3 convs; the rest
        with registry.using(kernels):                                                      # fall back
            with ops.use(attention=attention, group_norm="triton", geglu="triton", gelu="triton"):
                out = model(x, t, ctx)
            assert winograd.weights().nbytes > 0  # the Winograd backend really ran
    # fp32 throughout; the error is dominated by Winograd's (~1e-5 of max|y| per conv, observed), compounded
    # over ~15 convolutions: 1e-4 of max|ref| leaves a margin of a few x over the observed error.
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err
