"""The runtime choices `fastldm.load` applies to freshly loaded modules, in one place.

On CPU (defaults, each measured in docs/benchmarks.md, "CPU fast path"):
- threads and allocator: `device.configure_cpu` (one thread per available CPU; freed memory reused);
- UNet and VAE in channels_last memory: oneDNN's convolutions run natively in NHWC, and the GroupNorm /
  elementwise ops between them then need no layout conversions (a bf16 3×3 conv: 1.5× faster than NCHW);
- `quant="int8"`: the UNet's convs and linears as int8 oneDNN kernels (runtime/quant.py);
- `compile=True`: the UNet through TorchInductor with a persistent cache (runtime/compile.py). Off by
  default: a first compile of SD 1.5 takes minutes on a 2-core machine and gained little there.
The weights' dtype is chosen at load time (`device.default_dtype`), so they are converted once.
"""
from __future__ import annotations

import torch
from torch import nn

from .compile import compile_module
from .device import configure_cpu
from .quant import quantize_int8

QUANT_MODES = (None, "int8")


def optimize(modules: dict[str, nn.Module], device: torch.device, *, compile: bool | None = None,
             quant: str | None = None, threads: int | None = None) -> dict[str, nn.Module]:
    """Apply the runtime choices to `modules` ({"text_encoder", "unet", "vae", ...}) in place; returns them."""
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown quantization {quant!r}; use one of: int8 (or none)")
    if device.type == "cpu":
        configure_cpu(threads)
        for name in ("unet", "vae"):
            modules[name] = modules[name].to(memory_format=torch.channels_last)
    elif quant is not None:
        raise ValueError(f"--quant {quant} runs on CPU only; use --device cpu or drop --quant")
    if quant == "int8":
        quantize_int8(modules["unet"])
    if compile:  # None (not told) = off, see the module docstring
        compile_module(modules["unet"])
    return modules
