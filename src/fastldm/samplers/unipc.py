"""UniPC, Zhao et al. 2023 ("UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"): the UniP-2 predictor and UniC corrector in data (x0) prediction, in σ-space with λ = -log σ.

Order 2 with warm-up (first step order 1) and order 1 for the last step, B(h) = e^h - 1 ("bh2") or h ("bh1"),
as diffusers' UniPCMultistepScheduler defaults (solver_order 2, predict_x0, lower_order_final). The corrector
reuses the model evaluation of the next step, so UniPC costs one UNet call per step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import Steps, stop_requested


def _phi(h: Tensor, variant: str) -> tuple[Tensor, Tensor]:
    """(h·φ1(-h) = e^-h - 1, B(-h)) for step size h > 0 (Zhao et al. 2023, Alg. 2 with hh = -h)."""
    h_phi_1 = torch.expm1(-h)
    return h_phi_1, h_phi_1 if variant == "bh2" else -h


def _corrector(x_prev: Tensor, sigmas: Tensor, i: int, m: list[Tensor], order: int, variant: str) -> Tensor:
    """UniC-p (Alg. 2): recompute the step σ_(i-1) -> σ_i from x_prev with the new model output m[-1]."""
    lam = -sigmas.log()
    h = lam[i] - lam[i - 1]
    h_phi_1, b_h = _phi(h, variant)
    x = (sigmas[i] / sigmas[i - 1]) * x_prev - h_phi_1 * m[-2]
    if order == 1:
        return x - b_h * 0.5 * (m[-1] - m[-2])
    # order 2: solve [[1, 1], [r, 1]]·ρ = [b1, b2] for the weights of D1 and of (m_i - m_(i-1)).
    r = (lam[i - 2] - lam[i - 1]) / h
    d1 = (m[-3] - m[-2]) / r
    hh = -h
    k1 = h_phi_1 / hh - 1                                  # h·φ_2 terms of Alg. 2, normalised by B(h)
    b1, b2 = k1 / b_h, 2 * (k1 / hh - 0.5) / b_h
    rho_d1 = (b1 - b2) / (1 - r)
    return x - b_h * (rho_d1 * d1 + (b1 - rho_d1) * (m[-1] - m[-2]))


def sample_unipc(x: Tensor, sigmas: Tensor, *, generator=None, callback=None,
                 variant: str = "bh2") -> Steps:
    """UniPC-2 (UniP-2 predictor + UniC corrector), Zhao et al. 2023, Alg. 2/3."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; use bh1 or bh2")
    n = len(sigmas) - 1
    m: list[Tensor] = []          # x0 predictions at sigmas[0..i]
    x_prev, order_prev = None, 1
    for i in range(n):
        denoised = yield x, sigmas[i]
        m = (m + [denoised])[-3:]
        if x_prev is not None:
            x = _corrector(x_prev, sigmas, i, m, order_prev, variant)
        order = min(2, n - i, i + 1)
        x_prev, order_prev = x, order
        if sigmas[i + 1] == 0:
            x = denoised                                  # first-order step with h = ∞
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            h_phi_1, b_h = _phi(h, variant)
            x = (sigmas[i + 1] / sigmas[i]) * x - h_phi_1 * denoised
            if order == 2:
                r = (sigmas[i].log() - sigmas[i - 1].log()) / h
                x = x - b_h * 0.5 * (m[-2] - m[-1]) / r
        if stop_requested(callback, i, sigmas, x, denoised):
            return denoised
    return x
