"""The runtime choices `fastldm.load` applies to freshly loaded modules, in one place.

On CPU (defaults, each measured in docs/benchmarks.md, "CPU fast path"):
- UNet and VAE in channels_last memory: oneDNN's convolutions run natively in NHWC, and the GroupNorm /
  elementwise ops between them then need no layout conversions (a bf16 3×3 conv: 1.5× faster than NCHW);
- the UNet's convolution weights, and its linears' where they run at few rows, prepacked into oneDNN's blocked
  layout (runtime/prepack.py; convolutions: a 256² UNet call 1.08-1.09× faster, 512² 1.01-1.02×; linears: 1.03×
  more at 256²), where its weights are fp32 or native bf16 and held in that dtype;
- the UNet's 3×3 convolutions as Winograd (runtime/winograd_conv.py), where it measured faster here: in an fp32
  model F(4×4, 3×3) at full resolution (2.4-3.0× faster per layer than packed oneDNN on an AVX2 EPYC; +253 MiB
  for SD 1.5); in a bf16 one F(2×2, 3×3) in bf16 (1.6-1.9× native bf16 oneDNN per layer from 64² to 16² on an
  AVX-512 bf16 EPYC), at full resolution and, where that measured faster too, at every level below whose
  transforms fit (+1.3 GiB for SD 1.5);
- `quant="int8"`: the UNet's convs and linears as int8 oneDNN kernels (runtime/quant.py), instead, and its
  attention with int8 GEMMs (ops/int8_attention_cpu.py) where that measured faster here.
The weights' dtype is chosen at load time (`device.default_dtype`), so they are converted once. Process-wide
settings (threads, allocator, the compile cache's folder) are not made here: the CLI and the server set them
once, explicitly (`device.configure_process`); a library call changes only the objects it returns.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import BackendUnavailable, SettingError
from ..models.layers import Attention
from ..ops.int8_attention_cpu import BACKEND as INT8_ATTENTION
from .prepack import KINDS, prepack
from .prepack import unsupported as unpackable
from .quant import quantize_int8
from .winograd_conv import depth, level_convs, use_winograd
from .winograd_conv import unavailable as winograd_unavailable

QUANT_MODES = (None, "int8")


def layout(name: str, module: nn.Module, device: torch.device) -> nn.Module:
    """`module` (component `name`) in the memory layout it runs in: channels_last for the UNet and VAE on CPU."""
    if device.type == "cpu" and name in ("unet", "vae"):
        return module.to(memory_format=torch.channels_last)
    return module


def optimize(modules: dict[str, nn.Module], device: torch.device, *, quant: str | None = None,
             dtype: torch.dtype | None = None, pack: frozenset[str] = KINDS,
             winograd_levels: int | None = None, int8_winograd: bool = False,
             int8_attention: bool = False) -> dict[str, nn.Module]:
    """Apply the runtime choices to `modules` ({"text_encoder", "unet", "vae", ...}, any of them) in place;
    returns them. dtype: what an int8 UNet computes and returns (default: its weights' dtype; a memory plan
    loads it in fp16 to quantize, and computes in fp32). pack: which of a float UNet's layers to prepack on CPU,
    of "conv", "linear", "winograd" (the full-resolution convolutions, transformed for Winograd instead of
    packed for oneDNN) and "winograd2" (with "winograd": the deeper levels' too, as far as their transforms fit,
    runtime/winograd_conv.py); the caller passes none where the weights are stored in 16 bits and widened per call,
    and only the kinds the machine's tuning measured faster. winograd_levels: at most that many levels as
    Winograd (a memory plan's choice; default: as many as `pack` asks for). int8_winograd: with `quant="int8"`, the
    UNet's 3×3 convolutions as Winograd F(2×2) with int8 GEMMs (runtime/quant.py; where tuning measured it faster).
    int8_attention: the UNet's attention layers prefer int8 GEMMs (ops/int8_attention_cpu.py) where they can run
    them; for an int8 UNet (with `quant="int8"`, or quantized while read), where tuning measured it faster."""
    if quant not in QUANT_MODES:
        raise SettingError(f"unknown quantization {quant!r}; use one of: int8 (or none)")
    for name in ("unet", "vae"):
        if name in modules:
            modules[name] = layout(name, modules[name], device)
    if device.type != "cpu" and quant is not None:
        raise BackendUnavailable(f"{quant} quantization runs on CPU only; load the model on the CPU or without "
                                 f"quantization")
    if quant == "int8" and "unet" in modules:
        quantize_int8(modules["unet"], dtype=dtype, winograd=int8_winograd)
        if dtype is not None:
            modules["unet"].to(dtype)  # what stays float (norms, unquantized layers) computes in `dtype`
    elif device.type == "cpu" and "unet" in modules:
        kinds = packable(modules["unet"], pack)
        levels = winograd_wanted(kinds, device, next(modules["unet"].parameters()).dtype, depth(modules["unet"]))
        if levels:  # before prepack: these layers are no longer nn.Conv2d
            use_winograd(modules["unet"], levels if winograd_levels is None else min(levels, winograd_levels))
        prepack(modules["unet"], kinds - {"winograd", "winograd2"})
    if int8_attention and "unet" in modules:
        for m in modules["unet"].modules():
            if isinstance(m, Attention):
                m.backend = INT8_ATTENTION
    return modules


def winograd_wanted(kinds: frozenset[str], device: torch.device, dtype: torch.dtype, levels: int) -> int:
    """How many levels of a UNet of `levels` levels `optimize(pack=kinds)` runs as Winograd on `device` for weights
    in `dtype`, before the memory rule of the deeper ones (winograd_conv.levels_that_fit): 0, 1 or `levels`. What
    a memory plan is asked to count (runtime/memory_plan.py)."""
    if "winograd" not in kinds or device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return 0
    return levels if "winograd2" in kinds else 1


def packable(unet: nn.Module, kinds: frozenset[str] = KINDS) -> frozenset[str]:
    """Which of `kinds` `unet` has layers of that can be prepacked: float weights oneDNN packs on this CPU, not
    already packed or quantized; for "winograd", fp32 or bf16 full-resolution convolutions and a built C++
    kernel ("winograd2" with it)."""
    found = set()
    if "winograd" in kinds:
        names = level_convs(unet, 0) if hasattr(unet, "up_blocks") else []
        w = unet.get_submodule(names[0]).weight if names else None
        if (w is not None and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16)
                and winograd_unavailable(w.dtype) is None):
            found |= {"winograd"} | ({"winograd2"} & kinds)
    for kind, cls in (("conv", nn.Conv2d), ("linear", nn.Linear)):
        w = next((m.weight for m in unet.modules() if isinstance(m, cls)), None) if kind in kinds else None
        if w is not None and w.device.type == "cpu" and unpackable(w.dtype, kind) is None:
            found.add(kind)
    return frozenset(found)
