"""Training and evaluating the step predictor behind `steps="auto"` (runtime/step_predictor.py) from label
tables (tools/steps/labels.py)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...runtime.step_predictor import StepPredictor, prompt_features


def train_step_predictor(features: torch.Tensor, labels, steps: tuple[int, ...], sampler: str, *,
                         hidden: int = 64, epochs: int = 300, lr: float = 3e-3, l2: float = 1e-2,
                         quantile: float = 0.5, seed: int = 0) -> StepPredictor:
    """Fit a StepPredictor on features (N, F) and label step counts (N,) taken from `steps`: full-batch Adam on
    the cross-entropy over the grid + l2·||W||² (both weight matrices; labels are few and noisy, so the penalty
    matters more than the width). A few seconds on a CPU for a thousand prompts."""
    index = {s: i for i, s in enumerate(steps)}
    if any(int(s) not in index for s in labels):
        raise ValueError(f"labels must be step counts of the grid {list(steps)}")
    y = torch.tensor([index[int(s)] for s in labels])                            # (N,)
    x = features.float()
    torch.manual_seed(seed)
    model = StepPredictor(x.shape[1], tuple(steps), sampler, hidden, quantile)
    model.mean.copy_(x.mean(0))
    model.std.copy_(x.std(0).clamp_min(1e-6))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        penalty = model.hidden.weight.square().sum() + model.out.weight.square().sum()
        (F.cross_entropy(model(x), y) + l2 * penalty).backward()
        opt.step()
    return model.eval()


def evaluate_predictor(model: StepPredictor, features: torch.Tensor, labels, quantile: float | None = None) -> dict:
    """Error on labelled prompts: mean absolute error in steps, the fraction under-predicted by more than one
    bucket of the grid (prediction's bucket < label's bucket - 1), and the mean predicted and label steps.
    Predictions here are not clamped to the sampler's range, so they are comparable with the grid labels."""
    steps = model.steps.tolist()
    idx = model.buckets(features, quantile).numpy()
    label_idx = np.array([steps.index(int(s)) for s in labels])
    pred = np.array(steps)[idx]
    return {"mae_steps": float(np.abs(pred - np.asarray(labels)).mean()),
            "under_gt_1_bucket": float((idx < label_idx - 1).mean()),
            "mean_predicted": float(pred.mean()), "mean_label": float(np.mean(labels)), "n": len(label_idx)}


def train_from_table(pipe, table, *, tau: float | None = None, quantile: float = 0.5, holdout: float = 0.2,
                     eval_table=None, seed: int = 0) -> tuple[StepPredictor, dict]:
    """Train on a LabelTable (labels.py) with the features of `pipe`'s text encoder(s). The error is reported on
    `eval_table` when given, else on a random `holdout` fraction of the table's prompts (left out of training).
    Returns the predictor and {"train": n, "tau", "quantile", "eval": evaluate_predictor(...)}."""
    tau = table.tau if tau is None else tau
    labels = table.labels(tau)
    feats = prompt_features(pipe, table.prompts)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_eval = 0 if eval_table is not None else int(round(holdout * len(labels)))
    train, held = order[n_eval:], order[:n_eval]
    model = train_step_predictor(feats[train], labels[train], table.steps, table.sampler, quantile=quantile,
                                 seed=seed)
    report = {"train": len(train), "tau": tau, "quantile": quantile}
    if eval_table is not None:
        report["eval"] = evaluate_predictor(model, prompt_features(pipe, eval_table.prompts), eval_table.labels(tau))
    elif n_eval:
        report["eval"] = evaluate_predictor(model, feats[held], labels[held])
    return model, report
