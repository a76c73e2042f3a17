"""Step predictor (fastldm.runtime.step_predictor, fastldm.tools.steps.train) on synthetic labels: it learns a rule that the features carry,
round-trips through safetensors, clamps to the sampler's range, and reports its error as documented."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastldm.tools.steps.labels import STEP_GRID, LabelTable
from fastldm.runtime.step_predictor import StepPredictor, load_step_predictor, predictor_path, step_range
from fastldm.tools.steps.train import evaluate_predictor, train_step_predictor
from fastldm.samplers import resolve_sampler


pytestmark = pytest.mark.usefixtures("one_thread")


def _synthetic(n=240, seed=0):
    """Features (n, 12) and labels: 8 steps when feature 0 is negative, 25 when it is positive."""
    x = torch.randn(n, 12, generator=torch.Generator().manual_seed(seed))
    return x, np.where(x[:, 0] > 0, 25, 8)


def test_learns_rule_and_roundtrips(tmp_path):
    x, y = _synthetic()
    model = train_step_predictor(x[:200], y[:200], STEP_GRID, "dpmpp_2m")
    report = evaluate_predictor(model, x[200:], y[200:])
    # The rule is one linear feature among 12 noise ones: the held-out error stays within a couple of the 40
    # prompts (each miss costs 17 steps; observed 0.85 steps); chance would be ~8.5 steps.
    assert report["mae_steps"] <= 2.0 and report["under_gt_1_bucket"] <= 0.05
    path = model.save(tmp_path / "step_predictor" / "dpmpp_2m.safetensors", tau=0.9)
    loaded = StepPredictor.load(path)
    assert loaded.sampler == "dpmpp_2m" and loaded.info == {"tau": 0.9}
    assert loaded.predict_steps(x[200:]) == model.predict_steps(x[200:])
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_quantile_trades_steps_for_fewer_under_predictions():
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(1))
    y = np.random.default_rng(1).choice([6, 10, 20], size=300)                 # labels the features cannot explain
    model = train_step_predictor(x, y, STEP_GRID, "dpmpp_2m", hidden=8, epochs=100)
    low, high = evaluate_predictor(model, x, y, quantile=0.2), evaluate_predictor(model, x, y, quantile=0.95)
    assert low["mean_predicted"] < high["mean_predicted"]
    assert high["under_gt_1_bucket"] <= low["under_gt_1_bucket"]


def test_evaluate_counts_under_predicted_buckets():
    # A predictor that always says 10 (bucket 3): labels 15 (bucket 5) are under by 2 buckets, 12 by one.
    model = StepPredictor(1, STEP_GRID, "dpmpp_2m", hidden=1)
    with torch.no_grad():
        model.out.weight.zero_()
        model.out.bias.copy_(torch.where(torch.tensor(STEP_GRID) == 10, 50.0, 0.0))
    r = evaluate_predictor(model, torch.zeros(4, 1), [10, 12, 15, 4])
    assert r["mae_steps"] == pytest.approx((0 + 2 + 5 + 6) / 4) and r["under_gt_1_bucket"] == 0.25


def test_clamped_to_sampler_range_and_paths(tmp_path):
    model = StepPredictor(1, STEP_GRID, "lcm", hidden=1)
    with torch.no_grad():
        model.out.weight.zero_()
        model.out.bias.copy_(torch.where(torch.tensor(STEP_GRID) == 50, 50.0, 0.0))
    assert step_range("lcm") == (1, 8) and model.predict_steps(torch.zeros(1, 1)) == [8]
    assert predictor_path(tmp_path, "euler") == tmp_path / "step_predictor" / "euler.safetensors"
    assert predictor_path(tmp_path / "m.safetensors", "euler") == tmp_path / "m.step_predictor" / "euler.safetensors"


def test_loaded_once_per_file_version(tmp_path):
    """steps="auto" asks for the predictor on every request: the file is read once, and again once rewritten."""
    x, y = _synthetic(40)
    path = predictor_path(tmp_path, "euler")
    train_step_predictor(x, y, STEP_GRID, "euler", epochs=5).save(path)
    spec = resolve_sampler("Euler")
    first = load_step_predictor(tmp_path, spec)
    assert load_step_predictor(tmp_path, spec) is first
    train_step_predictor(x, y, STEP_GRID, "euler", epochs=5, hidden=8).save(path)  # another size: a new version
    second = load_step_predictor(tmp_path, spec)
    assert second is not first and second.hidden.out_features == 8


def test_label_table_labels_and_roundtrip(tmp_path):
    t = LabelTable("m", "dpmpp_2m", None, 5.0, 64, 64, steps=(4, 8, 16), tau=0.9, prompts=["a", "b", "c"],
                   seeds=[0, 1, 2], ssim=[[0.5, 0.95, 1.0], [0.92, 0.85, 1.0], [0.1, 0.2, 1.0]])
    assert t.labels().tolist() == [8, 4, 16]              # the first count reaching τ, the reference if none
    assert t.labels(0.99).tolist() == [16, 16, 16]
    back = LabelTable.load(t.save(tmp_path / "labels.json"))
    assert back == t
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a fastldm label table"):
        LabelTable.load(tmp_path / "bad.json")
