"""Noise schedules of DDPM-trained models, and the (sigma, timestep) grids samplers walk.

A Stable Diffusion UNet was trained on T = 1000 discrete noise levels (Ho et al. 2020): betas give
alphas_cumprod ᾱ_t, and the noisy latent is x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε ("VP" space). Samplers here work
in the σ-space of Karras et al. 2022 (EDM, §2): x = x0 + σ·ε with σ_t = sqrt((1-ᾱ_t)/ᾱ_t),
so x_vp = x / sqrt(1+σ²).

Every number is computed the way diffusers' schedulers compute it (float32 tables, float64 spacing arithmetic,
numpy's linspace/arange/round-half-even), so that a grid built here equals the `timesteps`/`sigmas` of the matching
diffusers scheduler. Which diffusers scheduler a grid mirrors is its `family`:

    "ddim"       DDIMScheduler                                   (VP; integer timesteps)
    "discrete"   EulerDiscrete / EulerAncestralDiscrete / Heun   (σ-space; fractional linspace timesteps)
    "multistep"  DPMSolverMultistep / UniPCMultistep             (VP; n+1-point spacing without t=0)
    "lcm"        LCMScheduler                                    (VP; a subset of the 50-step distillation grid)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SPACINGS = ("leading", "linspace", "trailing")
SIGMA_KINDS = ("default", "karras", "exponential")
FAMILIES = ("ddim", "discrete", "multistep", "lcm")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Betas defaults of the diffusers class a config was written for (used only when the config omits the keys).
# DDPM/DDIM/PNDM/Euler/DPMSolver/UniPC share (1e-4, 0.02, linear); Heun and LCM ship the SD numbers.
_BETA_DEFAULTS = {
    "HeunDiscreteScheduler": (0.00085, 0.012, "linear"),
    "LCMScheduler": (0.00085, 0.012, "scaled_linear"),
}
_DDPM_BETAS = (0.0001, 0.02, "linear")


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """Betas of the "squaredcos_cap_v2" schedule, ᾱ(t) = cos²((t+0.008)/1.008 · π/2):
    Nichol & Dhariwal 2021, eq. 17, each beta capped at max_beta."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    T = num_train_timesteps
    return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)],
                        dtype=torch.float32)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """n noise levels from sigma_max to sigma_min, uniform in σ^(1/ρ): Karras et al. 2022, eq. 5 (float64)."""
    ramp = torch.from_numpy(np.linspace(0, 1, n))
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n noise levels from sigma_max to sigma_min, uniform in log σ (k-diffusion `get_sigmas_exponential`, float64)."""
    return torch.from_numpy(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)))


def spaced_timesteps(T: int, n: int, spacing: str, steps_offset: int = 0, *,
                     integer: bool = True, skip_zero: bool = False) -> Tensor:
    """n descending DDPM timesteps out of T, per Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Table 2): "leading" = multiples of T//n (+ steps_offset), "linspace" = evenly from T-1 to 0,
    "trailing" = evenly from T-1 down, ending at T/n - 1.

    integer: round "linspace" to whole timesteps (DDIM, DPM-Solver, UniPC) or keep the float32 values
    (Euler, Euler a, Heun). skip_zero: the multistep schedulers' variant that spaces n+1 points and drops
    the one nearest t=0. numpy is used so that round-half-even ties fall exactly as in diffusers. -> (n,) float64
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; use one of {', '.join(SPACINGS)}")
    if spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / n)) - 1               # descending already; never reaches t=0
    else:
        m = n + 1 if skip_zero else n
        if spacing == "linspace":
            t = np.linspace(0, T - 1, m)
            t = t.round() if integer else t.astype(np.float32)
        else:
            t = (np.arange(0, m) * (T // m)).round() + steps_offset
        t = t[::-1][:n]                                          # descending; skip_zero drops the last point
    return torch.tensor(t.astype(np.float64))


@dataclass(frozen=True)
class SamplingGrid:
    """What a sampler walks: x sits at sigmas[i] before step i; the UNet is conditioned on timesteps[i] there.

    The pairing is explicit because diffusers does not always condition on the timestep whose σ it steps with:
    Euler interpolates σ linearly in t, DPM-Solver rounds the timesteps of Karras sigmas.
    """
    sigmas: Tensor        # (n+1,) float32, descending; the last is 0 or the DDIM final σ
    timesteps: Tensor     # (n,) float32
    noise_scale: float    # text-to-image start: x = noise * noise_scale (diffusers' init_noise_sigma in σ-space)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The DDPM schedule of a model plus the scheduler_config settings samplers need.

    Keys missing from a config are kept as None where diffusers' scheduler classes disagree on the default
    (timestep_spacing, set_alpha_to_one); the sampler resolves them to the default of the diffusers class it
    mirrors, i.e. what `<ThatScheduler>.from_config(cfg)` would use.
    """
    alphas_cumprod: Tensor                 # (T,) float32, ᾱ_t
    prediction_type: str = "epsilon"       # what the UNet predicts: epsilon | v_prediction | sample
    timestep_spacing: str | None = None    # leading | linspace | trailing; None = the sampler's diffusers default
    steps_offset: int = 0                  # added to "leading" timesteps (SD ships 1)
    set_alpha_to_one: bool | None = None   # DDIM ends at ᾱ=1 (σ=0) or at ᾱ_0; None = DDIM's default (True)

    @classmethod
    def from_config(cls, cfg: dict) -> "NoiseSchedule":
        """From a diffusers scheduler_config.json dict (any scheduler class; unknown keys are ignored)."""
        start, end, kind = _BETA_DEFAULTS.get(cfg.get("_class_name"), _DDPM_BETAS)
        T = int(cfg.get("num_train_timesteps", 1000))
        kind = cfg.get("beta_schedule", kind)
        if cfg.get("rescale_betas_zero_snr"):
            raise ValueError("rescale_betas_zero_snr schedules are not supported; remove the key from the "
                             "scheduler config (only zero-terminal-SNR fine-tunes need it)")
        if cfg.get("trained_betas") is not None:
            betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
        elif kind == "linear":
            betas = torch.linspace(cfg.get("beta_start", start), cfg.get("beta_end", end), T, dtype=torch.float32)
        elif kind == "scaled_linear":
            betas = torch.linspace(cfg.get("beta_start", start) ** 0.5, cfg.get("beta_end", end) ** 0.5, T,
                                   dtype=torch.float32) ** 2
        elif kind == "squaredcos_cap_v2":
            betas = cosine_betas(T)
        else:
            raise ValueError(f"unknown beta_schedule {kind!r} in scheduler config; "
                             "use linear, scaled_linear or squaredcos_cap_v2")
        prediction = cfg.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction!r} in scheduler config; "
                             f"use one of {', '.join(PREDICTION_TYPES)}")
        spacing = cfg.get("timestep_spacing")
        if spacing is not None and spacing not in SPACINGS:
            raise ValueError(f"unknown timestep_spacing {spacing!r} in scheduler config; "
                             f"use one of {', '.join(SPACINGS)}")
        return cls(torch.cumprod(1.0 - betas, dim=0), prediction, spacing,
                   int(cfg.get("steps_offset", 0)), cfg.get("set_alpha_to_one"))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def sigmas(self) -> Tensor:
        """(T,) float32 σ_t = sqrt((1-ᾱ_t)/ᾱ_t), ascending in t (computed in float32, as diffusers does)."""
        ac = self.alphas_cumprod
        return ((1 - ac) / ac) ** 0.5

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """σ at (fractional) timesteps, linear in σ between integer t (diffusers' np.interp). float64 -> float64."""
        table = self.sigmas.double()
        t = torch.as_tensor(t, dtype=torch.float64)
        lo = t.floor().clamp(0, len(table) - 2).long()
        return (table[lo + 1] - table[lo]) * (t - lo) + table[lo]

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep of σ by linear interpolation in log σ (k-diffusion `DiscreteSchedule.sigma_to_t`,
        diffusers `_sigma_to_t`). Any shape -> float64 of the same shape."""
        log_sigmas = torch.from_numpy(np.log(self.sigmas.numpy())).double()              # (T,) float32 logs, as numpy
        s = torch.as_tensor(sigma, dtype=torch.float64, device="cpu")
        log_s = s.clamp(min=1e-10).log().reshape(-1)                                    # (N,)
        low = (log_s[None, :] >= log_sigmas[:, None]).long().cumsum(0).argmax(0)        # (N,) last index below
        low = low.clamp(max=len(log_sigmas) - 2)
        w = ((log_sigmas[low] - log_s) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(s.shape)

    def grid(self, n: int, family: str, spacing: str, sigma_kind: str = "default") -> SamplingGrid:
        """The n-step grid the diffusers scheduler of `family` builds with `set_timesteps(n)`.

        sigma_kind "karras"/"exponential" is `use_karras_sigmas` / `use_exponential_sigmas`: the discrete
        family takes σ_min/σ_max from the spaced timesteps, the multistep family from the whole table (and
        rounds Karras timesteps to integers, truncates exponential ones), exactly as the respective classes do.
        diffusers' DDIM and LCM have no such option; here they then follow the multistep convention.

        One deliberate difference: diffusers' DDIM steps from t to t - T//n, which is not the next grid timestep
        for "linspace" spacing, or "trailing" when n does not divide T; here DDIM always steps to the next one.
        """
        if family not in FAMILIES:
            raise ValueError(f"unknown scheduler family {family!r}; use one of {', '.join(FAMILIES)}")
        if sigma_kind not in SIGMA_KINDS:
            raise ValueError(f"unknown sigma schedule {sigma_kind!r}; use one of {', '.join(SIGMA_KINDS)}")
        if n < 1 or n > self.num_train_timesteps:
            raise ValueError(f"steps must be between 1 and {self.num_train_timesteps}, got {n}")
        T, table = self.num_train_timesteps, self.sigmas
        if family == "lcm":
            t = _lcm_timesteps(T, n)
        else:
            t = spaced_timesteps(T, n, spacing, self.steps_offset, integer=family != "discrete",
                                 skip_zero=family == "multistep")
        if family == "ddim" and sigma_kind == "default":
            # DDIM steps from ᾱ_t to ᾱ_(t - T//n); past t=0 it lands on ᾱ=1 or ᾱ_0 (set_alpha_to_one).
            alpha_to_one = True if self.set_alpha_to_one is None else self.set_alpha_to_one
            last = 0.0 if alpha_to_one else float(table[0])
            sigmas = torch.cat([self.t_to_sigma(t), torch.tensor([last], dtype=torch.float64)])
        elif sigma_kind == "default":
            sigmas = torch.cat([self.t_to_sigma(t), torch.zeros(1, dtype=torch.float64)])
        else:
            spaced = self.t_to_sigma(t) if family == "discrete" else table.double().flip(0)
            make = karras_sigmas if sigma_kind == "karras" else exponential_sigmas
            s = make(n, float(spaced[-1]), float(spaced[0]))
            t = self.sigma_to_t(s)
            if family != "discrete":  # the multistep schedulers store integer timesteps
                t = t.round() if sigma_kind == "karras" else t.floor()
            sigmas = torch.cat([s, torch.zeros(1, dtype=torch.float64)])
        sigmas = sigmas.float()
        if family == "discrete" and spacing != "leading":
            noise_scale = float(sigmas.max())                   # diffusers' Euler quirk: σ_max, not sqrt(σ_max²+1)
        else:
            noise_scale = float((sigmas.max() ** 2 + 1) ** 0.5)  # unit-variance VP noise, expressed in σ-space
        return SamplingGrid(sigmas, t.float(), noise_scale)


def _lcm_timesteps(T: int, n: int, original_steps: int = 50) -> Tensor:
    """LCM's n timesteps: evenly chosen from its 50-step distillation grid (k·T/50 - 1), Luo et al. 2023 §4.3."""
    if n > original_steps:
        raise ValueError(f"LCM takes at most {original_steps} steps, got {n}")
    origin = (np.arange(1, original_steps + 1) * (T // original_steps) - 1)[::-1]
    idx = np.floor(np.linspace(0, original_steps, num=n, endpoint=False)).astype(np.int64)
    return torch.from_numpy(origin[idx].astype(np.float64))
