"""DDIM, Song et al. 2021 ("Denoising Diffusion Implicit Models", eq. 12), in σ-space.

With x = x_vp·sqrt(1+σ²), the DDIM update x_prev = sqrt(ᾱ')·x0 + sqrt(1-ᾱ'-s²)·ε + s·z becomes
x' = x0 + σ_down·ε + σ_up·z: for η = 0 exactly an Euler step of the PF-ODE (Karras et al. 2022, §3),
for η > 0 the ancestral step with σ_up scaled by η (eq. 16).
"""
from __future__ import annotations

from torch import Tensor

from .common import Steps, randn, stop_requested
from .euler import ancestral_step


def sample_ddim(x: Tensor, sigmas: Tensor, *, generator=None, callback=None, eta: float = 0.0) -> Steps:
    """DDIM with stochasticity η (0: deterministic DDIM, 1: DDPM-like ancestral sampling)."""
    for i in range(len(sigmas) - 1):
        denoised = yield x, sigmas[i]
        eps = (x - denoised) / sigmas[i]
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = denoised + sigma_down * eps
        if sigma_up > 0:
            x = x + sigma_up * randn(x.shape, generator, x.device, x.dtype)
        if stop_requested(callback, i, sigmas, x, denoised):
            return denoised
    return x
