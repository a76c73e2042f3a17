"""Samplers: the registry of names users know, and the `sample` loop that runs one of them like diffusers would.

Each sampler is one pure loop `sample_x(x, sigmas, *, generator=None, callback=None, **opts)` on σ-space latents
(k-diffusion's samplers, written as generators that yield each denoiser request: common.py's step protocol). A `SamplerSpec` adds what diffusers' scheduler classes decide
implicitly: the sigma schedule (default / Karras / exponential), the timestep spacing and which diffusers scheduler's
grid conventions apply (`family`, see schedules.py).

Names. A1111 labels follow the diffusers mapping table (docs/api/schedulers/overview.md), i.e. A1111 before v1.9,
where "DPM++ 2M" and "DPM++ 2M Karras" were separate entries (A1111 >= 1.9 "Automatic" picks Karras for DPM++ 2M:
pass scheduler="karras"). ComfyUI sampler names and diffusers class names resolve too. Matching ignores case,
spaces, "_", "-" and reads "++" as "pp". "uni_pc" is UniPC bh2 (diffusers' default; ComfyUI's uni_pc is bh1:
ask for "uni_pc_bh1").

Schedulers (second argument of `resolve_sampler`): "automatic"/None keeps the sampler's sigmas and spacing;
"karras" -> Karras sigmas (ρ=7); "exponential" -> exponential sigmas with linspace spacing; "normal" -> linspace;
"simple"/"sgm_uniform" -> trailing (the diffusers mapping table); "leading"/"linspace"/"trailing" set the spacing.

Spacing. When neither the name nor the scheduler fixes it, the model's scheduler_config `timestep_spacing` is used,
and when the config has none (SD 1.x/2.x configs), the default of the diffusers class the sampler mirrors:
DDIM and LCM "leading", Euler/Euler a/Heun/DPM-Solver/UniPC "linspace" — what `<Class>.from_config(cfg)` does.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

from torch import Tensor

from ..errors import RequestError

from ..schedules import NoiseSchedule, SamplingGrid
from .common import Generator, Steps, drive, randn
from .ddim import sample_ddim
from .dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde
from .euler import sample_euler, sample_euler_ancestral, sample_heun
from .lcm import sample_lcm
from .unipc import sample_unipc

__all__ = ["SamplerSpec", "resolve_sampler", "list_samplers", "list_schedulers", "sample", "sampling_grid",
           "start", "to_vp", "drive", "Steps", "randn",
           "sample_ddim", "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m",
           "sample_dpmpp_2m_sde", "sample_unipc", "sample_lcm"]

# Timestep spacing a diffusers scheduler class uses when the config has no `timestep_spacing`.
DEFAULT_SPACING = {"ddim": "leading", "discrete": "linspace", "multistep": "linspace", "lcm": "leading"}


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler function plus the schedule choices that make it equal to a diffusers scheduler."""
    name: str                       # canonical (ComfyUI-style) name
    label: str                      # A1111 label
    fn: Callable[..., Tensor]
    family: str                     # whose grid conventions: ddim | discrete | multistep | lcm (schedules.py)
    sigmas: str = "default"         # default | karras | exponential
    spacing: str | None = None      # None: the config's timestep_spacing, else DEFAULT_SPACING[family]
    options: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))  # fn kwargs (eta, variant)
    aliases: tuple[str, ...] = ()
    stochastic: bool = False        # draws per-step noise from the generator
    diffusers: str = ""             # the diffusers scheduler (and settings) it reproduces
    takes_timesteps: bool = False   # fn also takes the grid's DDPM timesteps (LCM's boundary condition)

    def __reduce__(self):
        # A plan crosses processes (Ray Serve's model workers); a mappingproxy does not pickle, a dict does.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return _spec, (fields | {"options": dict(self.options)},)


def _spec(fields: dict) -> SamplerSpec:
    return SamplerSpec(**fields | {"options": MappingProxyType(fields["options"])})


_SAMPLERS = (
    SamplerSpec("euler", "Euler", sample_euler, "discrete", aliases=("k_euler", "EulerDiscreteScheduler"),
                diffusers="EulerDiscreteScheduler"),
    SamplerSpec("euler_ancestral", "Euler a", sample_euler_ancestral, "discrete",
                aliases=("euler_a", "k_euler_a", "k_euler_ancestral", "EulerAncestralDiscreteScheduler"),
                stochastic=True, diffusers="EulerAncestralDiscreteScheduler"),
    SamplerSpec("heun", "Heun", sample_heun, "discrete", aliases=("k_heun", "HeunDiscreteScheduler"),
                diffusers="HeunDiscreteScheduler"),
    SamplerSpec("dpmpp_2m", "DPM++ 2M", sample_dpmpp_2m, "multistep",
                aliases=("k_dpmpp_2m", "DPMSolverMultistepScheduler"), diffusers="DPMSolverMultistepScheduler"),
    SamplerSpec("dpmpp_2m_karras", "DPM++ 2M Karras", sample_dpmpp_2m, "multistep", "karras",
                aliases=("k_dpmpp_2m_ka",), diffusers="DPMSolverMultistepScheduler(use_karras_sigmas=True)"),
    SamplerSpec("dpmpp_2m_sde", "DPM++ 2M SDE", sample_dpmpp_2m_sde, "multistep", aliases=("k_dpmpp_2m_sde",),
                stochastic=True, diffusers="DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++')"),
    SamplerSpec("dpmpp_2m_sde_karras", "DPM++ 2M SDE Karras", sample_dpmpp_2m_sde, "multistep", "karras",
                aliases=("k_dpmpp_2m_sde_ka",), stochastic=True,
                diffusers="DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++', use_karras_sigmas=True)"),
    SamplerSpec("ddim", "DDIM", sample_ddim, "ddim", options=MappingProxyType({"eta": 0.0}), aliases=("DDIMScheduler",),
                diffusers="DDIMScheduler"),
    SamplerSpec("uni_pc", "UniPC", sample_unipc, "multistep", options=MappingProxyType({"variant": "bh2"}),
                aliases=("uni_pc_bh2", "UniPCMultistepScheduler"), diffusers="UniPCMultistepScheduler"),
    SamplerSpec("uni_pc_bh1", "UniPC bh1", sample_unipc, "multistep", options=MappingProxyType({"variant": "bh1"}),
                diffusers="UniPCMultistepScheduler(solver_type='bh1')"),
    SamplerSpec("lcm", "LCM", sample_lcm, "lcm", aliases=("k_lcm", "LCMScheduler"), stochastic=True,
                diffusers="LCMScheduler", takes_timesteps=True),
)

# scheduler name -> (timestep spacing, sigma schedule); None keeps the sampler's own choice.
_SCHEDULERS = {
    "automatic": (None, None), "normal": ("linspace", "default"), "karras": (None, "karras"),
    "exponential": ("linspace", "exponential"), "simple": ("trailing", "default"),
    "sgm_uniform": ("trailing", "default"), "leading": ("leading", None), "linspace": ("linspace", None),
    "trailing": ("trailing", None),
}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-.]", "", name.lower().replace("++", "pp"))


_BY_KEY = {_key(n): spec for spec in _SAMPLERS for n in (spec.name, spec.label, *spec.aliases)}


def list_samplers() -> list[SamplerSpec]:
    """Every registered sampler, in display order."""
    return list(_SAMPLERS)


def list_schedulers() -> list[str]:
    """Names accepted as `scheduler` by resolve_sampler."""
    return list(_SCHEDULERS)


def resolve_sampler(name: str, scheduler: str | None = None) -> SamplerSpec:
    """A1111 label / ComfyUI name / diffusers class name (+ optional ComfyUI-style scheduler) -> SamplerSpec."""
    spec = _BY_KEY.get(_key(name))
    if spec is None:
        raise RequestError("sampler", name, "one of " + ", ".join(f"{s.label} ({s.name})" for s in _SAMPLERS))
    if scheduler is None:
        return spec
    choice = {_key(k): v for k, v in _SCHEDULERS.items()}.get(_key(scheduler))
    if choice is None:
        raise RequestError("scheduler", scheduler, "one of " + ", ".join(_SCHEDULERS))
    spacing, sigmas = choice
    return dataclasses.replace(spec, spacing=spacing or spec.spacing, sigmas=sigmas or spec.sigmas)


def sampling_grid(spec: SamplerSpec, schedule: NoiseSchedule, steps: int, strength: float | None = None
                  ) -> SamplingGrid:
    """The σ/timestep grid `spec` runs for `steps` steps, as diffusers' StableDiffusion(Img2Img)Pipeline sets up
    the matching scheduler. strength (img2img, in (0, 1]): only the last min(int(steps·strength), steps) steps
    run (diffusers' `get_timesteps`); None for txt2img."""
    spacing = spec.spacing or schedule.timestep_spacing or DEFAULT_SPACING[spec.family]
    grid = schedule.grid(steps, spec.family, spacing, spec.sigmas)
    if strength is None:
        return grid
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ValueError(f"strength {strength} with {steps} steps runs no denoising step; raise strength or steps")
    return SamplingGrid(grid.sigmas[steps - run:], grid.timesteps[steps - run:], grid.noise_scale)


def start(spec: SamplerSpec, grid: SamplingGrid, noise: Tensor, init_latents: Tensor | None = None, *,
          generator: Generator = None, callback: Callable[[dict], bool | None] | None = None) -> Steps:
    """The sampler's steps (common.Steps) from `noise` (B, C, h, w), for txt2img (x = noise·noise_scale) or,
    given init_latents (scaled VAE latents), img2img from init_latents + σ_start·noise (`scheduler.add_noise`).
    The callback gets a dict per step (common.stop_requested); returning True stops with that step's x0."""
    x = noise * grid.noise_scale if init_latents is None else init_latents + noise * grid.sigmas[0]
    options = dict(spec.options, timesteps=grid.timesteps) if spec.takes_timesteps else spec.options
    return spec.fn(x, grid.sigmas, generator=generator, callback=callback, **options)


def to_vp(x: Tensor, grid: SamplingGrid, stopped: bool) -> Tensor:
    """A sampler's final σ-space sample -> VP latents (what the VAE decodes after dividing by its scaling
    factor): x_vp = x / sqrt(1 + σ_end²), σ_end = 0 when a callback stopped it with its x0 estimate."""
    sigma_end = 0.0 if stopped else float(grid.sigmas[-1])
    return x / (1 + sigma_end**2) ** 0.5


def sample(denoiser, noise: Tensor, spec: SamplerSpec, schedule: NoiseSchedule, steps: int, *,
           generator: Generator = None, callback: Callable[[dict], bool | None] | None = None,
           init_latents: Tensor | None = None, strength: float = 1.0) -> Tensor:
    """Run `spec` for `steps` steps with `denoiser` (D(x, σ) -> x0; denoiser.Denoiser), alone, as diffusers'
    StableDiffusion(Img2Img)Pipeline runs the matching scheduler; see `sampling_grid` and `start`. Returns VP
    latents. (Generation runs samplers through fastldm.run, which batches requests; this is the same loop
    for a single denoiser.)"""
    if init_latents is None and strength != 1.0:
        raise ValueError(f"strength {strength} needs init_latents (img2img); pass an image or strength=1.0")
    grid = sampling_grid(spec, schedule, steps, None if init_latents is None else strength)
    stopped = False

    def on_step(info: dict) -> bool:
        nonlocal stopped
        stopped = bool(callback(info))
        return stopped

    steps_ = start(spec, grid, noise, init_latents, generator=generator,
                   callback=on_step if callback is not None else None)
    return to_vp(drive(steps_, denoiser.on_grid(grid)), grid, stopped)
