"""Convergence early stop (fastldm.runtime.early_stop) with every sampler, on denoisers whose x0 estimate is
known in closed form: it stops at the first step whose relative change of the estimate is below the threshold —
not before — and returns that step's estimate (the jump to σ = 0)."""
from __future__ import annotations

import pytest
import torch

from fastldm.runtime.early_stop import EarlyStop
from fastldm.config import SD_SCHEDULER
from fastldm.samplers import list_samplers, resolve_sampler, sample
from fastldm.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.from_config(SD_SCHEDULER)
STEPS = 12


class GaussianDenoiser:
    """The exact denoiser of data x0 ~ N(0, s²·I): D(x, σ) = s²/(s² + σ²)·x (Karras et al. 2022, eq. 1 for a
    Gaussian). Its estimate settles as σ -> 0, like a trained model's."""

    def __init__(self, s: float = 1.0):
        self.s2 = s * s

    def on_grid(self, grid):
        return self

    def sigma_to_t(self, sigma):
        return SCHEDULE.sigma_to_t(torch.as_tensor(sigma).reshape(-1).float())

    def __call__(self, x, sigma):
        return self.s2 / (self.s2 + torch.as_tensor(sigma) ** 2) * x


class ConstantDenoiser(GaussianDenoiser):
    """Data that is one point x*: D(x, σ) = x* from the first step on."""

    def __init__(self, x_star):
        self.x_star = x_star

    def __call__(self, x, sigma):
        return self.x_star.clone()


def _run(spec, denoiser, callback):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    return sample(denoiser, noise, spec, SCHEDULE, STEPS, generator=torch.Generator().manual_seed(1),
                  callback=callback)


@pytest.mark.parametrize("spec", list_samplers(), ids=lambda s: s.name)
def test_stops_at_first_converged_step_and_not_before(spec):
    seen = []
    _run(spec, GaussianDenoiser(), lambda info: seen.append(info["denoised"].clone()))
    # δ_i from the recorded estimates, computed here independently: the largest over the batch.
    deltas = [max(float((d - p)[b].norm() / p[b].norm()) for b in range(2)) for p, d in zip(seen, seen[1:])]
    threshold = sorted(deltas[:-1])[len(deltas) // 2]          # a value that some middle step falls below
    first = 1 + next(i for i, d in enumerate(deltas) if d < threshold)
    assert 1 <= first < STEPS - 1

    stop = EarlyStop(threshold)
    calls = []
    out = _run(spec, GaussianDenoiser(), lambda info: calls.append(info["i"]) or stop(info))
    assert calls == list(range(first + 1))                       # ran steps 0..first, then stopped
    assert all(d >= threshold for d in stop.deltas[:first])      # not before
    assert torch.allclose(out, seen[first], atol=1e-6)           # returned the x0 estimate (σ_end = 0: no rescale)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "uni_pc", "heun"])
def test_constant_estimate_stops_at_second_step(name):
    x_star = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    stop = EarlyStop(1e-4)
    out = _run(resolve_sampler(name), ConstantDenoiser(x_star), stop)
    assert stop.deltas == [float("inf"), 0.0]
    assert torch.equal(out, x_star)


def test_zero_threshold_never_stops():
    stop = EarlyStop(0.0)
    calls = []
    _run(resolve_sampler("euler"), GaussianDenoiser(), lambda info: calls.append(1) or stop(info))
    assert len(calls) == STEPS and len(stop.deltas) == STEPS
    with pytest.raises(ValueError, match=">= 0"):
        EarlyStop(-1.0)
