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


@pytest.mark.parametrize("C,K,S", [(64, 64, 8), (33, 70, 5)])
def test_int8_pointwise_conv_runs_as_a_matmul_with_the_convolutions_products(C, K, S):
    """A 1×1 convolution's int8 form multiplies its channels_last pixels by the weight as oneDNN's int8 matmul: the
    convolution's own products, so within an fp32 accumulation's rounding of oneDNN's int8 convolution."""
    g = torch.Generator().manual_seed(C + K)
    conv = torch.nn.Conv2d(C, K, 1).requires_grad_(False).bfloat16()
    conv.weight.copy_(torch.randn(K, C, 1, 1, generator=g) / C ** 0.5)
    x = torch.nn.functional.silu(torch.randn(2, C, S, S, generator=g)).bfloat16()
    layer = quant.Int8Conv2d(conv, quant.quantize_activation, torch.bfloat16)
    as_conv = quant.Int8Conv2d(conv, quant.quantize_activation, torch.bfloat16)
    as_conv.pointwise = False
    as_conv.packed = torch.ops.onednn.qconv_prepack(*quant._weight_int8(conv.weight), 1.0, 128, [1, 1], [0, 0],
                                                    [1, 1], 1, None)
    with torch.inference_mode():
        y, want = layer(x), as_conv(x)
    assert layer.pointwise and y.shape == (2, K, S, S) and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), want.float(), rtol=1e-2, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("C,K,S", [(64, 64, 16), (33, 70, 9), (48, 40, 5)])  # odd sizes: partial tiles and vectors
def test_int8_winograd_layer_is_within_a_few_int8_roundings(C, K, S):
    if quant.winograd_unavailable() is not None:
        pytest.skip(quant.winograd_unavailable())
    g = torch.Generator().manual_seed(C + K)
    conv = torch.nn.Conv2d(C, K, 3, padding=1).requires_grad_(False).bfloat16()
    conv.weight.copy_(torch.randn(K, C, 3, 3, generator=g) / (3 * C ** 0.5))
    x = torch.nn.functional.silu(torch.randn(2, C, S, S, generator=g)).bfloat16()
    with torch.inference_mode():
        ref = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        direct = quant.Int8Conv2d(conv, quant.quantize_activation, torch.bfloat16)(x)
        y = quant.Int8WinogradConv2d(conv, quant.quantize_activation, torch.bfloat16)(x)
    assert y.shape == ref.shape and y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    # F(2×2)'s tiles span up to 4× the input's range in the same 8 bits, and U is quantized per plane: measured
    # 2.1-3.1e-2 of max|y| against the int8 convolution's 1.0-1.7e-2 (benchmarks/winograd_f2_int8_probe.py).
    peak = ref.abs().max()
    err, err_direct = (y.double() - ref).abs().max(), (direct.double() - ref).abs().max()
    assert err <= 5e-2 * peak and err <= 4 * err_direct


def test_int8_winograd_unet_stays_close_to_bf16():
    if quant.winograd_unavailable() is not None:
        pytest.skip(quant.winograd_unavailable())
    model = tiny_unet(torch.bfloat16).to(memory_format=torch.channels_last)
    plain, wino = copy.deepcopy(model), copy.deepcopy(model)
    assert quant.quantize_int8(plain, fused=False) == quant.quantize_int8(wino, fused=False, winograd=True)
    swapped = [n for n, m in wino.named_modules() if isinstance(m, quant.Int8WinogradConv2d)]
    assert len(swapped) == 17 and all(".conv" in n for n in swapped)  # every 3×3 stride-1 conv but conv_in/out
    assert isinstance(wino.down_blocks[0].downsamplers[0].conv, quant.Int8Conv2d)  # stride 2 stays direct
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        ref, a, b = model(x, t, ctx).float(), plain(x, t, ctx).float(), wino(x, t, ctx).float()
    span = ref.max() - ref.min()
    # The plain int8 UNet measured 44 dB against bf16 (test_int8_close_to_bf16); Winograd's ~2× per-layer error
    # costs a few dB of that, far above the 30 dB the int8 path promises.
    assert psnr((b - ref.min()) / span, (ref - ref.min()) / span) > 35
    assert (b - ref).abs().max() <= 3 * (a - ref).abs().max() + 0.01 * ref.abs().max()


def test_int8_attention_unet_stays_close_to_bf16():
    """optimize(int8_attention=True) gives an int8 UNet's attention layers int8 GEMMs (ops/int8_attention_cpu.py):
    the first level's self-attention (256 tokens) runs it, and the output stays as close to bf16 as the int8
    UNet's own."""
    from fastldm.ops import int8_attention_cpu

    if int8_attention_cpu.unavailable() is not None:
        pytest.skip(int8_attention_cpu.unavailable())
    model = tiny_unet(torch.bfloat16)
    cpu = torch.device("cpu")
    plain = optimize.optimize({"unet": copy.deepcopy(model)}, cpu, quant="int8", dtype=torch.bfloat16)["unet"]
    int8 = optimize.optimize({"unet": copy.deepcopy(model)}, cpu, quant="int8", dtype=torch.bfloat16,
                             int8_attention=True)["unet"]
    layers = [m for m in int8.modules() if isinstance(m, optimize.Attention)]
    assert layers and all(m.backend == int8_attention_cpu.BACKEND for m in layers)
    assert all(m.backend is None for m in plain.modules() if isinstance(m, optimize.Attention))
    x, t, ctx = unet_inputs()
    with torch.inference_mode():
        ref = model(x.bfloat16(), t, ctx.bfloat16()).float()
        a, b = plain(x.bfloat16(), t, ctx.bfloat16()).float(), int8(x.bfloat16(), t, ctx.bfloat16()).float()
    span = ref.max() - ref.min()
    db = lambda y: psnr((y - ref.min()) / span, (ref - ref.min()) / span)
    assert not torch.equal(a, b) and db(b) > 35 and db(b) > db(a) - 3


def test_quantize_activation_roundtrip():
    x = torch.nn.functional.silu(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3)
    q, scale, zero = quant.quantize_activation(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    # Asymmetric: the SiLU range [-0.28, max] spread over all 256 levels, so the rounding error is half a step.
    assert ((q.float() - zero) * scale - x).abs().max() <= scale / 2 + 1e-6
    assert scale <= (x.max() - x.min()) / 255 + 1e-6


@pytest.mark.parametrize("native", [True, False], ids=["cpp", "inductor"])
def test_fused_quantizer_matches_eager(native, monkeypatch):
    """The fused quantizer (the default of quantize_int8) gives the eager one's bits: the C++ op (any length, either
    dtype, channels_last kept, ranges on one side of 0, all zeros, and a strided input it leaves to eager) and,
    where that cannot be built, the inductor-compiled function."""
    from fastldm.ops import quantize_u8_cpu

    if native and quantize_u8_cpu.unavailable() is not None:
        pytest.skip(quantize_u8_cpu.unavailable())
    if not native:
        monkeypatch.setattr(quantize_u8_cpu, "unavailable", lambda: "no compiler here")
    quantize = quant.fused_quantizer.__wrapped__()    # a fresh one: fused_quantizer() caches the process's
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 8, 6, 6, generator=g).bfloat16().to(memory_format=torch.channels_last),
              torch.randn(10, 24, generator=g).bfloat16(), 3 * torch.randn(7, 1003, generator=g),
              torch.rand(5, 77, generator=g) + 0.5, -torch.rand(300, generator=g).bfloat16(), torch.zeros(4, 4),
              torch.randn(8, 40, generator=g)[:, ::2]]
    for x in inputs:
        got, want = quantize(x), quant.quantize_activation(x)
        assert got[0].stride() == x.stride() or not x.is_contiguous()
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)


