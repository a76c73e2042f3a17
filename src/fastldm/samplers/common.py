"""What every sampler shares: per-step noise drawn as diffusers draws it, and the per-step callback."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Generator = torch.Generator | list[torch.Generator] | None


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
