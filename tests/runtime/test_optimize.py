"""CPU runtime defaults (runtime/device.py, runtime/optimize.py) and the int8 path (runtime/quant.py)."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import randomize_
from fastldm import ops
from fastldm.config import UNetConfig
from fastldm.families import PRESETS
from fastldm.models import UNet2DConditionModel
from fastldm.runtime import device, optimize, quant
from fastldm.testing import psnr

# Two levels, attention at both; a 16x16 latent gives 256 tokens at the first level, enough for the
# blocked attention backend to take the self-attention there.
TINY = UNetConfig(block_out_channels=(32, 64), layers_per_block=(1, 1), cross_attn=(True, True),
                  attention_heads=(2, 2), transformer_layers_per_block=(1, 1), norm_num_groups=8,
                  cross_attention_dim=16)


def tiny_unet(dtype=torch.float32) -> UNet2DConditionModel:
    return randomize_(UNet2DConditionModel(TINY), seed=0, std=0.1).eval().requires_grad_(False).to(dtype)


def unet_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500.0, 20.0]), torch.randn(2, 77, 16, generator=g)


def fake_cpu(monkeypatch, flags: set[str]) -> None:
    monkeypatch.setattr(device, "cpu_info", lambda: device.CPUInfo("test cpu", frozenset(flags), 2))


def test_default_dtype(monkeypatch):
    sd = PRESETS["sd1"]
    tiny = sd.replace(unet=TINY)
    fake_cpu(monkeypatch, {"avx512f", "avx512_bf16"})
    assert device.default_dtype(torch.device("cpu"), sd) == torch.bfloat16
    assert device.default_dtype(torch.device("cpu"), tiny) == torch.float32  # too small for bf16 to pay
    assert device.default_dtype(torch.device("cuda"), sd) == torch.float16
    fake_cpu(monkeypatch, {"avx512f", "avx2"})  # no native bf16 dot products: oneDNN would emulate
    assert device.default_dtype(torch.device("cpu"), sd) == torch.float32


def test_cpu_info_reads_this_machine():
    info = device.cpu_info()
    assert info.cpus >= 1 and info.name
    assert info.bf16 == bool(info.flags & device.BF16_FLAGS)


def test_configure_process_caps_threads_at_available_cpus(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/inductor-test")  # restored by monkeypatch
    try:
        monkeypatch.setattr(device, "available_cpus", lambda: 1)
        assert device.configure_process(allocator=False) == 1
        assert device.configure_process(threads=2, allocator=False) == 2  # an explicit count is obeyed
    finally:
        torch.set_num_threads(before)


def test_optimize_channels_last_and_errors():
    modules = {"unet": tiny_unet(), "vae": torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))}
    optimize.optimize(modules, torch.device("cpu"))
    assert modules["unet"].conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert modules["vae"][0].weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="unknown quantization"):
        optimize.optimize(modules, torch.device("cpu"), quant="int4")
    with pytest.raises(RuntimeError, match="CPU only"):
        optimize.optimize(modules, torch.device("cuda"), quant="int8")


def test_bf16_channels_last_within_twice_torch_bf16_error():
    """The CPU default path (bf16, channels_last, blocked attention) against the fp32 model: at most 2x the
    error of the same bf16 weights run by torch's reference ops in NCHW (DESIGN rule 6)."""
    ref_model = tiny_unet()
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        ref = ref_model(x, t, ctx).double()
        low = copy.deepcopy(ref_model).to(torch.bfloat16)
        with ops.use("reference"):
            torch_bf16 = low(x, t, ctx).double()
        fast = copy.deepcopy(low).to(memory_format=torch.channels_last)
        assert ops.select("attention", *[torch.zeros(2, 2, 256, 16, dtype=torch.bfloat16)] * 3) == "blocked"
        ours = fast(x, t, ctx).double()
    assert (ours - ref).abs().max() <= 2 * (torch_bf16 - ref).abs().max()


def test_int8_close_to_bf16():
    model = tiny_unet(torch.bfloat16).to(memory_format=torch.channels_last)
    q = copy.deepcopy(model)
    n = quant.quantize_int8(q, fused=False)  # the compiled quantizer is checked against eager below
    assert n > 0 and isinstance(q.down_blocks[0].resnets[0].conv1, quant.Int8Conv2d)
    assert isinstance(q.conv_in, torch.nn.Conv2d) and not isinstance(q.conv_in, quant.Int8Conv2d)  # skipped
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        ref, out = model(x, t, ctx).float(), q(x, t, ctx).float()
    # Per-tensor 8-bit activations and per-channel 8-bit weights: ~1% of max|y| per layer, measured 5.1% of
    # max|output| after the tiny UNet's quantized layers (random weights, no outlier handling); 10% leaves
    # room without hiding a broken layer (a wrong scale or zero point errs by the order of the output itself).
    assert (out - ref).abs().max() <= 0.10 * ref.abs().max()
    span = ref.max() - ref.min()
    assert psnr((out - ref.min()) / span, (ref - ref.min()) / span) > 30  # measured 44 dB


def test_quantize_activation_roundtrip():
    x = torch.nn.functional.silu(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3)
    q, scale, zero = quant.quantize_activation(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    # Asymmetric: the SiLU range [-0.28, max] spread over all 256 levels, so the rounding error is half a step.
    assert ((q.float() - zero) * scale - x).abs().max() <= scale / 2 + 1e-6
    assert scale <= (x.max() - x.min()) / 255 + 1e-6


def test_fused_quantizer_matches_eager():
    """The inductor-compiled quantizer (the default of quantize_int8) gives the eager one's bits."""
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(2, 8, 6, 6, generator=g).bfloat16().to(memory_format=torch.channels_last),
              torch.randn(10, 24, generator=g).bfloat16()):
        for a, b in zip(quant.fused_quantizer()(x), quant.quantize_activation(x)):
            assert torch.equal(a, b)
