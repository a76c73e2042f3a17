"""What every sampler shares: the step protocol, per-step noise drawn as diffusers draws it, the per-step callback.

The step protocol. A sampler is a generator function `sample_x(x, sigmas, *, generator, callback, **opts)`
that yields `(x, sigma)` whenever it needs the denoiser D(x, σ) and is sent the x0 estimate back; it returns
its final sample. Whoever drives it owns the denoiser: `drive` calls one directly, and the runtime's batched
run (fastldm.run) answers the pending requests of many samplers with one UNet call, so requests can share a
batch, join it between steps and leave it when their own steps are done, while each sampler stays one pure
loop in the form its paper gives.
"""
from __future__ import annotations

from typing import Callable, Generator as PyGenerator

import torch
from torch import Tensor

Generator = torch.Generator | list[torch.Generator] | None
Steps = PyGenerator[tuple[Tensor, Tensor], Tensor, Tensor]  # yields (x, σ), is sent D(x, σ), returns x


def drive(steps: Steps, denoiser: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Run a sampler's steps to the end with `denoiser` answering each request; returns the final sample."""
    try:
        request = next(steps)
        while True:
            request = steps.send(denoiser(*request))
    except StopIteration as done:
        return done.value


def randn(shape: tuple[int, ...] | torch.Size, generator: Generator = None, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise drawn like diffusers' `randn_tensor`: on the generator's device, then moved to
    `device`; a list of generators draws item b of the batch from generator[b] with shape (1, ...)."""
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; "
                             "pass one per image or a single one")
        items = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(items).to(device)                                             # (B, ...)
    rand_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


def stop_requested(callback: Callable[[dict], bool | None] | None, i: int, sigmas: Tensor, x: Tensor,
                   denoised: Tensor) -> bool:
    """Report step i to the callback: x = the σ-space sample now at sigmas[i+1], denoised = the x0 prediction
    made at sigmas[i]. True = the callback asks to stop now."""
    if callback is None:
        return False
    info = {"i": i, "total": len(sigmas) - 1, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "x": x,
            "denoised": denoised}
    return bool(callback(info))
