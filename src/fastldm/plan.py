"""Request -> Plan: every field of a GenerationRequest checked against a model and resolved into the exact work
one run does (size, sampler, σ grid, steps after "auto" and img2img strength, seeds, guidance, executor).

A Plan is immutable and complete: running it twice gives the same images, and nothing downstream reads the
request's defaults again. Every bad field raises one RequestError naming the field, the value and the allowed
range; `Limits` holds the ranges, so the CLI, the Python API and the HTTP server (which passes tighter ones)
apply the same checks.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

from .errors import RequestError
from .request import GenerationRequest
from .runtime.memory_plan import MemoryPlan
from .samplers import SamplerSpec, resolve_sampler, sampling_grid
from .schedules import SamplingGrid

MAX_SEED = 2**63 - 1   # torch.Generator.manual_seed takes 64-bit seeds; image i of a batch uses seed + i


@dataclass(frozen=True)
class Limits:
    """What a request may ask for. The defaults bound the library (the CLI uses them); a server passes its own."""
    max_steps: int = 1000
    max_n: int = 64
    max_side: int = 8192           # pixels, width and height each
    max_pixels: int | None = None  # width · height; None: only max_side
    max_guidance: float = 100.0
    max_cache_interval: int = 100
    max_prompt_chars: int = 20000  # prompts are encoded 75 tokens at a time: this bounds the chunks


@dataclass(frozen=True)
class Plan:
    """One request, resolved against one model. `steps` is the count asked for (after "auto"); `grid` holds
    the σ and timesteps that actually run (the last int(steps · strength) of them for img2img)."""
    request: GenerationRequest
    width: int
    height: int
    latent_shape: tuple[int, int, int]      # (C, h, w) of one image's UNet latents
    sampler: SamplerSpec
    steps: int
    grid: SamplingGrid
    seeds: tuple[int, ...]
    guidance: float
    strength: float | None                  # img2img denoising strength; None for txt2img
    executor: str                           # runtime.executors.KINDS
    memory: MemoryPlan | None = None        # the pipeline's memory plan for this size (UNet rows, VAE tiling)

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def denoising_steps(self) -> int:
        """The sampler steps that run (grid length), before any early stop."""
        return len(self.grid.sigmas) - 1


def _range(field: str, value, lo, hi, what: str = "a whole number") -> None:
    if not lo <= value <= hi:
        raise RequestError(field, value, f"{what} from {lo} to {hi}")


def resolve(pipe, request: GenerationRequest, limits: Limits = Limits()) -> Plan:
    """Check `request` against `pipe`'s model and `limits`; resolve defaults, "auto" steps and the seed."""
    request = request.checked()
    r, config = request, pipe.config
    if len(r.prompt) > limits.max_prompt_chars or len(r.negative_prompt) > limits.max_prompt_chars:
        field = "prompt" if len(r.prompt) > limits.max_prompt_chars else "negative_prompt"
        raise RequestError(field, f"<{len(getattr(r, field))} characters>",
                           f"at most {limits.max_prompt_chars} characters")
    spec = resolve_sampler(r.sampler, r.scheduler)

    width, height = (config.default_size if v is None else v for v in (r.width, r.height))
    f = math.lcm(8, config.vae_scale)
    side_max = limits.max_side // f * f
    for field, v in (("width", width), ("height", height)):
        if v % f or not f <= v <= side_max:
            near = min(max(f, v // f * f), side_max)
            raise RequestError(field, v, f"a multiple of {f} from {f} to {side_max} (e.g. {near})")
    if limits.max_pixels is not None and width * height > limits.max_pixels:
        raise RequestError("width", f"{width}x{height}", f"at most {limits.max_pixels} pixels in all")

    _range("n", r.n, 1, limits.max_n)
    _range("cache_interval", r.cache_interval, 1, limits.max_cache_interval)
    if not 0.0 <= (r.guidance if r.guidance is not None else 0.0) <= limits.max_guidance:
        raise RequestError("guidance", r.guidance, f"a number from 0 to {limits.max_guidance:g}")
    if r.early_stop is not None and r.early_stop < 0:
        raise RequestError("early_stop", r.early_stop, "a threshold >= 0 (0 never stops), or none")
    seed = r.seed if r.seed not in (None, -1) else random.randrange(2**32 - 1)
    _range("seed", seed, 0, MAX_SEED - (r.n - 1), "a seed (or -1 for a random one)")
    img2img = r.init_image is not None
    if img2img and not 0.0 < r.strength <= 1.0:
        raise RequestError("strength", r.strength, "a denoising strength in (0, 1]")

    if r.steps == "auto":
        steps = pipe.auto_steps(r.prompt, spec)
    else:
        _range("steps", r.steps, 1, limits.max_steps, "a number of steps")
        steps = r.steps
    if img2img and int(steps * r.strength) < 1:
        raise RequestError("strength", r.strength, f"at least {1 / steps:.3g} with {steps} steps (no step would run)")
    grid = sampling_grid(spec, pipe.schedule, steps, r.strength if img2img else None)

    guidance = config.default_guidance if r.guidance is None else r.guidance
    guided = guidance != 1.0 and not config.unet.time_cond_proj_dim
    # Refused here, before any work, when even its smallest plan would not fit the pipeline's budget.
    memory = pipe.memory.for_request(width, height, r.n, guided)
    return Plan(request=dataclasses.replace(r, guidance=guidance), width=width, height=height,
                latent_shape=(config.unet.out_channels, height // config.vae_scale, width // config.vae_scale),
                sampler=spec, steps=steps, grid=grid, seeds=tuple(seed + i for i in range(r.n)), guidance=guidance,
                strength=r.strength if img2img else None, executor=pipe.unet_runtime.kind(r.cache_interval),
                memory=memory)
