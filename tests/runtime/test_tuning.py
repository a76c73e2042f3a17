"""Per-machine CPU defaults (runtime/tuning.py): measured on the model's shapes, cached on disk keyed by the CPU,
torch and the shapes, applied by `fastldm.load` and reported by `fastldm info --runtime` and the PNG."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import fastldm
from fastldm.cli import main
from fastldm.families import PRESETS
from fastldm.runtime import device, tuning
from fastldm.runtime.prepack import PackedConv2d, PackedLinear


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "fastldm" / "tuning"


def _fake_cpu(monkeypatch, flags):
    monkeypatch.setattr(tuning, "cpu_info", lambda: device.CPUInfo("test cpu", frozenset(flags), 2))


def _fake_times(monkeypatch, table: dict[str, float]):
    """autotune.time_ms answering from `table` by "<function> <dtype of the first argument>" (attention
    backends as "<module>.attention"), 1.0 for anything not in it."""
    calls = []

    def time_ms(fn, args, kwargs, dev, repeats=5):
        name = getattr(fn, "__name__", type(fn).__name__)
        if name == "attention":
            name = f"{fn.__module__.rsplit('.', 1)[-1]}.attention"
        key = f"{name} {str(args[0].dtype).removeprefix('torch.')}"
        calls.append(key)
        return table.get(key, 1.0)

    monkeypatch.setattr(tuning.autotune, "time_ms", time_ms)
    return calls


def test_emulated_bf16_loses_to_fp32(monkeypatch):
    _fake_cpu(monkeypatch, {"avx2"})
    _fake_times(monkeypatch, {"conv2d float32": 1.0, "mm float32": 1.0, "conv2d bfloat16": 5.0, "mm bfloat16": 20.0})
    choice = tuning.choose(PRESETS["sd1"])
    assert choice.dtype == "fp32" and choice.ms["conv bf16"] == 5.0


def test_bf16_measured_faster_is_taken_and_native_bf16_is_not_measured(monkeypatch):
    _fake_cpu(monkeypatch, {"avx2"})
    _fake_times(monkeypatch, {"conv2d float32": 4.0, "mm float32": 4.0, "conv2d bfloat16": 1.0, "mm bfloat16": 1.0})
    assert tuning.measure(PRESETS["sd1"]).dtype == "bf16"
    _fake_cpu(monkeypatch, {"avx512f", "avx512_bf16"})
    calls = _fake_times(monkeypatch, {})
    choice = tuning.measure(PRESETS["sd1"])
    assert choice.dtype == "bf16" and not any(c.startswith(("conv2d", "mm ")) for c in calls)


def test_fastest_attention_backend_wins(monkeypatch):
    _fake_cpu(monkeypatch, {"avx512f", "avx512_bf16"})
    others = {f"{b}.attention bfloat16": 10.0 for b in ("reference", "flash_attention_cpu", "blocked_attention")}
    # int8 attention, faster still, is an int8 UNet's choice (its own verdict), never the float model's
    _fake_times(monkeypatch, others | {"blocked_attention.attention bfloat16": 2.0,
                                       "int8_attention_cpu.attention bfloat16": 0.5})
    choice = tuning.measure(PRESETS["sd1"])
    assert choice.attention == "blocked" and choice.preferred() == {("attention", "cpu", choice.torch_dtype):
                                                                     "blocked"}


@pytest.mark.skipif(tuning.unpackable(torch.float32) is not None, reason="no oneDNN packing here")
@pytest.mark.parametrize("packed_ms,verdict", [(0.6, "faster"), (1.4, "slower")])
def test_packing_is_measured_on_the_deepest_conv_and_load_follows_it(monkeypatch, packed_ms, verdict):
    _fake_cpu(monkeypatch, {"avx2"})
    calls = _fake_times(monkeypatch, {"conv2d bfloat16": 9.0, "mm bfloat16": 9.0, "Conv2d float32": 1.0,
                                      "PackedConv2d float32": packed_ms})
    choice = tuning.measure(PRESETS["sd1"])
    # SD 1.5's deepest level at its default 512²: 1,280 channels at 8×8 (64 / 2³), CFG batch 2.
    assert choice.pack == verdict and choice.ms["conv 1280x8x8 packed"] == packed_ms
    assert {"Conv2d float32", "PackedConv2d float32"} <= set(calls)
    assert ("packed convs" in str(choice)) == (verdict == "faster")
    assert tuning.conv_weights(choice).startswith("packed" if verdict == "faster" else "plain (packing measured")
    monkeypatch.setattr("fastldm.api.choose", lambda config: choice)
    pipe = fastldm.load(fastldm.default_model())
    assert any(isinstance(m, PackedConv2d) for m in pipe.unet.modules()) == (verdict == "faster")


@pytest.mark.skipif(tuning.unpackable(torch.float32, "linear") is not None, reason="no oneDNN packing here")
@pytest.mark.parametrize("packed_ms,verdict", [(0.6, "faster"), (1.4, "slower")])
def test_linear_packing_is_measured_at_few_rows_and_load_follows_it(monkeypatch, packed_ms, verdict):
    _fake_cpu(monkeypatch, {"avx2"})
    calls = _fake_times(monkeypatch, {"conv2d bfloat16": 9.0, "mm bfloat16": 9.0, "Linear float32": 1.0,
                                      "PackedLinear float32": packed_ms})
    choice = tuning.measure(PRESETS["sd1"])
    # SD 1.5's deepest level at 512²: 8×8 = 64 tokens, CFG batch 2 -> 128 rows; its GEGLU product 1,280 -> 10,240.
    assert choice.pack_linear == verdict and choice.ms["linear 128x1280x10240 packed"] == packed_ms
    assert "PackedLinear float32" in calls
    assert ("linears" in str(choice)) == (verdict == "faster")
    assert tuning.linear_weights(choice).startswith("packed" if verdict == "faster" else "plain (packing measured")
    # SDXL at its 1024² default: 32×32 tokens at the deepest level, more than packing serves: measured at MAX_ROWS
    assert "linear 256x1280x10240 packed" in tuning.measure(PRESETS["sdxl"]).ms
    monkeypatch.setattr("fastldm.api.choose", lambda config: choice)
    pipe = fastldm.load(fastldm.default_model())
    assert any(isinstance(m, PackedLinear) for m in pipe.unet.modules()) == (verdict == "faster")
    assert not any(isinstance(m, torch.nn.Linear) for m in pipe.unet.modules()) == (verdict == "faster")


@pytest.mark.parametrize("winograd_ms,verdict", [(0.4, "faster"), (1.4, "slower")])
def test_winograd_is_measured_at_full_resolution_in_the_models_dtype(monkeypatch, winograd_ms, verdict):
    if tuning.winograd_unavailable(torch.float32) is not None:
        pytest.skip(tuning.winograd_unavailable(torch.float32))
    _fake_cpu(monkeypatch, {"avx2"})
    calls = _fake_times(monkeypatch, {"conv2d bfloat16": 9.0, "mm bfloat16": 9.0, "WinogradConv2d float32": winograd_ms})
    choice = tuning.measure(PRESETS["sd1"])
    # SD 1.5's first level at its default 512²: 320 channels at the full 64×64 latent, CFG batch 2.
    assert choice.winograd == verdict and choice.ms["conv 320x64x64 winograd"] == winograd_ms
    assert "WinogradConv2d float32" in calls
    assert ("winograd" in choice.packed_kinds) == (verdict == "faster")
    assert tuning.full_resolution_convs(choice).startswith("Winograd" if verdict == "faster" else "as the other")
    # Where bf16 is native the model runs bf16: Winograd F(2×2) in bf16 against a bf16 direct conv.
    _fake_cpu(monkeypatch, {"avx2", "avx512_bf16"})
    calls = _fake_times(monkeypatch, {"WinogradConv2d bfloat16": winograd_ms})
    choice = tuning.measure(PRESETS["sd1"])
    assert choice.dtype == "bf16" and choice.winograd == verdict and "WinogradConv2d bfloat16" in calls
    assert not any(c.startswith("WinogradConv2d float32") for c in calls)


@pytest.mark.parametrize("half_ms,verdict", [(0.4, "faster"), (1.4, "slower")])
def test_winograd_at_half_resolution_is_measured_in_a_16_bit_model_where_the_first_level_pays(monkeypatch, half_ms,
                                                                                              verdict):
    if tuning.winograd_unavailable(torch.float32) is not None:
        pytest.skip(tuning.winograd_unavailable(torch.float32))
    full_ms = {"full": 0.4}
    shapes = []

    def time_ms(fn, args, kwargs, dev, repeats=5):
        x = args[0]
        if isinstance(fn, tuning.WinogradConv2d):
            shapes.append(tuple(x.shape))
            return full_ms["full"] if x.shape[-1] == 64 else half_ms
        return 9.0 if x.dtype == torch.bfloat16 and fn in (torch.nn.functional.conv2d, torch.mm) else 1.0

    monkeypatch.setattr(tuning.autotune, "time_ms", time_ms)
    _fake_cpu(monkeypatch, {"avx2", "avx512_bf16"})
    choice = tuning.measure(PRESETS["sd1"])
    # SD 1.5's second level at its default 512²: 640 channels at a 32×32 latent, CFG batch 2, in bf16.
    assert choice.dtype == "bf16" and choice.winograd == "faster" and choice.winograd2 == verdict
    assert choice.ms["conv 640x32x32 winograd"] == half_ms and (2, 640, 32, 32) in shapes
    assert ("winograd2" in choice.packed_kinds) == (verdict == "faster")
    assert ("Winograd convs at every level that fits" in str(choice)) == (verdict == "faster")
    assert ("F(2x2, 3x3) in bf16" in tuning.half_resolution_convs(choice)) == (verdict == "faster")
    assert tuning.half_resolution_convs(choice).startswith("Winograd" if verdict == "faster" else "as the other")
    assert "deeper convs:" in tuning.describe(choice)
    # An fp32 model (emulated bf16 measured slower): no room for the transforms, so not measured.
    _fake_cpu(monkeypatch, {"avx2"})
    shapes.clear()
    choice = tuning.measure(PRESETS["sd1"])
    assert choice.dtype == "fp32" and choice.winograd == "faster" and (2, 640, 32, 32) not in shapes
    assert choice.winograd2.startswith("unavailable: an fp32 model") and "winograd2" not in choice.packed_kinds
    # Winograd slower at full resolution: the half is not tried either.
    _fake_cpu(monkeypatch, {"avx2", "avx512_bf16"})
    full_ms["full"], shapes[:] = 99.0, []
    choice = tuning.measure(PRESETS["sd1"])
    assert choice.winograd == "slower" and choice.winograd2 == "unavailable: Winograd measured slower at full resolution"
    assert shapes == [(2, 320, 64, 64)]


def test_a_layer_onednn_will_not_pack_leaves_the_weights_plain(monkeypatch):
    """The 1×1 probe of `unpackable` passed but the model's own deepest layer does not pack: plain, with why."""
    _fake_cpu(monkeypatch, {"avx2"})
    _fake_times(monkeypatch, {"conv2d bfloat16": 9.0, "mm bfloat16": 9.0})

    def refuse(*args):
        raise RuntimeError("could not create a primitive descriptor for a reorder primitive\nmore")

    monkeypatch.setattr(tuning, "unpackable", lambda dtype, kind="conv": None)
    real = tuning.autotune.time_ms
    monkeypatch.setattr(tuning.autotune, "time_ms", lambda fn, *a, **k: refuse() if isinstance(fn, PackedConv2d)
                        else real(fn, *a, **k))
    choice = tuning.measure(PRESETS["sd1"])
    assert choice.pack == "unavailable: could not create a primitive descriptor for a reorder primitive"
    assert tuning.conv_weights(choice) == "plain (could not create a primitive descriptor for a reorder primitive)"


def test_choice_is_cached_per_machine_and_model(monkeypatch, cache):
    _fake_cpu(monkeypatch, {"avx2"})
    calls = _fake_times(monkeypatch, {"conv2d bfloat16": 9.0, "mm bfloat16": 9.0})
    first = tuning.choose(PRESETS["sd1"])
    n = len(calls)
    assert tuning.choose(PRESETS["sd1"]) == first and len(calls) == n       # read back, not measured
    files = list(cache.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["dtype"] == "fp32"
    tuning.choose(PRESETS["sdxl"])                                          # other shapes: measured again
    _fake_cpu(monkeypatch, {"avx2", "avx512f"})
    tuning.choose(PRESETS["sd1"])                                           # another CPU: measured again
    assert len(list(cache.glob("*.json"))) == 3
    files[0].write_text("{broken")
    _fake_cpu(monkeypatch, {"avx2"})
    assert tuning.choose(PRESETS["sd1"]) == first                           # a damaged entry is redone


def test_load_applies_and_reports_the_choice(tmp_path):
    pipe = fastldm.load(fastldm.default_model())
    choice = pipe.runtime_choice
    assert choice.dtype == "fp32"                     # a 64-channel model: too small for bf16 to pay
    assert choice.pack in ("faster", "slower") or choice.pack.startswith("unavailable: ")
    assert any(isinstance(m, PackedConv2d) for m in pipe.unet.modules()) == (choice.pack == "faster")
    assert any(isinstance(m, PackedLinear) for m in pipe.unet.modules()) == (choice.pack_linear == "faster")
    assert pipe.kernels.preferred == choice.preferred()
    result = pipe.generate("a red cube", steps=2, seed=0)
    from fastldm.api import parameters_text

    from fastldm.images import parse_infotext

    # parsed, not searched: a choice with a comma in it ("packed convs, linears") is quoted in the infotext
    assert parse_infotext(parameters_text(pipe, result, 0))[2]["Version"] == f"fastldm {fastldm.__version__} ({choice})"
    assert fastldm.load(fastldm.default_model(), dtype="fp32").runtime_choice is None   # the user chose


def test_info_runtime(tmp_path):
    res = CliRunner().invoke(main, ["info", str(fastldm.default_model()), "--runtime", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "family:          ldm3d-4c" in res.output and "attention:" in res.output and "threads:         1" \
        in res.output and "conv weights:" in res.output and "full-res convs:" in res.output
    assert "deeper convs:" in res.output


def test_info_plans_with_the_cached_choice(monkeypatch):
    """`fastldm info` shows the plan `fastldm.load` makes: with the dtype and Winograd layers the machine's tuning
    chose when one is cached (nothing is measured without --runtime), else the untuned defaults."""
    path = str(fastldm.default_model())
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: pytest.fail("info without --runtime measured"))
    plain = CliRunner().invoke(main, ["info", path])
    assert plain.exit_code == 0, plain.output
    assert "Winograd:      none" in plain.output and "weights:       text_encoder fp32" in plain.output
    choice = tuning.RuntimeChoice("fp32", "reference", "slower", winograd="faster", winograd2="faster")
    monkeypatch.setattr(tuning, "cached", lambda config: choice)
    res = CliRunner().invoke(main, ["info", path])
    # fp32 weights leave no room for the half-resolution transforms: the full-resolution ones only
    assert "Winograd:      full-resolution convs" in res.output, res.output


@pytest.mark.parametrize("wino_ms,verdict", [(0.5, "faster"), (2.0, "slower")])
def test_int8_winograd_is_measured_on_the_first_levels_convolutions(monkeypatch, wino_ms, verdict):
    """Where int8 and F(2×2)'s transforms are available: oneDNN's int8 convolution against int8 Winograd at SD 1.5's
    first two levels (320 channels at 64×64, 640 at 32×32, CFG batch 2), summed; said in `fastldm info --runtime`."""
    from fastldm.runtime import quant

    if quant.winograd_unavailable() is not None:
        pytest.skip(quant.winograd_unavailable())
    _fake_cpu(monkeypatch, {"avx2", "avx512_bf16"})
    calls = _fake_times(monkeypatch, {"Int8WinogradConv2d bfloat16": wino_ms})
    choice = tuning.measure(PRESETS["sd1"])
    assert choice.int8_winograd == verdict and choice.ms["conv 320x64x64 int8 winograd"] == wino_ms
    assert choice.ms["conv 640x32x32 int8 winograd"] == wino_ms and "conv 640x32x32 int8" in choice.ms
    assert {"Int8Conv2d bfloat16", "Int8WinogradConv2d bfloat16"} <= set(calls)
    assert tuning.int8_convs(choice).startswith("Winograd" if verdict == "faster" else "oneDNN's int8")
    assert "int8 3x3 convs:" in tuning.describe(choice)
    monkeypatch.setattr(tuning, "int8_winograd_unavailable", lambda: "no oneDNN int8 here")
    assert tuning.measure(PRESETS["sd1"]).int8_winograd == "unavailable: no oneDNN int8 here"


@pytest.mark.parametrize("int8_ms,verdict", [(0.5, "faster"), (2.0, "slower")])
def test_int8_attention_is_measured_against_the_float_choice(monkeypatch, int8_ms, verdict):
    """The first-level self-attention (4096 tokens, head dim 40 for SD 1.5) in int8 against the backend the float
    model chose, timed beside it; `fastldm.load(quant="int8")` then gives the UNet's attention layers int8."""
    from fastldm.ops import int8_attention_cpu

    if int8_attention_cpu.unavailable() is not None:
        pytest.skip(int8_attention_cpu.unavailable())
    _fake_cpu(monkeypatch, {"avx2", "avx512_bf16"})
    calls = _fake_times(monkeypatch, {"int8_attention_cpu.attention bfloat16": int8_ms,
                                      "blocked_attention.attention bfloat16": 0.9})
    choice = tuning.measure(PRESETS["sd1"])
    assert choice.attention == "blocked" and choice.int8_attention == verdict
    assert choice.ms["attention blocked (beside int8)"] == 0.9 and choice.ms["attention int8_cpu"] == int8_ms
    assert calls.count("int8_attention_cpu.attention bfloat16") == 1      # never among the float candidates
    assert tuning.int8_attention(choice).startswith("int8 GEMMs" if verdict == "faster" else "as the float")
    assert "int8 attention:" in tuning.describe(choice)
    monkeypatch.setattr(tuning, "int8_unsupported", lambda: "no oneDNN int8 here")
    assert tuning.measure(PRESETS["sd1"]).int8_attention == "unavailable: no oneDNN int8 here"
