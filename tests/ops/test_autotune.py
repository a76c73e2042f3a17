"""The `auto` table: measured on this CPU at a tiny latent, written as JSON, installed into the registry."""
from __future__ import annotations

import json

import pytest
import torch

from fastldm.ops import autotune, registry


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("autotune") / "table.json"
    t = autotune.measure_table("cpu", path, dtypes=(torch.float32, torch.bfloat16), latent=8, repeats=1,
                               ops=("conv2d", "group_norm"))
    assert json.loads(path.read_text()) == t
    return t


def test_table_times_the_runnable_backends(table):
    assert table["device"] == "cpu" and table["device_kind"] == autotune.device_kind(torch.device("cpu"))
    assert set(table["ms"]) == {"conv2d", "group_norm"}
    conv = table["ms"]["conv2d"]["float32"]
    assert {"reference", "winograd"} <= set(conv) and all(ms > 0 for ms in conv.values())
    assert "triton_winograd" not in conv  # interpreted (or absent) kernels are never timed on CPU
    assert set(table["ms"]["group_norm"]["float32"]) == {"reference"}


def test_choice_is_the_fastest_accurate_backend(table):
    for op, per_dtype in table["ms"].items():
        for dt, ms in per_dtype.items():
            ok = [n for n in ms if table["rel_err"][op][dt][n] <= 0.02]
            assert table["choice"].get(op, {}).get(dt, "reference") == min(ok, key=ms.get)
    # F(4x4, 3x3) in bf16 loses ~10% of max|y|: timed, never chosen.
    assert table["rel_err"]["conv2d"]["bfloat16"]["winograd"] > 0.02


def test_preferences_prefer_the_choice(table, tmp_path):
    forced = dict(table, choice={"conv2d": {"float32": "winograd"}})
    path = tmp_path / "t.json"
    path.write_text(json.dumps(forced))
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3)
    with registry.using(registry.Kernels(preferred=autotune.preferences(path))), torch.no_grad():
        assert registry.select("conv2d", x, w, None, stride=1, padding=1) == "winograd"
    with torch.no_grad():
        assert registry.select("conv2d", x, w, None, stride=1, padding=1) == "reference"  # outside: unchanged
    with pytest.raises(ValueError, match="measured on 'another machine'"):
        autotune.preferences(dict(table, device_kind="another machine"))


def test_latent_must_allow_three_halvings():
    with pytest.raises(ValueError, match="multiple of 8"):
        autotune.sd15_cases(12)
