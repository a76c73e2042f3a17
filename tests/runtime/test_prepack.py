"""Convolutions and linears with oneDNN-packed weights (runtime/prepack.py) against F.conv2d and F.linear, and
where load packs them.

Tolerance: oneDNN runs the same fp32 product either way, only the weight's layout differs, so the sums may be
ordered differently: relative 1e-5 of the output's range (fp32 round-off over ≤ 1,152 products is ~1e-6)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from torch import nn

from fastldm import load
from fastldm.runtime import optimize, prepack
from fastldm.testing import rel_err, save_random_folder

from .test_optimize import tiny_unet, unet_inputs

pytestmark = pytest.mark.skipif(prepack.unsupported(torch.float32) is not None,
                                reason=f"{prepack.unsupported(torch.float32)}")
TOL = 1e-5


def conv(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, stride, padding, bias=bias).requires_grad_(False)


@pytest.mark.parametrize("cin,cout,k,stride,padding,bias,hw", [
    (64, 64, 3, 1, 1, True, 8),      # SD's 3×3 resnet conv
    (32, 64, 1, 1, 0, True, 8),      # a 1×1 shortcut / proj_in
    (64, 64, 3, 2, 1, True, 9),      # a stride-2 downsample, odd side
    (4, 32, 3, 1, 1, True, 5),       # conv_in: 4 channels, padded to oneDNN's block inside the packing
    (32, 4, 3, 1, 1, False, 6),      # conv_out-like, no bias
])
def test_packed_conv_matches_f_conv2d(cin, cout, k, stride, padding, bias, hw):
    layer = conv(cin, cout, k, stride, padding, bias, seed=cin + cout)
    packed = prepack.PackedConv2d(layer)
    x = torch.randn(2, cin, hw, hw)
    with torch.inference_mode():
        ref = F.conv2d(x, layer.weight, layer.bias, stride, padding)
        out = packed(x)                                   # NCHW in: packed takes any layout
        out_cl = packed(x.to(memory_format=torch.channels_last))
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) < TOL and rel_err(out_cl, ref) < TOL
    assert packed.weight.is_mkldnn and packed.packed_for == tuple(x.shape)


@pytest.mark.parametrize("shape,bias", [
    ((2, 64, 320), True),       # a token sequence, CFG batch 2: 128 rows
    ((154, 768), False),        # the text context's K/V projection, 2-D
    ((2, 1280), True),          # the time embedding: 2 rows
    ((3, 5, 7, 320), True),     # more leading dims
])
def test_packed_linear_matches_f_linear(shape, bias):
    torch.manual_seed(shape[-1] + len(shape))
    layer = nn.Linear(shape[-1], 96, bias=bias).requires_grad_(False)
    packed = prepack.PackedLinear(layer)
    x = torch.randn(*shape)
    with torch.inference_mode():
        ref = F.linear(x, layer.weight, layer.bias)
        out = packed(x)
        strided = packed(x.transpose(0, -2).contiguous().transpose(0, -2)) if x.dim() > 2 else out  # not contiguous
    assert out.shape == ref.shape and rel_err(out, ref) < TOL and rel_err(strided, ref) < TOL
    assert packed.weight.is_mkldnn and packed.packed_for == prepack.PackedLinear.FEW


def test_a_linear_packs_only_for_few_rows_and_its_numbers_do_not_depend_on_earlier_calls(monkeypatch):
    """Calls of more than MAX_ROWS rows run plain (packing measured level or slower there), smaller ones packed,
    whatever came before: MKL's and oneDNN's products round differently, so a call's numbers must depend on its
    own rows alone (a request gives the same image whatever ran before it). One packing serves every small row
    count."""
    monkeypatch.setattr(prepack, "REPACK_AFTER", 1000)   # the convolutions' patience does not apply
    torch.manual_seed(0)
    layer = nn.Linear(64, 32).requires_grad_(False)
    packed = prepack.PackedLinear(layer)
    inputs = {"many": torch.randn(prepack.MAX_ROWS + 1, 64), "few": torch.randn(prepack.MAX_ROWS, 64),
              "two": torch.randn(2, 64)}
    with torch.inference_mode():
        first = {name: prepack.PackedLinear(layer)(x) for name, x in inputs.items()}   # each on a fresh layer
        for name in ("many", "many", "few", "two", "many", "few", "two", "many"):
            out = packed(inputs[name])
            assert torch.equal(out, first[name]), name
            assert rel_err(out, F.linear(inputs[name], layer.weight, layer.bias)) < TOL
            assert packed.packed_for == (None if name == "many" else prepack.PackedLinear.FEW)
    assert packed.packs == 2   # packed at the 1st small call and again after the 2nd large one, not per row count


def test_a_new_shape_runs_plain_until_it_stays(monkeypatch):
    """Packed at the first call's shape; another shape goes back to the plain weight; a shape met REPACK_AFTER
    calls in a row is packed for. Every answer stays right."""
    monkeypatch.setattr(prepack, "REPACK_AFTER", 3)
    layer = conv(64, 64, 3, padding=1, seed=3)
    packed = prepack.PackedConv2d(layer)
    expect = [((2, 64, 16, 16), (2, 64, 16, 16)),  # (input shape, what the weight is packed for afterwards)
              ((2, 64, 16, 16), (2, 64, 16, 16)),
              ((1, 64, 4, 4), None),                # another shape: plain again
              ((2, 64, 16, 16), None),              # the first shape is not special
              ((1, 64, 4, 4), None), ((1, 64, 4, 4), None),
              ((1, 64, 4, 4), (1, 64, 4, 4)),       # third call in a row: packed for it
              ((3, 64, 7, 5), None)]
    with torch.inference_mode():
        for shape, after in expect:
            x = torch.randn(shape)
            assert rel_err(packed(x), F.conv2d(x, layer.weight, layer.bias, 1, 1)) < TOL
            assert packed.packed_for == after and packed.weight.is_mkldnn == (after is not None)
    assert packed.packs == 2
    # Packing swaps the tensor the module holds; the plain nn.Conv2d it came from keeps its own.
    assert not layer.weight.is_mkldnn


def test_to_and_the_state_dict_see_the_plain_weight():
    """`.to()` (any `_apply`) unpacks first and the layer packs again at its next call; the state dict of a packed
    layer is the plain weight."""
    layer = conv(32, 16, 3, padding=1, seed=4)
    packed = prepack.PackedConv2d(layer)
    x = torch.randn(2, 32, 6, 6)
    with torch.inference_mode():
        packed(x)
        assert packed.weight.is_mkldnn and torch.equal(packed.state_dict()["weight"], layer.weight)
        packed.to(torch.float32)
        assert packed.packed_for is None and not packed.weight.is_mkldnn
        assert torch.equal(packed.weight, layer.weight)
        assert rel_err(packed(x), F.conv2d(x, layer.weight, layer.bias, 1, 1)) < TOL
        assert packed.packed_for == tuple(x.shape) and packed.packs == 1


def test_threads_sharing_a_layer_at_different_shapes(monkeypatch):
    """A pipeline is shared by threads (the kernel choice is a context variable, so two requests may run one
    UNet at once): calls at different shapes swap the layer's weight under each other. Each call must go on with
    the tensor it read — a plain weight handed to the packed kernel is slow but right; a packed one handed to
    F.conv2d would raise. REPACK_AFTER 2 makes the layer pack and unpack often; a short switch interval makes
    the threads interleave between the bytecodes of one call."""
    import sys
    import threading
    monkeypatch.setattr(prepack, "REPACK_AFTER", 2)
    interval = sys.getswitchinterval()
    layer = conv(32, 32, 3, padding=1, seed=11)
    packed = prepack.PackedConv2d(layer)
    shapes = [(2, 32, 8, 8), (1, 32, 5, 7), (3, 32, 6, 6)]
    inputs = {s: torch.randn(s) for s in shapes}
    refs = {s: F.conv2d(x, layer.weight, layer.bias, 1, 1) for s, x in inputs.items()}
    errors, worst = [], []
    start = threading.Barrier(2 * len(shapes))

    def run(shape):
        try:
            start.wait()
            with torch.inference_mode():
                worst.append(max(rel_err(packed(inputs[shape]), refs[shape]) for _ in range(200)))
        except Exception as e:  # noqa: BLE001 - reported below with the thread's shape
            errors.append(f"{shape}: {e!r}")

    threads = [threading.Thread(target=run, args=(s,)) for s in shapes * 2]
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors and len(worst) == 2 * len(shapes) and max(worst) < TOL
    assert packed.packs > len(shapes)  # the threads did swap the weight under each other


def test_prepacked_unet_matches_and_holds_no_extra_weights():
    plain, packed = tiny_unet(), tiny_unet()
    n_convs = sum(isinstance(m, nn.Conv2d) for m in plain.modules())
    bytes_before = sum(t.numel() * t.element_size() for t in (*packed.parameters(), *packed.buffers()))
    n_linears = sum(isinstance(m, nn.Linear) for m in plain.modules())
    assert prepack.prepack(packed) == n_convs + n_linears
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in packed.modules())
    x, t, ctx = unet_inputs(seed=5)
    with torch.inference_mode():
        ref = plain(x, t, ctx)
        out = packed(x, t, ctx)
    assert rel_err(out, ref) < TOL
    # the packed weights replace the plain ones: the module's bytes (as memory accounting counts them) stay put
    assert sum(t.numel() * t.element_size() for t in (*packed.parameters(), *packed.buffers())) == bytes_before
    assert packed.state_dict().keys() <= plain.state_dict().keys()  # opaque packed tensors are not exported


def test_optimize_packs_float_unets_on_cpu_only():
    cpu = torch.device("cpu")
    kinds = lambda m: {type(c).__name__ for c in m.modules()}
    mods = optimize.optimize({"unet": tiny_unet()}, cpu)
    assert {"PackedConv2d", "PackedLinear"} <= kinds(mods["unet"]) and not {"Conv2d", "Linear"} & kinds(mods["unet"])
    assert {"Conv2d", "Linear"} <= kinds(optimize.optimize({"unet": tiny_unet()}, cpu, pack=frozenset())["unet"])
    convs_only = kinds(optimize.optimize({"unet": tiny_unet()}, cpu, pack=frozenset({"conv"}))["unet"])
    assert "PackedConv2d" in convs_only and "Linear" in convs_only and "PackedLinear" not in convs_only
    vae = nn.Sequential(nn.Conv2d(3, 8, 3))
    assert isinstance(optimize.optimize({"vae": vae}, cpu)["vae"][0], nn.Conv2d)  # the UNet only
    half = optimize.optimize({"unet": tiny_unet(torch.float16)}, cpu)["unet"]   # fp16: oneDNN does not pack it
    assert not {"PackedConv2d", "PackedLinear"} & kinds(half)
    assert optimize.packable(mods["unet"]) == frozenset()   # already packed: nothing left to pack


def test_unsupported_names_the_reason():
    assert prepack.unsupported(torch.float32) is None and prepack.unsupported(torch.float32, "linear") is None
    assert "float16" in prepack.unsupported(torch.float16)
    assert "linear" in prepack.unsupported(torch.float16, "linear")


def test_load_packs_the_unet_and_memory_low_does_not(tmp_path):
    """fastldm.load packs the UNet of a float CPU pipeline; a memory plan that stores weights in 16 bits and
    widens them per call keeps them plain; the images agree with the unpacked pipeline's."""
    save_random_folder("tiny:sd1", tmp_path / "m", dtype=torch.float32)
    fast = load(tmp_path / "m", dtype="fp32")
    assert any(isinstance(m, prepack.PackedConv2d) for m in fast.unet.modules())
    low = load(tmp_path / "m", dtype="fp32", memory="low")
    low.acquire("unet")
    assert not any(isinstance(m, prepack.PackedConv2d) for m in low.unet.modules())
    kw = {"prompt": "a red cube", "steps": 3, "width": 64, "height": 64, "seed": 7}
    a = fast.generate(**kw).images[0]
    b = low.generate(**kw).images[0]
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert diff.max() <= 2  # fp16-stored weights vs fp32: a couple of levels at most on a tiny model


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl", "ldm3d", "lcm"])
def test_packed_pipelines_of_every_family_draw_what_plain_ones_do(tmp_path, monkeypatch, family):
    """Through whole generations of each family's tiny model (SDXL's added conditioning, LDM3D's RGBD VAE, v-
    prediction, LCM's guidance embedding): a pipeline with packed convolutions and linears at one size, then another size (the layers go back
    to plain weights), then two images at once (a new batch, packed again after REPACK_AFTER calls) draws what a
    plain pipeline does."""
    monkeypatch.setattr(prepack, "REPACK_AFTER", 3)
    save_random_folder(f"tiny:{family}", tmp_path / "m", dtype=torch.float32)
    packed = load(tmp_path / "m", dtype="fp32")
    with monkeypatch.context() as m:
        m.setattr("fastldm.api.KINDS", frozenset())  # what load packs when tuning did not say
        plain = load(tmp_path / "m", dtype="fp32")
    assert not any(isinstance(m, prepack.PackedLayer) for m in plain.unet.modules())
    assert any(isinstance(m, prepack.PackedLinear) for m in packed.unet.modules())
    for kw in ({"width": 16, "height": 16}, {"width": 24, "height": 16}, {"width": 24, "height": 16, "n": 2}):
        kw |= {"prompt": "a red cube", "steps": 4, "seed": 3, "sampler": "Euler"}
        for a, b in zip(packed.generate(**kw).images, plain.generate(**kw).images, strict=True):
            diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
            assert diff.max() <= 1, (family, kw)  # the same fp32 sums in another order: a rounding step at most
    convs = [m for m in packed.unet.modules() if isinstance(m, prepack.PackedConv2d)]
    assert convs and all(m.packs == 3 and m.packed_for is not None for m in convs)  # 1st call, then each new shape


def test_forcing_a_conv2d_backend_keeps_plain_layers(tmp_path):
    """A forced conv2d backend must reach the convolutions, so load leaves them plain."""
    save_random_folder("tiny:sd1", tmp_path / "m", dtype=torch.float32)
    plain = load(tmp_path / "m", dtype="fp32", backends={"conv2d": "reference"})
    assert not any(isinstance(m, prepack.PackedConv2d) for m in plain.unet.modules())


def test_state_dict_holds_the_plain_weights():
    """Exports of a loaded pipeline are unchanged by packing: the state dict unpacks; loading one repacks."""
    plain, packed = tiny_unet(), tiny_unet()
    prepack.prepack(packed)
    x, t, ctx = unet_inputs(seed=2)
    with torch.inference_mode():
        packed(x, t, ctx)  # packs every layer
    ref, sd = plain.state_dict(), packed.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    other = tiny_unet()
    prepack.prepack(other)
    source = randomize_(tiny_unet(), seed=9, std=0.1)
    other.load_state_dict(source.state_dict())
    with torch.inference_mode():
        assert rel_err(other(x, t, ctx), source(x, t, ctx)) < TOL
    assert other.conv_in.packed_for == tuple(x.shape)  # a loaded state is packed again at its first call


def test_a_compiled_unet_keeps_its_linears_plain(tmp_path):
    """Inductor lowers oneDNN's packed linear only for the weights its own freezing folds, so load leaves a
    compiled UNet's linears plain (its convolutions still pack; compiling itself happens at the first call)."""
    save_random_folder("tiny:sd1", tmp_path / "m", dtype=torch.float32)
    pipe = load(tmp_path / "m", dtype="fp32", compile=True)
    kinds = {type(m) for m in pipe.unet.modules()}
    assert prepack.PackedConv2d in kinds and prepack.PackedLinear not in kinds and nn.Linear in kinds
