"""Step labels and predictor (fastldm.tools.steps, fastldm.runtime.step_predictor) on hand-made verdict matrices and
synthetic features: the quality-label rule, the fixed curve and the "beats it" check, a predictor that learns a rule
the features carry, the constant fallback, and the metadata round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastldm.errors import StepPredictorMissing
from fastldm.runtime.step_predictor import (ConstantSteps, StepPredictor, StepPredictors, load_predictor_file,
                                            predictor_path, step_range)
from fastldm.samplers import resolve_sampler
from fastldm.tools.steps.labels import NEVER, LabelTable, quality_labels
from fastldm.tools.steps.train import (best_constant, choose_cost, evaluate_predictor, judge_point, out_of_fold,
                                       steps_to_reach, train_step_predictor)

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = (2, 4, 6, 8, 12, 20)


def test_quality_labels_need_every_larger_count_right():
    passed = [[0, 1, 1, 1, 1, 1],        # right from 4 on
              [1, 1, 1, 1, 1, 1],        # right everywhere
              [0, 1, 0, 1, 1, 1],        # right at 4, wrong again at 6: done only at 8
              [1, 1, 1, 1, 1, 0],        # wrong at the largest count: never
              [0, 0, 0, 0, 0, 1],        # right only at the largest count
              [0, 0, 0, 0, 0, 0]]
    assert quality_labels(passed, GRID).tolist() == [4, 2, 8, NEVER, 20, NEVER]


def test_label_table_kinds_accuracy_and_roundtrip(tmp_path):
    t = LabelTable("m", "dpmpp_2m", None, 5.0, 64, 64, steps=(4, 8, 16), tau=0.9, prompts=["a", "b", "c"],
                   seeds=[0, 1, 2], ssim=[[0.5, 0.95, 1.0], [0.92, 0.85, 1.0], [0.1, 0.2, 1.0]],
                   passed=[[False, True, True], [True, False, True], [True, True, False]])
    assert t.kind == "quality" and t.labels().tolist() == [8, 16, NEVER]
    assert t.labels("ssim").tolist() == [8, 4, 16]              # the first count reaching τ, the reference if none
    assert t.labels("ssim", 0.99).tolist() == [16, 16, 16]
    assert t.accuracy(8) == pytest.approx(2 / 3) and t.accuracy([4, 8, 16]) == pytest.approx(0.0)
    back = LabelTable.load(t.save(tmp_path / "labels.json"))
    assert back == t
    assert LabelTable("m", "euler", None, 5.0, 64, 64, steps=(4, 8), ssim=[[0.1, 1.0]], prompts=["a"]).kind == "ssim"
    with pytest.raises(ValueError, match="need a judge"):
        LabelTable("m", "euler", None, 5.0, 64, 64, steps=(4, 8)).labels("quality")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a fastldm label table"):
        LabelTable.load(tmp_path / "bad.json")


def test_fixed_curve_and_the_target_check():
    # 10 prompts: accuracy 0.2 / 0.5 / 0.8 / 0.9 / 0.9 / 0.9 at 2 / 4 / 6 / 8 / 12 / 20 steps (monotone by design)
    first_right = np.array([2, 2, 4, 4, 4, 6, 6, 6, 8, 99])
    passed = np.asarray(GRID)[None] >= first_right[:, None]                    # (10, 6)
    assert steps_to_reach(passed.mean(0), GRID, 0.65) == pytest.approx(5.0)    # half-way from 4 (0.5) to 6 (0.8)
    assert steps_to_reach(passed.mean(0), GRID, 0.95) == float("inf")
    # one prompt right only at 2 steps, one only at 20: every fixed count gets half, picking each its own gets all
    above = judge_point(np.array([GRID]) == np.array([[2], [20]]), GRID, [2, 20])
    assert above["accuracy"] == 1.0 and above["fixed_steps_same_accuracy"] is None and above["saving"] is None
    assert best_constant(np.tile(passed, (10, 1)), GRID) == 8                 # within 1 point of fixed 20 ...
    assert best_constant(passed, GRID) == 6          # ... up to the noise: 6 misses one prompt of 10 (SE 0.1)
    oracle = np.where(first_right > 20, 2, first_right)                       # each prompt at its own label
    p = judge_point(passed, GRID, oracle)
    assert p["accuracy"] == pytest.approx(0.9) and p["mean_steps"] == pytest.approx(4.4)
    assert p["fixed_steps_same_accuracy"] == pytest.approx(8.0) and p["beats_fixed"]     # 4.4 <= 0.75 x 8
    q = judge_point(passed, GRID, [8] * 10)
    assert not q["beats_fixed"] and q["saving"] == pytest.approx(0.0)


def _synthetic(n=240, seed=0):
    """Features (n, 12) and labels: 4 steps when feature 0 is negative, 12 when it is positive (|feature 0| >= 1)."""
    x = torch.randn(n, 12, generator=torch.Generator().manual_seed(seed))
    x[:, 0] += x[:, 0].sign()
    return x, np.where(x[:, 0] > 0, 12, 4)


def test_learns_rule_and_roundtrips_metadata(tmp_path):
    x, y = _synthetic()
    model = train_step_predictor(x[:200], y[:200], GRID, "dpmpp_2m", cost=0.05)
    report = evaluate_predictor(model, x[200:], y[200:])
    # The rule is one linear feature among 12 noise ones: the held-out error stays within a few of the 40
    # prompts (each miss costs 8 steps); chance would be ~4 steps.
    assert report["mae_steps"] <= 1.0 and report["under_gt_1_bucket"] <= 0.05 and report["never"] == 0
    model.constant = 12
    path = model.save(tmp_path / "step_predictor" / "dpmpp_2m.safetensors", heldout={"accuracy": 0.9})
    loaded = load_predictor_file(path)
    assert isinstance(loaded, StepPredictor) and loaded.info == {"heldout": {"accuracy": 0.9}}
    assert (loaded.sampler, loaded.kind, loaded.cost, loaded.range, loaded.constant) == ("dpmpp_2m", "quality", 0.05,
                                                                                      (2, 20), 12)
    assert loaded.steps.tolist() == list(GRID) and loaded.predict_steps(x[200:]) == model.predict_steps(x[200:])
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_cost_trades_steps_for_accuracy():
    """Labels the features cannot explain: a higher cost per step picks fewer steps; NEVER prompts make more
    steps buy less."""
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(1))
    y = np.random.default_rng(1).choice([4, 8, 12, NEVER], size=300, p=[0.4, 0.3, 0.2, 0.1])
    model = train_step_predictor(x, y, GRID, "euler", hidden=4, epochs=100)
    cheap, dear = evaluate_predictor(model, x, y, cost=0.002), evaluate_predictor(model, x, y, cost=0.05)
    assert dear["mean_predicted"] < cheap["mean_predicted"]
    assert dear["under_gt_1_bucket"] >= cheap["under_gt_1_bucket"]
    assert evaluate_predictor(model, x, y)["never"] == pytest.approx(np.mean(y == NEVER))


def test_cross_validated_cost_keeps_accuracy():
    x, y = _synthetic(200, seed=2)
    passed = np.asarray(GRID)[None] >= y[:, None]                             # right from the label on
    done = out_of_fold(x, y, GRID, "euler", folds=4)
    cost, rows = choose_cost(done, passed, GRID)
    best = next(r for r in rows if r["cost"] == cost)
    assert best["accuracy"] >= 0.995 and best["beats_fixed"]                 # 4 or 12 by prompt, vs fixed 12


def test_ssim_predictor_clamped_to_sampler_range():
    model = StepPredictor(1, (1, 2, 4, 50), "lcm", hidden=1, kind="ssim", step_range=step_range("lcm"))
    with torch.no_grad():
        model.out.weight.zero_()
        model.out.bias.fill_(100.0)                                           # very hard: done only at 50
        model.gaps.copy_(torch.tensor([0.0, 0.0, 1000.0]))
    assert step_range("lcm") == (1, 8) and model.predict_steps(torch.zeros(1, 1)) == [8]


def test_constant_fallback(tmp_path):
    const = ConstantSteps(7, "euler", grid=GRID)
    assert const.prompt_features(None, ["a", "b"]).shape == (2, 0)          # no text encoder needed
    assert const.predict_steps(torch.zeros(3, 0)) == [7, 7, 7]
    path = const.save(predictor_path(tmp_path, "euler"), reason="the predictor did not beat fixed steps")
    loaded = StepPredictors(tmp_path).get(resolve_sampler("Euler"))
    assert isinstance(loaded, ConstantSteps) and loaded.constant == 7 and loaded.grid == GRID
    assert loaded.info == {"reason": "the predictor did not beat fixed steps"} and path.stat().st_size < 1000
    with pytest.raises(StepPredictorMissing, match="no step predictor for sampler Heun"):
        StepPredictors(tmp_path).get(resolve_sampler("Heun"))


def test_paths_and_loaded_once_per_file_version(tmp_path):
    """steps="auto" asks for the predictor on every request: the file is read once, and again once rewritten."""
    assert predictor_path(tmp_path, "euler") == tmp_path / "step_predictor" / "euler.safetensors"
    assert predictor_path(tmp_path / "m.safetensors", "euler") == tmp_path / "m.step_predictor" / "euler.safetensors"
    x, y = _synthetic(40)
    path = predictor_path(tmp_path, "euler")
    train_step_predictor(x, y, GRID, "euler", epochs=5).save(path)
    spec, predictors = resolve_sampler("Euler"), StepPredictors(tmp_path)
    first = predictors.get(spec)
    assert predictors.get(spec) is first
    train_step_predictor(x, y, GRID, "euler", epochs=5, hidden=8).save(path)  # another size: a new version
    second = predictors.get(spec)
    assert second is not first and second.hidden.out_features == 8
