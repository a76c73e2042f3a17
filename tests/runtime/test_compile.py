"""torch.compile of the UNet (runtime/compile.py): where its cache lives, and compiled == eager."""
from __future__ import annotations

import copy

import pytest
import torch

from fastldm.runtime import compile as rc
from fastldm.runtime import prepack
from .test_optimize import tiny_unet, unet_inputs


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "placeholder")  # so that undo restores the original
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert rc.cache_dir() == tmp_path / "fastldm" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert rc.cache_dir() == tmp_path / "mine"


@pytest.mark.slow  # inductor compiles C++ for every fused kernel: ~1-2 min for the tiny UNet on 2 cores
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_compiled_unet_matches_eager(monkeypatch, tmp_path, packed):
    """packed: convolutions and linears with oneDNN-packed weights (runtime/prepack.py, the CPU default),
    packed by the first compiled call itself."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    eager = tiny_unet()
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        ref = eager(x, t, ctx)
    twin = copy.deepcopy(eager)
    if packed:
        prepack.prepack(twin)
        monkeypatch.setattr(prepack, "TRIM_BYTES", 0)  # the hand-back to the system runs inside the traced call too
    compiled = rc.compile_module(twin)
    report = rc.timed_first_call(compiled, x, t, ctx)
    assert report.cache_misses >= 1 and report.seconds > 0
    with torch.no_grad():
        out = compiled(x, t, ctx)
    # fp32, fused kernels reorder sums (GroupNorm/LayerNorm statistics, softmax): ~1e-6 relative observed;
    # 1e-4 of max|ref| flags a wrong fusion without failing on summation order.
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
