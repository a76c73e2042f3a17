"""The UNet's convolutions as Winograd layers (runtime/winograd_conv.py): which layers, what they compute, what
they keep, and how `fastldm.load` applies them."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import fastldm
from fastldm.families import PRESETS
from fastldm.models import UNet2DConditionModel
from fastldm.ops import winograd, winograd_cpu, winograd_f2_cpu
from fastldm.runtime import optimize
from fastldm.runtime.prepack import PackedConv2d
from fastldm.runtime.winograd_conv import (WinogradConv2d, fits, level_convs, levels_that_fit,
                                          transformed_bytes, use_winograd, winograd_levels)
from fastldm.testing import psnr, randomize_

from .test_optimize import TINY, tiny_unet, unet_inputs

pytestmark = pytest.mark.skipif((winograd_cpu.unavailable() or winograd_f2_cpu.unavailable()) is not None,
                                reason=f"{winograd_cpu.unavailable() or winograd_f2_cpu.unavailable()}")


def test_the_layers_at_full_resolution_are_chosen():
    # test_optimize's TINY: two levels of one resnet each; the up blocks have layers + 1 resnets.
    assert level_convs(tiny_unet(), 0) == [
        "down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv2", "up_blocks.0.upsamplers.0.conv",
        "up_blocks.1.resnets.0.conv1", "up_blocks.1.resnets.0.conv2", "up_blocks.1.resnets.1.conv1",
        "up_blocks.1.resnets.1.conv2"]
    with torch.device("meta"):
        sd = UNet2DConditionModel(PRESETS["sd1"].unet)
    names = level_convs(sd, 0)
    # SD 1.5: 2 down resnets and 3 up resnets of two 3×3 convs, and up_blocks.2's upsampler (640 -> 640); not
    # conv_in (4 channels in), conv_out (4 out) or the first level's stride-2 downsampler.
    assert len(names) == 11 and "up_blocks.2.upsamplers.0.conv" in names
    assert not {"conv_in", "conv_out", "down_blocks.0.downsamplers.0.conv"} & set(names)
    assert all(sd.get_submodule(n).out_channels in (320, 640) for n in names)
    # Half the resolution: down_blocks.1's resnets, up_blocks.2's (not its upsampler: that one runs at full
    # resolution) and up_blocks.1's upsampler (1280 channels, feeding up_blocks.2).
    half = level_convs(sd, 1)
    assert len(half) == 11 and "up_blocks.1.upsamplers.0.conv" in half and not set(half) & set(names)
    assert not any(n.startswith(("up_blocks.2.upsamplers", "down_blocks.0", "down_blocks.1.downsamplers")) for n in half)
    assert {sd.get_submodule(n).out_channels for n in half} == {640, 1280}
    # The deepest level: down_blocks.3's resnets, up_blocks.0's (not its upsampler) and the mid block's.
    deepest = level_convs(sd, 3)
    assert len(deepest) == 14 and sum(n.startswith("mid_block.") for n in deepest) == 4
    assert level_convs(sd, 4) == [] and len(level_convs(tiny_unet(), 1)) == 10   # TINY: 6 + its mid block's 4


def test_a_winograd_unet_computes_what_the_plain_one_does_and_keeps_its_weights():
    ref = tiny_unet()
    unet = copy.deepcopy(ref)
    assert use_winograd(unet) == 7
    x, t, c = unet_inputs()
    with torch.inference_mode():
        want, got = ref(x, t, c), unet(x, t, c)
    # ~1e-5 of max|y| per layer (ops/winograd.py), through seven of them and the layers after
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    state, plain = unet.state_dict(), ref.state_dict()
    assert state.keys() == plain.keys()     # exports see a plain model: no transformed weights
    assert all(torch.equal(state[k], plain[k]) for k in plain)
    layer = unet.down_blocks[0].resnets[0].conv1
    assert isinstance(layer, WinogradConv2d) and layer.u.shape == (36, 32, 32)  # (36, C, K)


THREE = dataclasses.replace(TINY, block_out_channels=(32, 32, 256), layers_per_block=(1, 1, 1),
                            cross_attn=(True, True, True), attention_heads=(2, 2, 2), transformer_layers_per_block=(1, 1, 1))


def test_the_deeper_levels_join_only_where_their_transforms_fit():
    """Levels below the first join, from the top, while the weights and every transform stay within the fp32
    weights' bytes: in a bf16 UNet (F(2×2)'s transforms, 16/9 of a bf16 weight) SD 1.5's first three levels of
    four, never in an fp32 one (F(4×4)'s, 8× a bf16 weight)."""
    weights, levels = 859_520_964, [16_588_800, 62_668_800, 191_692_800, 250_675_200]  # SD 1.5's UNet
    assert transformed_bytes(9, torch.bfloat16) == 32 and transformed_bytes(9, torch.float32) == 144
    assert fits(weights, 2, transformed_bytes(sum(levels[:3]), torch.bfloat16))
    assert not fits(weights, 2, transformed_bytes(sum(levels), torch.bfloat16))
    assert levels_that_fit(levels, weights, torch.bfloat16, 4) == 3 and levels_that_fit(levels, weights, torch.bfloat16, 2) == 2
    assert levels_that_fit(levels, weights, torch.float32, 4) == 1 and levels_that_fit(levels, weights, torch.float32, 0) == 0
    assert levels_that_fit([1000], 1000, torch.float32, 1) == 1      # level 0 whenever asked for
    fp32, tiny = randomize_(UNet2DConditionModel(THREE), seed=0, std=0.1).eval().requires_grad_(False), tiny_unet()
    assert use_winograd(copy.deepcopy(fp32), 3) == 7 and use_winograd(tiny.bfloat16(), 2) == 17
    assert winograd_levels(tiny) == 2 and winograd_levels(fp32) == 0
    ref = copy.deepcopy(fp32).bfloat16()
    unet = copy.deepcopy(ref)
    assert use_winograd(unet, 3) == 24 and winograd_levels(unet) == 3
    assert all(isinstance(unet.get_submodule(n), WinogradConv2d) for n in level_convs(unet, 2))
    x, t, c = unet_inputs()
    with torch.inference_mode():
        want = fp32(x, t, c)
        err = (unet(x.bfloat16(), t, c.bfloat16()).float() - want).abs().max()
        plain = (ref(x.bfloat16(), t, c.bfloat16()).float() - want).abs().max()
    assert err <= 2 * plain + 1e-3 * want.abs().max()   # as close to fp32 as the plain bf16 UNet (rounding only)


def test_the_transform_is_made_in_chunks_in_fp32_as_the_fp64_one():
    # 150 output channels: two whole chunks of TRANSFORM_CHUNK and a partial one; a channels_last weight as in a UNet
    conv = nn.Conv2d(48, 150, 3, padding=1).requires_grad_(False).to(memory_format=torch.channels_last)
    u = WinogradConv2d(conv).u
    ref = winograd.transform_weight(conv.weight, torch.float64).transpose(1, 2)  # (36, C, K)
    assert u.dtype == torch.float32 and u.shape == (36, 48, 150) and u.is_contiguous()
    # fp32 sums of 9 products by G's entries (1/4 .. 1/24): a few fp32 roundings of max|U|
    assert (u.double() - ref).abs().max() <= 3e-7 * ref.abs().max()


def test_new_weights_are_transformed_again():
    unet, other = tiny_unet(), tiny_unet()
    for p in other.parameters():
        p.data.mul_(0.5)
    use_winograd(unet)
    unet.load_state_dict(other.state_dict())
    x, t, c = unet_inputs()
    with torch.inference_mode():
        want, got = other(x, t, c), unet(x, t, c)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_a_bf16_unet_runs_f2_in_bf16():
    unet = tiny_unet()
    use_winograd(unet)
    low = copy.deepcopy(unet).to(torch.bfloat16)
    layer = low.down_blocks[0].resnets[0].conv1
    # made again from the bf16 weight, as F(2×2)'s bf16 (16, C, K)
    assert layer.weight.dtype == torch.bfloat16 and layer.u.dtype == torch.bfloat16 and layer.u.shape == (16, 32, 32)
    assert "F(2x2, 3x3) in bf16" in repr(layer)
    g = torch.Generator().manual_seed(5)
    wide = nn.Conv2d(32, 32, 3, padding=1).requires_grad_(False)
    wide.weight.copy_(layer.weight.float())
    wide.bias.copy_(layer.bias.float())
    with torch.inference_mode():
        x = torch.randn(2, 32, 8, 8, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
        got = layer(x)
        assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, winograd_f2_cpu.conv(x, layer.u, layer.bias))
        # Against fp64: F(2×2)'s bf16 tiles, weights and products cost ~2× a bf16 convolution's error
        # (tests/ops/test_winograd_f2_cpu.py); 1e-2 of max|y| leaves 2× room over the 5e-3 measured.
        ref = torch.nn.functional.conv2d(x.double(), wide.weight.double(), wide.bias.double(), padding=1)
        assert (got.double() - ref).abs().max() <= 1e-2 * ref.abs().max()
        # The whole UNet: as close to its fp32 self as a bf16 UNet without Winograd is.
        x, t, c = unet_inputs()
        want = tiny_unet()(x, t, c)
        err = (low(x, t, c).float() - want).abs().max()
        plain = (tiny_unet().to(torch.bfloat16)(x, t, c).float() - want).abs().max()
        assert err <= 2 * plain + 1e-3 * want.abs().max()


def test_another_dtype_runs_the_plain_convolution():
    unet = tiny_unet()
    use_winograd(unet)
    low = copy.deepcopy(unet).to(torch.float16)
    x, t, c = unet_inputs()
    ref = tiny_unet().to(torch.float16)
    with torch.inference_mode():
        torch.testing.assert_close(low(x, t, c), ref(x, t, c), rtol=0, atol=0)


def test_optimize_swaps_them_in_before_packing_the_rest():
    unet = tiny_unet()
    optimize.optimize({"unet": unet}, torch.device("cpu"), pack=frozenset({"conv", "winograd"}))
    assert sum(isinstance(m, WinogradConv2d) for m in unet.modules()) == 7
    assert not any(isinstance(m, nn.Conv2d) for m in unet.modules())  # the others packed
    assert isinstance(unet.conv_in, PackedConv2d) and isinstance(unet.down_blocks[0].resnets[0].conv1, WinogradConv2d)
    assert "winograd" in optimize.packable(tiny_unet(torch.bfloat16), frozenset({"winograd"}))  # F(2×2)
    assert "winograd" not in optimize.packable(tiny_unet(torch.float16), frozenset({"winograd"}))
    # "winograd2" comes with "winograd" only, and adds the deeper levels where they fit (all three here, bf16)
    both = frozenset({"winograd", "winograd2"})
    assert optimize.packable(tiny_unet(torch.bfloat16), both) == both
    assert optimize.packable(tiny_unet(torch.float16), both) == frozenset()
    three = randomize_(UNet2DConditionModel(THREE), seed=0, std=0.1).eval().requires_grad_(False).bfloat16()
    two = copy.deepcopy(three)
    optimize.optimize({"unet": three}, torch.device("cpu"), pack=both | {"conv"})
    assert sum(isinstance(m, WinogradConv2d) for m in three.modules()) == 24 and winograd_levels(three) == 3
    optimize.optimize({"unet": two}, torch.device("cpu"), pack=both | {"conv"}, winograd_levels=2)  # a plan's cap
    assert sum(isinstance(m, WinogradConv2d) for m in two.modules()) == 14 and winograd_levels(two) == 2


def _images(pipe):
    return pipe.generate("a red cube on a table", steps=4, seed=3).raw  # (1, H, W, C) in [0, 1]


def test_load_uses_winograd_where_measured_faster_and_the_images_agree(monkeypatch):
    from fastldm.runtime import tuning

    base = fastldm.load(fastldm.default_model())
    faster = base.runtime_choice.__class__(**{**base.runtime_choice.__dict__, "winograd": "faster", "dtype": "fp32"})
    monkeypatch.setattr("fastldm.api.choose", lambda config: faster)
    pipe = fastldm.load(fastldm.default_model())
    with torch.device("meta"):
        expected = len(level_convs(UNet2DConditionModel(pipe.config.unet), 0))
    assert sum(isinstance(m, WinogradConv2d) for m in pipe.unet.modules()) == expected > 0
    assert "Winograd full-resolution convs" in str(faster)
    assert tuning.full_resolution_convs(faster).startswith("Winograd F(4x4, 3x3)")
    if base.runtime_choice.winograd != "faster":
        assert not any(isinstance(m, WinogradConv2d) for m in base.unet.modules())
    # Images: Winograd's rounding (1e-5 of a layer's output) does not show in 8-bit pixels beyond a few levels.
    assert psnr(_images(pipe), _images(base)) > 40
    # Memory plans count the transformed weights: "fast" keeps them, "low" gives them up.
    fast = fastldm.load(fastldm.default_model(), memory="fast")
    assert sum(isinstance(m, WinogradConv2d) for m in fast.unet.modules()) == expected
    assert fast.memory_plan.winograd > 0 and fast.memory.winograd_levels == 1
    low = fastldm.load(fastldm.default_model(), memory="low")
    assert not any(isinstance(m, WinogradConv2d) for m in low.unet.modules()) and low.memory_plan.winograd == 0
    # A pipeline loaded without a plan makes its planner on first use: it sees the Winograd layers.
    assert pipe.memory.winograd_levels == 1
    assert base.memory.winograd_levels == (base.runtime_choice.winograd == "faster")
    # The half-resolution layers measured faster too: an fp32 model has no room for their transforms.
    both = faster.__class__(**{**faster.__dict__, "winograd2": "faster"})
    monkeypatch.setattr("fastldm.api.choose", lambda config: both)
    for memory in (None, "fast"):
        again = fastldm.load(fastldm.default_model(), memory=memory)
        assert sum(isinstance(m, WinogradConv2d) for m in again.unet.modules()) == expected
        assert again.memory.winograd_levels == 1 and "full-resolution convs" in again.memory_plan.describe()
