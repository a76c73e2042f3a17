"""The denoiser D(x, σ) -> x0 that every sampler calls: UNet + input/output scalings + classifier-free guidance.

Samplers work in σ-space (x = x0 + σ·ε, Karras et al. 2022 §2). A DDPM-trained UNet wants the VP latent
x·c_in with c_in = 1/sqrt(σ²+1) and its timestep t; its output is turned into x0 by the prediction type:

    epsilon       x0 = x - σ·ε̂                                        (Ho et al. 2020)
    v_prediction  x0 = x/(σ²+1) - σ/sqrt(σ²+1)·v̂                       (Salimans & Ho 2022, §4)
    sample        x0 = x̂0

Classifier-free guidance (Ho & Salimans 2022): out = u + g·(c - u), applied to the raw model output (as diffusers
does) from ONE UNet call on the batch [uncond; cond]. With g == 1 or no uncond, only the cond half runs.
(diffusers skips CFG for every g <= 1; here 0 <= g < 1 still interpolates between uncond and cond.)
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from .schedules import NoiseSchedule, SamplingGrid


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of the guidance weight w·1000 for guidance-distilled (LCM) UNets, the `timestep_cond`
    of a UNet with `time_cond_proj_dim` (VDM, Kingma et al. 2021; diffusers `get_guidance_scale_embedding`).
    (B,) -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))  # (half,)
    args = (w.float() * 1000.0)[:, None] * freqs[None, :]                                           # (B, half)
    emb = torch.cat([args.sin(), args.cos()], dim=1)                                                # (B, 2·half)
    return torch.nn.functional.pad(emb, (0, dim % 2))                                               # (B, dim)


class Denoiser:
    """k-diffusion style denoiser: `D(x, sigma) -> x0`, x (B, C, h, w) in σ-space, sigma a float or (B,).

    unet(x_in, t, **cond_batch) -> model output, with x_in (B', C, h, w) = x·c_in, t (B',) float DDPM timesteps,
    and cond_batch the conditioning tensors (dim 0 = batch): `cond`, or [uncond; cond] concatenated along dim 0.

    guidance_embedding_dim: for guidance-distilled UNets (LCM, `time_cond_proj_dim`): the guidance goes into
    the UNet as `timestep_cond` = embedding of (guidance - 1), and no CFG batch is run (as diffusers'
    StableDiffusionPipeline does when the UNet has `time_cond_proj_dim`).
    """

    def __init__(self, unet, schedule: NoiseSchedule, cond: dict[str, Tensor], uncond: dict[str, Tensor] | None = None,
                 guidance: float = 1.0, *, guidance_embedding_dim: int | None = None):
        self.unet, self.schedule, self.guidance = unet, schedule, float(guidance)
        self.do_cfg = uncond is not None and self.guidance != 1.0 and guidance_embedding_dim is None
        if self.do_cfg and set(uncond) != set(cond):
            raise ValueError(f"uncond has keys {sorted(uncond)} but cond has {sorted(cond)}; "
                             "pass the same keys to both")
        self.cond = {k: torch.cat([uncond[k], v]) for k, v in cond.items()} if self.do_cfg else dict(cond)
        self.guidance_embedding_dim = guidance_embedding_dim
        self.grid: SamplingGrid | None = None

    def on_grid(self, grid: SamplingGrid) -> "Denoiser":
        """A copy that conditions the UNet on grid.timesteps[i] whenever it is called at exactly grid.sigmas[i]
        (diffusers' pairing; see SamplingGrid). Other σ fall back to the log-σ interpolation."""
        other = copy.copy(self)
        other.grid = grid
        return other

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """DDPM timesteps of σ -> (N,) float32 on the CPU: the grid's timestep where σ is exactly on the grid,
        else the log-σ interpolation of the schedule."""
        s = torch.as_tensor(sigma).detach().cpu().float().reshape(-1)                   # (N,)
        t = self.schedule.sigma_to_t(s).float()
        if self.grid is not None:
            hit = s[:, None] == self.grid.sigmas[None, :-1]                              # (N, n)
            t = torch.where(hit.any(dim=1), self.grid.timesteps[hit.float().argmax(dim=1)], t)
        return t

    def inputs(self, x: Tensor, sigma: Tensor | float) -> dict[str, Tensor]:
        """The UNet's keyword inputs for D(x, σ): sample (B', C, h, w) = c_in·x, timestep (B',) and the
        conditioning, B' = 2B with CFG ([uncond; cond]), else B. The batched run concatenates these across
        requests along dim 0 and calls the UNet once."""
        t = self.sigma_to_t(sigma).expand(x.shape[0]).to(x.device)                                     # (B,)
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(x.shape[0]).to(x.device)      # (B,)
        x_in = x / (sigma[:, None, None, None] ** 2 + 1) ** 0.5                                         # c_in·x
        extra = {}
        if self.guidance_embedding_dim is not None:
            w = torch.full((x.shape[0],), self.guidance - 1.0)
            extra["timestep_cond"] = guidance_embedding(w, self.guidance_embedding_dim).to(x.device, x.dtype)
        if self.do_cfg:
            x_in, t = torch.cat([x_in, x_in]), torch.cat([t, t])                # (2B, C, h, w), (2B,)
        cond = dict(self.cond)
        concat = cond.pop("c_concat", None)       # inputs concatenated to the latents (an inpainting UNet's mask)
        if concat is not None:
            x_in = torch.cat([x_in, concat.to(x_in.dtype)], dim=1)              # (B', C + Cc, h, w)
        return {"sample": x_in, "timestep": t, **cond, **extra}

    def output(self, out: Tensor, x: Tensor, sigma: Tensor | float) -> Tensor:
        """The UNet's output (B', C, h, w) for `inputs(x, sigma)` -> x0 (B, C, h, w): CFG, then the prediction
        type's scaling."""
        out = out.to(x.dtype)
        if self.do_cfg:
            uncond, cond = out.chunk(2)                                         # (B, C, h, w) each
            out = uncond + self.guidance * (cond - uncond)
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(x.shape[0]).to(x.device)[:, None, None, None]
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            return x - s * out
        if kind == "v_prediction":
            return out * (-s / (s**2 + 1) ** 0.5) + x / (s**2 + 1)
        return out

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        return self.output(call_unet(self.unet, self.inputs(x, sigma)), x, sigma)


def call_unet(unet, inputs: dict[str, Tensor]) -> Tensor:
    """unet(sample, timestep, **conditioning) for a dict from `Denoiser.inputs` (or a batch of them)."""
    cond = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}
    return unet(inputs["sample"], inputs["timestep"], **cond)
