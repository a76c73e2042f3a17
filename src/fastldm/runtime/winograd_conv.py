"""The UNet's full-resolution 3×3 convolutions run as Winograd F(4×4, 3×3) on a CPU (ops/winograd_cpu.py).

Winograd's batched GEMM does 4× fewer multiplies than a direct convolution; with its transforms in C++ a
convolution at SD 1.5's full latent resolution runs 2.4-3.0× faster than oneDNN's packed direct one (fp32,
2 threads of an AVX2 EPYC; docs/benchmarks.md, "Winograd convolution in C++"), and 1.1-1.4× faster than a
native bf16 one on an AVX-512 bf16 EPYC (bf16 images in and out, its GEMMs still fp32). Its price is memory: the
transformed weights are 4× the 3×3 weights in fp32 (16 bytes per weight element, in a bf16 model too), held
beside the plain ones (which the state dict, exports and a fallback read). Which layers pay the most per byte
is a matter of resolution: a layer's saving grows with the pixels it convolves and its cost with its weight,
and each level down the UNet has 4× fewer pixels and up to 4× more weight per layer. So:

- level 0, the latent's full resolution (the first down block's resnets, the last up block's and the
  upsampler that feeds it), wherever the machine's tuning measured Winograd faster there: 1.9 % of SD 1.5's
  weights (+253 MiB), for about 30 % of its convolution time at 256² (16 % of a fp32 UNet call);
- level 1, half the resolution, where tuning measured it faster too *and* its transforms fit: the UNet's
  weights plus every transformed weight within what the same weights take in fp32 (`fits_next_level`). That
  is a 16-bit model only (SD 1.5 in bf16: 1.60 GiB of weights + 0.25 + 0.93 GiB of transforms, against
  3.2 GiB in fp32), where it makes a 512² UNet call 1.05× faster on the AVX-512 box (4.32 → 4.12 s) and
  leaves a 256² one as it was; an fp32 model, whose peak RSS the transforms would lift above diffusers', keeps
  level 0 only;
- the deeper levels would take several GB for less again: never.

The arithmetic is fp32 in a bf16 model too (bf16 transforms or GEMMs cost ~10 % of max|y|, ops/winograd.py):
there the layer rounds only its output to bf16, as a bf16 direct convolution does (measured: the same error
against an fp64 convolution, 3-4e-3 of max|y|). In fp32 the error is ~1e-5 of max|y| per layer, 5-36× a
direct convolution's. `fastldm.load` swaps the layers in where the machine's tuning measured Winograd
faster at the model's full-resolution shape (runtime/tuning.py), not under a memory plan (whose predictions
count plain weights) or torch.compile.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import winograd, winograd_cpu

TRANSFORM_CHUNK = 64  # output channels transformed at a time (WinogradConv2d._transformed)
MIN_CHANNELS = 32  # narrower convolutions (a UNet's conv_in and conv_out) are too thin a GEMM to pay


class WinogradConv2d(nn.Module):
    """A 3×3, stride-1, padding-1 nn.Conv2d (groups 1) holding its weight plain and transformed for Winograd
    F(4×4, 3×3). Takes (B, C, H, W), returns channels_last. Runs the plain convolution where Winograd does not
    apply (another dtype or device, autograd)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.register_buffer("weight", conv.weight.detach())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach())
        self.register_buffer("u", self._transformed(), persistent=False)

    def _transformed(self) -> torch.Tensor:
        """U = G g Gᵀ as (36, C, K) fp32 whatever the weight's dtype (Winograd's arithmetic is fp32), contiguous:
        the layout `bmm(V, U)` reads fastest. In fp32 (within 3e-8 of max|U| of ops/winograd.py's fp64 transform,
        far below the fp32 GEMMs' 1e-5) and TRANSFORM_CHUNK output channels at a time, written in place: a
        1280×1280 layer in 0.13 s instead of 0.41, with ~40 MB of scratch instead of 0.9 GB of fp64 copies."""
        w = self.weight.detach()
        K, C = w.shape[:2]
        gg = torch.kron(winograd.G, winograd.G).float()  # (36, 9)
        u = torch.empty(36, C, K, device=w.device)
        for k0 in range(0, K, TRANSFORM_CHUNK):
            block = w[k0:k0 + TRANSFORM_CHUNK].float().reshape(-1, C, 9)  # (k, C, 9)
            k = block.shape[0]
            u[:, :, k0:k0 + k] = (gg @ block.permute(2, 1, 0).reshape(9, C * k)).view(36, C, k)  # (36, C, k)
        return u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype not in (torch.float32, torch.bfloat16) or x.dtype != self.weight.dtype
                or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad)):
            return F.conv2d(x, self.weight, self.bias, 1, 1)
        return winograd_cpu.conv(x, self.u, self.bias)

    def _apply(self, fn, recurse=True):
        """`.to()`, `.float()` and the like convert the plain weight; the transform is made again from it."""
        super()._apply(fn, recurse)
        self.u = self._transformed()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.u = self._transformed()

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, Winograd F(4x4, 3x3), {self.weight.dtype}"


def eligible(conv: nn.Module) -> bool:
    """A float convolution Winograd F(4×4, 3×3) computes: 3×3, stride 1, padding 1, groups 1, wide enough."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1
            and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS)


def level_convs(unet: nn.Module, level: int) -> list[str]:
    """Names of the 3×3 convolutions of a UNet2DConditionModel (models/unet.py) that run at 1/2**level of the
    latent's resolution, less those too narrow to pay (MIN_CHANNELS)."""
    return [name for name, m in unet.named_modules() if _at_level(unet, name, level) and eligible(m)]


def _at_level(unet: nn.Module, name: str, level: int) -> bool:
    """Whether the layer `name` of `unet` runs at 1/2**level of the latent's resolution: it is in down block
    `level` (whose downsampler, stride 2, no rule here admits), in the matching up block but not its upsampler
    (which runs a level up, after upsampling), or in the upsampler of the up block before (which feeds it)."""
    up = len(unet.up_blocks) - 1 - level
    if up < 0 or level >= len(unet.down_blocks):
        return False
    if name.startswith(f"up_blocks.{up}."):
        return not name.startswith(f"up_blocks.{up}.upsamplers.")
    return name.startswith(f"down_blocks.{level}.") or (up > 0 and name.startswith(f"up_blocks.{up - 1}.upsamplers."))


def transformed_bytes(weight_elements: int) -> int:
    """Bytes of the transformed weights of 3×3 convolutions with `weight_elements` weight elements: 36/9 fp32."""
    return 4 * 4 * weight_elements


def fits_next_level(weights: int, itemsize: int, transformed: int) -> bool:
    """Whether a UNet of `weights` parameter elements held `itemsize` bytes each may hold `transformed` bytes of
    Winograd transforms for levels 0 and 1: all within the bytes its weights take in fp32."""
    return weights * itemsize + transformed <= 4 * weights


def winograd_levels(unet: nn.Module) -> int:
    """How many levels of `unet` run as Winograd: 0, 1 (the full resolution) or 2 (and half of it)."""
    swapped = [name for name, m in unet.named_modules() if isinstance(m, WinogradConv2d)]
    return 0 if not swapped else 2 if any(_at_level(unet, name, 1) for name in swapped) else 1


def use_winograd(unet: nn.Module, next_level: bool = False) -> int:
    """Swap, in place, the full-resolution convolutions of `unet` for WinogradConv2d layers holding the same
    weight tensors, and with `next_level` (measured faster there) the half-resolution ones too where
    `fits_next_level`; returns how many. The caller checks `winograd_cpu.unavailable()` and the dtype first."""
    names = level_convs(unet, 0)
    if next_level:
        more = level_convs(unet, 1)
        weights = sum(p.numel() for p in unet.parameters())
        elements = sum(unet.get_submodule(n).weight.numel() for n in names + more)
        if more and fits_next_level(weights, unet.get_submodule(more[0]).weight.element_size(),
                                    transformed_bytes(elements)):
            names += more
    for name in names:  # names only: a list of modules would keep the plain layers alive
        parent, _, attr = name.rpartition(".")
        setattr(unet.get_submodule(parent), attr, WinogradConv2d(unet.get_submodule(name)))
    return len(names)
