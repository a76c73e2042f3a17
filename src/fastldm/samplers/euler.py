"""Euler, Euler ancestral and Heun on the probability-flow ODE dx/dσ = (x - D(x, σ))/σ (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", eq. 4 and Alg. 1; k-diffusion sampling.py).

Each step is written in the operation order of diffusers' EulerDiscrete / EulerAncestralDiscrete / HeunDiscrete
schedulers so that fp32 trajectories agree to rounding.
"""
from __future__ import annotations

from torch import Tensor

from .common import Steps, randn, stop_requested


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Split a step σ -> σ' into a deterministic part to σ_down and fresh noise of std σ_up, with
    σ_up = η·sqrt(σ'²(σ²-σ'²)/σ²), σ_down = sqrt(σ'² - σ_up²) (DDPM posterior variance for η=1;
    Song et al. 2021 "DDIM" eq. 16 written in σ-space)."""
    sigma_up = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def sample_euler(x: Tensor, sigmas: Tensor, *, generator=None, callback=None) -> Steps:
    """Euler's method on the PF-ODE (Karras et al. 2022, Alg. 1 without the 2nd-order correction)."""
    for i in range(len(sigmas) - 1):
        denoised = yield x, sigmas[i]
        derivative = (x - denoised) / sigmas[i]
        x = x + derivative * (sigmas[i + 1] - sigmas[i])
        if stop_requested(callback, i, sigmas, x, denoised):
            return denoised
    return x


def sample_euler_ancestral(x: Tensor, sigmas: Tensor, *, generator=None, callback=None,
                           eta: float = 1.0) -> Steps:
    """Euler ancestral: an Euler step to σ_down plus fresh noise σ_up (k-diffusion `sample_euler_ancestral`)."""
    for i in range(len(sigmas) - 1):
        denoised = yield x, sigmas[i]
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        derivative = (x - denoised) / sigmas[i]
        x = x + derivative * (sigma_down - sigmas[i])
        if sigma_up > 0:
            x = x + randn(x.shape, generator, x.device, x.dtype) * sigma_up
        if stop_requested(callback, i, sigmas, x, denoised):
            return denoised
    return x


def sample_heun(x: Tensor, sigmas: Tensor, *, generator=None, callback=None) -> Steps:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1, S_churn = 0); the step to σ=0 is plain Euler.
    Costs 2 UNet calls per step except the last."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = yield x, sigma
        derivative = (x - denoised) / sigma
        dt = sigma_next - sigma
        x_euler = x + derivative * dt
        if sigma_next == 0:
            x = x_euler
        else:
            derivative_next = (x_euler - (yield x_euler, sigma_next)) / sigma_next
            x = x + (derivative + derivative_next) / 2 * dt
        if stop_requested(callback, i, sigmas, x, denoised):
            return denoised
    return x
