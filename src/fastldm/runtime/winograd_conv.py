"""The UNet's 3×3 convolutions run as Winograd on a CPU: F(2×2, 3×3) in bf16 (ops/winograd_f2_cpu.py) in a bf16
model, F(4×4, 3×3) with fp32 GEMMs (ops/winograd_cpu.py) in an fp32 one.

Winograd's batched GEMMs do 2.25× (F(2×2)) or 4× (F(4×4)) fewer multiplies than a direct convolution. In fp32,
F(4×4) with its transforms in C++ runs a convolution at SD 1.5's full latent resolution 2.4-3.0× faster than
oneDNN's packed direct one (2 threads of an AVX2 EPYC; docs/benchmarks.md, "Winograd convolution in C++"). In
bf16 F(4×4) must still run its GEMMs in fp32 (its transforms' cancellation would cost ~10 % of max|y| in bf16),
which caps it at 1.1-1.4× a native bf16 convolution; F(2×2)'s transforms hold only 0, ±1 and ½, so its tiles,
weights and GEMMs stay bf16 (1.6-2.3× a bf16 direct convolution's error against fp64, 4-7e-3 of max|y|; a 512² SD 1.5 image as close to
the fp32 one as with direct bf16 convolutions, 44.7 dB): on an
AVX-512 bf16 EPYC it runs SD 1.5's layers 1.6-1.9× faster than oneDNN's bf16 direct convolution from 64² down to
16², 1.15× at 8², and slower below (0.6× at 4²: there a UNet's deepest levels, which only requests under 256²
reach with SD 1.5's three Winograd levels, run 1.5× slower than packed; still 2× faster than the plain
convolution a Winograd layer could fall back to, whose weight oneDNN reorders at every call).

Its price is memory: the transformed weights, held beside the plain ones (which the state dict, exports and a
fallback read), are 16/9 of a bf16 weight in F(2×2), 4× a 3×3 weight in fp32 (16 bytes per element) in
F(4×4). Which layers pay the most per byte is a matter of resolution: a layer's saving grows with the pixels it
convolves and its cost with its weight, and each level down the UNet has 4× fewer pixels and up to 4× more
weight per layer. So, levels counted from the latent's full resolution (level 0: the first down block's
resnets, the last up block's and the upsampler that feeds it):

- level 0 wherever the machine's tuning measured Winograd faster there: in fp32, 1.9 % of SD 1.5's weights
  (+253 MiB), for about 30 % of its convolution time at 256² (16 % of a fp32 UNet call); an fp32 model, whose
  peak RSS more transforms would lift above diffusers', keeps level 0 only;
- the deeper levels where tuning measured it faster at level 1 too *and* the transforms fit: the UNet's weights
  plus every transformed weight within what the same weights take in fp32 (`fits`), level by level from the
  top. In a bf16 SD 1.5 every level fits (1.60 GiB of weights + 1.3 GiB of transforms, against 3.2 GiB in
  fp32).

`fastldm.load` swaps the layers in where the machine's tuning measured Winograd faster at the model's shapes
(runtime/tuning.py), and a memory plan counts their transforms and buffers (runtime/memory_plan.py); not
under torch.compile.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import winograd, winograd_cpu, winograd_f2_cpu

TRANSFORM_CHUNK = 64  # output channels transformed at a time (WinogradConv2d._transformed)
MIN_CHANNELS = 32  # narrower convolutions (a UNet's conv_in and conv_out) are too thin a GEMM to pay


def unavailable(dtype: torch.dtype) -> str | None:
    """Why a UNet whose weights are in `dtype` cannot run Winograd layers here, or None: bf16 runs F(2×2), fp32
    F(4×4), each needing its C++ transforms (built on first use)."""
    if dtype == torch.bfloat16:
        return winograd_f2_cpu.unavailable()
    if dtype == torch.float32:
        return winograd_cpu.unavailable()
    return f"Winograd layers are for float32 or bfloat16 weights, not {dtype}"


def algorithm(dtype: torch.dtype) -> str:
    """The Winograd variant a layer with weights in `dtype` runs."""
    return "F(2x2, 3x3) in bf16" if dtype == torch.bfloat16 else "F(4x4, 3x3) with fp32 GEMMs"


class WinogradConv2d(nn.Module):
    """A 3×3, stride-1, padding-1 nn.Conv2d (groups 1) holding its weight plain and transformed for Winograd:
    F(2×2, 3×3) in bf16 for a bf16 weight, F(4×4, 3×3) in fp32 for an fp32 one. Takes (B, C, H, W), returns
    channels_last. Runs the plain convolution where Winograd does not apply (another dtype or device, autograd)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.register_buffer("weight", conv.weight.detach())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach())
        self.register_buffer("u", self._transformed(), persistent=False)

    def _transformed(self) -> torch.Tensor:
        """U = G g Gᵀ in the layout the layer's Winograd reads: for a bf16 weight F(2×2)'s (16, C, K) bf16
        (winograd_f2_cpu.transform_weight), else F(4×4)'s (36, C, K) fp32 whatever the weight's dtype, contiguous:
        the layout `bmm(V, U)` reads fastest. In fp32 (within 3e-8 of max|U| of ops/winograd.py's fp64 transform,
        far below the fp32 GEMMs' 1e-5) and TRANSFORM_CHUNK output channels at a time, written in place: a
        1280×1280 layer in 0.13 s instead of 0.41, with ~40 MB of scratch instead of 0.9 GB of fp64 copies."""
        w = self.weight.detach()
        if w.dtype == torch.bfloat16:
            return winograd_f2_cpu.transform_weight(w)
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
        if x.dtype == torch.bfloat16:
            return winograd_f2_cpu.conv(x, self.u, self.bias)
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
        return f"{self.in_channels}, {self.out_channels}, Winograd {algorithm(self.weight.dtype)}"


def eligible(conv: nn.Module) -> bool:
    """A float convolution Winograd F(4×4, 3×3) computes: 3×3, stride 1, padding 1, groups 1, wide enough."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1
            and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS)


def depth(unet: nn.Module) -> int:
    """How many resolution levels a UNet2DConditionModel (models/unet.py) has: one per down block."""
    return len(unet.down_blocks)


def level_convs(unet: nn.Module, level: int) -> list[str]:
    """Names of the 3×3 convolutions of a UNet2DConditionModel that run at 1/2**level of the latent's
    resolution, less those too narrow to pay (MIN_CHANNELS)."""
    return [name for name, m in unet.named_modules() if _at_level(unet, name, level) and eligible(m)]


def _at_level(unet: nn.Module, name: str, level: int) -> bool:
    """Whether the layer `name` of `unet` runs at 1/2**level of the latent's resolution: it is in down block
    `level` (whose downsampler, stride 2, no rule here admits), in the matching up block but not its upsampler
    (which runs a level up, after upsampling), in the upsampler of the up block before (which feeds it), or
    in the mid block at the deepest level."""
    up = len(unet.up_blocks) - 1 - level
    if up < 0 or level >= len(unet.down_blocks):
        return False
    if name.startswith(f"up_blocks.{up}."):
        return not name.startswith(f"up_blocks.{up}.upsamplers.")
    return (name.startswith(f"down_blocks.{level}.") or (up > 0 and name.startswith(f"up_blocks.{up - 1}.upsamplers."))
            or (level == len(unet.down_blocks) - 1 and name.startswith("mid_block.")))


def transformed_bytes(weight_elements: int, dtype: torch.dtype) -> int:
    """Bytes of the transformed weights of 3×3 convolutions with `weight_elements` weight elements in `dtype`:
    F(2×2)'s 16/9 of them in bf16, F(4×4)'s 36/9 in fp32."""
    return 32 * weight_elements // 9 if dtype == torch.bfloat16 else 16 * weight_elements


def buffer_bytes(rows: int, height: int, width: int, channels: int, dtype: torch.dtype) -> int:
    """Bytes of a Winograd layer's tile buffers V and M at once, for `rows` images of height × width whose
    input + output channels are `channels`: F(2×2)'s 16 bf16 planes of ⌈h/2⌉·⌈w/2⌉ tiles, F(4×4)'s 36 fp32
    planes of ⌈h/4⌉·⌈w/4⌉."""
    if dtype == torch.bfloat16:
        return 16 * 2 * rows * -(-height // 2) * -(-width // 2) * channels
    return 36 * 4 * rows * -(-height // 4) * -(-width // 4) * channels


def fits(weights: int, itemsize: int, transformed: int) -> bool:
    """Whether a UNet of `weights` parameter elements held `itemsize` bytes each may hold `transformed` bytes of
    Winograd transforms beyond its first level: all within the bytes its weights take in fp32."""
    return weights * itemsize + transformed <= 4 * weights


def levels_that_fit(level_weights: list[int], weights: int, dtype: torch.dtype, wanted: int) -> int:
    """How many of the first `wanted` levels, whose 3×3 weights have `level_weights` elements, a UNet of
    `weights` elements in `dtype` runs as Winograd: level 0 whenever wanted, each deeper one while `fits`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = min(wanted, 1, len(level_weights))
    while n < min(wanted, len(level_weights)) and fits(weights, itemsize,
                                                       transformed_bytes(sum(level_weights[:n + 1]), dtype)):
        n += 1
    return n


def winograd_levels(unet: nn.Module) -> int:
    """How many levels of `unet`, from the full resolution down, run as Winograd (0: none)."""
    swapped = [name for name, m in unet.named_modules() if isinstance(m, WinogradConv2d)]
    return max((level + 1 for level in range(depth(unet)) if any(_at_level(unet, n, level) for n in swapped)),
               default=0)


def use_winograd(unet: nn.Module, levels: int = 1) -> int:
    """Swap, in place, the 3×3 convolutions of the first `levels` levels of `unet` that fit (`levels_that_fit`)
    for WinogradConv2d layers holding the same weight tensors; returns how many. The caller checks
    `unavailable(dtype)` first."""
    names = [level_convs(unet, level) for level in range(depth(unet))]
    convs = [[unet.get_submodule(n) for n in level] for level in names]
    first = next((c[0] for c in convs if c), None)
    if first is None:
        return 0
    n = levels_that_fit([sum(c.weight.numel() for c in level) for level in convs],
                        sum(p.numel() for p in unet.parameters()), first.weight.dtype, levels)
    del convs, first  # names only from here: a list of modules would keep the plain layers alive
    swap = [name for level in names[:n] for name in level]
    for name in swap:
        parent, _, attr = name.rpartition(".")
        setattr(unet.get_submodule(parent), attr, WinogradConv2d(unet.get_submodule(name)))
    return len(swap)
