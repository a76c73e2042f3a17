"""DPM-Solver++ multistep samplers, Lu et al. 2022 ("DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"), in σ-space with λ = -log σ and step size h = λ' - λ.

The first step and the step to σ=0 are first order (diffusers' `lower_order_final` with final σ 0), as in
diffusers' DPMSolverMultistepScheduler (solver_order 2, solver_type "midpoint").
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import Steps, randn, stop_requested


def sample_dpmpp_2m(x: Tensor, sigmas: Tensor, *, generator=None, callback=None) -> Steps:
    """DPM-Solver++(2M), Lu et al. 2022, Alg. 2: x' = (σ'/σ)·x - (e^-h - 1)·(D0 + D1/2),
    D1 = (D0 - D_prev)/r with r = h_prev/h."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = yield x, sigma
        if sigma_next == 0:
            x = denoised                                  # first-order step with h = ∞
        else:
            h = sigma.log() - sigma_next.log()
            d = denoised if old_denoised is None else denoised + 0.5 * (denoised - old_denoised) / (h_last / h)
            x = (sigma_next / sigma) * x - (torch.exp(-h) - 1.0) * d
            h_last = h
        old_denoised = denoised
        if stop_requested(callback, i, sigmas, x, denoised):
            return denoised
    return x


def sample_dpmpp_2m_sde(x: Tensor, sigmas: Tensor, *, generator=None, callback=None) -> Steps:
    """SDE-DPM-Solver++(2M), Lu et al. 2022, §4 / App. B (diffusers `sde-dpmsolver++`, midpoint):
    x' = (σ'/σ)·e^-h·x + (1 - e^-2h)·(D0 + D1/2) + σ'·sqrt(1 - e^-2h)·z, one fresh z per step."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = yield x, sigma
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            d = denoised if old_denoised is None else denoised + 0.5 * (denoised - old_denoised) / (h_last / h)
            noise = randn(x.shape, generator, x.device, x.dtype)
            x = ((sigma_next / sigma * torch.exp(-h)) * x + (1 - torch.exp(-2.0 * h)) * d
                 + sigma_next * torch.sqrt(1.0 - torch.exp(-2.0 * h)) * noise)
            h_last = h
        old_denoised = denoised
        if stop_requested(callback, i, sigmas, x, denoised):
            return denoised
    return x
