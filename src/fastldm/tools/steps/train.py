"""Training and judging the step predictor behind `steps="auto"` (runtime/step_predictor.py) from label tables
(tools/steps/labels.py).

What "earns its keep" means (issue 18): on the verdict matrix of held-out prompts, the fixed-count curve
(accuracy at k steps, every prompt the same k) is what any prompt-blind setting gets. A predictor's point (mean
predicted steps, accuracy of the images at the predicted steps) beats it when its accuracy is within TOLERANCE of
fixed 20's and it uses at most (1 - SAVING) of the steps the fixed curve needs for that accuracy. Otherwise
`steps="auto"` should run the best constant: the fewest fixed steps within TOLERANCE of fixed 20.
"""
from __future__ import annotations

import numpy as np
import torch

from ...runtime.step_predictor import ConstantSteps, StepPredictor, prompt_features, step_range
from .labels import NEVER

REFERENCE = 20                 # the fixed count a predictor must stay within TOLERANCE of (the grid's last if absent)
TOLERANCE = 0.01               # accuracy (fraction) a predictor or the best constant may lose against REFERENCE
SAVING = 0.25                  # fraction of the fixed curve's steps a predictor must save at its own accuracy
COSTS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05)   # accuracy per step


def train_step_predictor(features: torch.Tensor, labels, steps: tuple[int, ...], sampler: str, *,
                         kind: str = "quality", cost: float = 0.01, hidden: int = 16, epochs: int = 300,
                         lr: float = 1e-2, l2: float = 0.1, seed: int = 0) -> StepPredictor:
    """Fit a StepPredictor on features (N, F) and labels (N,): step counts of `steps` or NEVER. Full-batch Adam on
    the labels' negative log-likelihood + l2·||W||² (both weight matrices; labels are few and noisy, so the
    penalty matters more than the width). A few seconds on a CPU for a thousand prompts. An SSIM-labelled
    predictor is clamped to the sampler's step_range, a quality-labelled one may pick any count of its grid."""
    index = {s: i for i, s in enumerate(steps)} | {NEVER: len(steps)}
    if any(int(s) not in index for s in labels):
        raise ValueError(f"labels must be step counts of the grid {list(steps)} (or {NEVER}: never right)")
    y = torch.tensor([index[int(s)] for s in labels])                            # (N,)
    x = features.float()
    torch.manual_seed(seed)
    model = StepPredictor(x.shape[1], tuple(steps), sampler, hidden, cost, kind,
                          step_range(sampler) if kind == "ssim" else None)
    model.mean.copy_(x.mean(0))
    model.std.copy_(x.std(0).clamp_min(1e-6))
    with torch.no_grad():                             # start from the labels' own distribution: θ_k = logit(P(y <= k))
        cdf = (torch.bincount(y, minlength=len(steps) + 1)[:-1].cumsum(0) + 0.5) / (len(y) + 1)       # (K,)
        theta = torch.logit(cdf)
        model.cut0.copy_(theta[:1])
        model.gaps.copy_(torch.diff(theta).clamp_min(1e-3).expm1().log())   # softplus⁻¹
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        penalty = model.hidden.weight.square().sum() + model.out.weight.square().sum()
        nll = -model.label_probs(x).gather(1, y[:, None]).clamp_min(1e-9).log().mean()
        (nll + l2 * penalty).backward()
        opt.step()
    return model.eval()


def out_of_fold(features: torch.Tensor, labels, steps: tuple[int, ...], sampler: str, *, folds: int = 5,
                seed: int = 0, **kw) -> torch.Tensor:
    """(N, K) F(k) of every prompt from a predictor trained without its fold (k-fold cross-validation)."""
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    done = torch.zeros(len(labels), len(steps))
    for k in range(folds):
        held = order[k::folds]
        fit = np.setdiff1d(order, held)
        model = train_step_predictor(features[fit], labels[fit], steps, sampler, seed=seed, **kw)
        done[held] = model.done_by(features[held])
    return done


def decide(done: torch.Tensor, steps: tuple[int, ...], cost: float) -> np.ndarray:
    """(N,) the counts StepPredictor.buckets picks from F(k) (N, K) at `cost` (the whole grid allowed)."""
    grid = torch.tensor(steps)
    return grid[(done - cost * grid).argmax(dim=1)].numpy()


def fixed_curve(passed, steps: tuple[int, ...]) -> np.ndarray:
    """(K,) accuracy when every prompt runs steps[k] steps, from a verdict matrix (N, K)."""
    return np.asarray(passed, dtype=bool).mean(axis=0)


def steps_to_reach(curve: np.ndarray, steps: tuple[int, ...], accuracy: float) -> float:
    """The fixed step count that reaches `accuracy`: on the curve made monotone (each count gets the best accuracy
    of any count up to it), linear between grid counts; inf when no count of the grid reaches it."""
    best = np.maximum.accumulate(curve)
    hit = np.flatnonzero(best >= accuracy - 1e-12)
    if not hit.size:
        return float("inf")
    j = hit[0]
    if j == 0:
        return float(steps[0])
    a0, a1 = best[j - 1], best[j]
    return float(steps[j - 1] + (steps[j] - steps[j - 1]) * (accuracy - a0) / (a1 - a0))


def _reference(steps: tuple[int, ...]) -> int:
    """Index of REFERENCE in the grid (of its last count when absent)."""
    return list(steps).index(REFERENCE) if REFERENCE in steps else len(steps) - 1


def best_constant(passed, steps: tuple[int, ...]) -> int:
    """The fewest fixed steps whose accuracy is within TOLERANCE of REFERENCE steps' (the prompt-blind rival),
    up to one standard error of the paired difference (√(prompts right at only one of the two counts) / N): on a
    few hundred prompts the curve's flat top wobbles by more than a point."""
    passed = np.asarray(passed, dtype=bool)                                   # (N, K)
    ref = passed[:, _reference(steps)]
    diff = passed.mean(0) - ref.mean()                                        # (K,)
    se = np.sqrt((passed != ref[:, None]).sum(0)) / len(passed)               # (K,)
    return int(steps[int(np.flatnonzero(diff >= -TOLERANCE - se - 1e-12)[0])])


def judge_point(passed, steps: tuple[int, ...], predicted) -> dict:
    """A setting's point against the fixed curve of the same verdict matrix (N, K): its mean steps and accuracy,
    fixed REFERENCE's accuracy, the fixed steps reaching its accuracy and the fraction of them it saves (None when
    no fixed count is as accurate), and whether it beats the curve (TOLERANCE, SAVING)."""
    passed, grid = np.asarray(passed, dtype=bool), list(steps)
    predicted = np.asarray(predicted)
    acc = float(passed[np.arange(len(passed)), [grid.index(int(s)) for s in predicted]].mean())
    curve = fixed_curve(passed, steps)
    reference = float(curve[_reference(steps)])
    needed = steps_to_reach(curve, steps, acc)
    mean, above = float(predicted.mean()), needed == float("inf")          # above: no fixed count is as accurate
    return {"mean_steps": mean, "accuracy": acc, "accuracy_fixed_reference": reference,
            "fixed_steps_same_accuracy": None if above else needed, "saving": None if above else 1 - mean / needed,
            "beats_fixed": bool(acc >= reference - TOLERANCE - 1e-12 and mean <= (1 - SAVING) * needed)}


def choose_cost(done: torch.Tensor, passed, steps: tuple[int, ...]) -> tuple[float, list[dict]]:
    """The cost per step, from out-of-fold F(k) (N, K) and the verdicts (N, K) of the training prompts: among the
    costs of COSTS whose point stays within TOLERANCE / 2 of fixed REFERENCE (half the margin, for the noise of a
    new set of prompts), the one saving the largest fraction of the fixed curve's steps; else the most accurate."""
    rows = [{"cost": c, **judge_point(passed, steps, decide(done, steps, c))} for c in COSTS]
    ok = [r for r in rows if r["accuracy"] >= r["accuracy_fixed_reference"] - TOLERANCE / 2 - 1e-12]
    best = (max(ok, key=lambda r: 1.0 if r["saving"] is None else r["saving"]) if ok
            else max(rows, key=lambda r: r["accuracy"]))
    return best["cost"], rows


def evaluate_predictor(model: StepPredictor, features: torch.Tensor, labels, cost: float | None = None) -> dict:
    """Error on labelled prompts: mean absolute error in steps and the fraction under-predicted by more than one
    bucket of the grid (prediction's bucket < label's bucket - 1), over the prompts with a label other than
    NEVER; the mean predicted and label steps; the fraction labelled NEVER. Predictions here are not clamped to
    the step range, so they are comparable with the grid labels."""
    steps = model.steps.tolist()
    labels = np.asarray(labels)
    idx = model.buckets(features, cost).numpy()
    pred = np.array(steps)[idx]
    some = labels != NEVER
    label_idx = np.array([steps.index(int(s)) for s in labels[some]])
    return {"mae_steps": float(np.abs(pred[some] - labels[some]).mean()) if some.any() else 0.0,
            "under_gt_1_bucket": float((idx[some] < label_idx - 1).mean()) if some.any() else 0.0,
            "mean_predicted": float(pred.mean()), "mean_label": float(labels[some].mean()) if some.any() else 0.0,
            "never": float((~some).mean()), "n": len(labels)}


def train_from_table(pipe, table, *, kind: str | None = None, tau: float | None = None, cost: float | None = None,
                     holdout: float = 0.2, eval_table=None, seed: int = 0, **fit
                     ) -> tuple[StepPredictor | ConstantSteps, dict]:
    """Train on a LabelTable with the features of `pipe`'s text encoder(s); `kind` None: the table's; `fit`:
    train_step_predictor's settings (hidden, l2, ...).
    With quality labels and cost None, the cost comes from 5-fold cross-validation on the table (choose_cost).
    The error is reported on `eval_table` when given, else on a random `holdout` fraction of the table's prompts
    (left out of training). With quality labels and an `eval_table` with verdicts, the predictor is judged against
    the fixed curve there (judge_point, also at every cost of COSTS: its curve); when it does not beat it, the result
    is the best constant of the training prompts instead (ConstantSteps).
    Returns it and {"train": n, "kind", "tau" (ssim), "cost", "constant", "eval", "fallback" (why), ...}."""
    kind = kind or table.kind
    labels = table.labels(kind, tau)
    feats = prompt_features(pipe, table.prompts)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_eval = 0 if eval_table is not None else int(round(holdout * len(labels)))
    train, held = order[n_eval:], order[:n_eval]
    report = {"train": len(train), "kind": kind}
    if kind == "ssim":
        report["tau"] = table.tau if tau is None else tau
    if kind == "quality":
        passed = np.asarray(table.passed)[train]
        report["constant"] = best_constant(passed, table.steps)
        if cost is None:
            done = out_of_fold(feats[train], labels[train], table.steps, table.sampler, seed=seed, **fit)
            cost, report["cost_sweep"] = choose_cost(done, passed, table.steps)
    report["cost"] = cost = COSTS[6] if cost is None else cost
    model = train_step_predictor(feats[train], labels[train], table.steps, table.sampler, kind=kind, cost=cost,
                                 seed=seed, **fit)
    model.constant = report.get("constant")
    if eval_table is not None:
        eval_feats = prompt_features(pipe, eval_table.prompts)
        report["eval"] = evaluate_predictor(model, eval_feats, eval_table.labels(kind, tau))
        if kind == "quality" and eval_table.passed is not None:
            passed, grid = eval_table.passed, eval_table.steps
            report["eval"]["predictor"] = judge_point(passed, grid, model.predict_steps(eval_feats))
            report["eval"]["cost_sweep"] = [{"cost": c, **judge_point(passed, grid, model.predict_steps(eval_feats, c))}
                                            for c in COSTS]
            report["eval"]["constant"] = judge_point(passed, grid, [report["constant"]] * len(eval_table.prompts))
            if not report["eval"]["predictor"]["beats_fixed"]:
                report["fallback"] = (f"the predictor did not beat fixed steps on the {len(eval_table.prompts)} "
                                      f"held-out prompts: {report['constant']} steps for every prompt")
                return ConstantSteps(report["constant"], table.sampler, kind, table.steps), report
    elif n_eval:
        report["eval"] = evaluate_predictor(model, feats[held], labels[held])
    return model, report
