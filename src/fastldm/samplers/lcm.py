"""Latent Consistency Model sampling, Luo et al. 2023 ("Latent Consistency Models", Alg. 3 multistep sampling):
jump to the consistency function's x0 estimate, then re-noise to the next noise level.

The estimate uses the consistency boundary condition f(x, t) = c_skip(t)·x_vp + c_out(t)·x̂0 with
c_skip = σ_d²/((10t)² + σ_d²), c_out = 10t/sqrt((10t)² + σ_d²), σ_d = 0.5
(Song et al. 2023 "Consistency Models" §3, discretised as diffusers' LCMScheduler).
The sampler takes the DDPM timestep of each σ of the grid (`timesteps`), which t is.
"""
from __future__ import annotations

from torch import Tensor

from .common import Steps, randn, stop_requested

SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0


def sample_lcm(x: Tensor, sigmas: Tensor, *, timesteps: Tensor, generator=None, callback=None) -> Steps:
    """LCM multistep sampling (Luo et al. 2023, Alg. 3); timesteps[i] is the DDPM timestep of sigmas[i]."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = yield x, sigma
        scaled_t = float(timesteps[i]) * TIMESTEP_SCALING
        c_skip = SIGMA_DATA**2 / (scaled_t**2 + SIGMA_DATA**2)
        c_out = scaled_t / (scaled_t**2 + SIGMA_DATA**2) ** 0.5
        denoised = c_out * x0 + c_skip * (x / (sigma**2 + 1) ** 0.5)
        x = denoised
        if sigma_next > 0:
            x = denoised + sigma_next * randn(x.shape, generator, x.device, x.dtype)
        if stop_requested(callback, i, sigmas, x, denoised):
            return denoised
    return x
