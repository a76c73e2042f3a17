"""int8 weights and activations (W8A8) on CPU, through oneDNN's quantized convolution and matmul kernels.

Affine integer quantization (Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", §2), applied post-training:
- weights: symmetric, per output channel, int8: w ≈ s_k · q_k, s_k = max|w_k| / 127; quantized and
  prepacked into oneDNN's blocked layout once (`onednn.qconv_prepack`, `onednn.qlinear_prepack`);
- activations: dynamic, per tensor, asymmetric uint8: x ≈ s · (q − z), s = (max x − min x) / 255,
  z = round(−min x / s), computed at every call (no calibration data); asymmetric because most conv
  inputs come out of SiLU (≥ −0.28), where a symmetric range would waste half the 256 levels;
- the int8 × uint8 products accumulate in int32 (VNNI `vpdpbusd`, AMX-int8 tiles); oneDNN rescales by
  s · s_k, adds the bias and writes the model's dtype in the GEMM epilogue.
With `winograd=True` (where the machine's tuning measured it faster) the UNet's 3×3 stride-1 convolutions run as
Winograd F(2×2, 3×3) with int8 GEMMs instead (`Int8WinogradConv2d`): F(2×2)'s input transform in bf16
(ops/winograd_f2_cpu.py), its tiles quantized like any int8 input, the transformed weights U = G g Gᵀ per tile
plane and output channel, 16 int8 matmuls and the output transform — 2.25× fewer multiplies for about twice the
int8 convolution's error (benchmarks/winograd_f2_int8_probe.py; its weights are 16/9 of the int8 ones).
Signed int8 activations would avoid the zero point, but oneDNN has no fast s8·s8 path on x86 (it falls
back to a reference loop ~2000× slower); uint8 with a zero point is what its VNNI kernels take.
`quantize_activation` (a min/max reduction and a few element-wise passes) is the price of dynamic
scales; `fused=True` (the default) runs it as one reduction and one pass: a C++ op (ops/quantize_u8_cpu.py, 5-17×
eager at SD 1.5's shapes), or where that cannot be built TorchInductor's fusion (2-4.7× eager, compiled once per
machine in ~11 s and cached, see runtime/compile.py).

With VNNI, SD 1.5's linears and convolutions ran 1.7-3× faster than oneDNN bf16 (docs/benchmarks.md,
"CPU fast path"). Which layers: every Conv2d and Linear of the UNet except the first and last convolutions and the
timestep / added-condition embeddings (tiny, and the most sensitive to rounding). The norms stay in bf16;
attention's two products run as int8 GEMMs where the tuning measured that faster (ops/int8_attention_cpu.py,
applied by runtime/optimize.py), else in bf16. Inference only; the quantized modules have no state dict.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from ..errors import BackendUnavailable
from ..ops import quantize_u8_cpu, winograd_f2_cpu
from .winograd_conv import eligible

SKIP = ("conv_in", "conv_out", "time_embedding", "add_embedding", "time_emb_proj")


def supported() -> str | None:
    """Why int8 cannot run here, or None."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return "this torch build has no oneDNN int8 kernels (torch.ops.onednn.qlinear_pointwise)"
    return None


def _weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (K, ...) -> (q int8 (K, ...), scales fp32 (K,)), symmetric per output channel."""
    w32 = w.detach().float()
    scale = w32.flatten(1).abs().amax(1).clamp_min(1e-12) / 127  # (K,)
    q = (w32 / scale.view(-1, *[1] * (w.dim() - 1))).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (any float) -> (q uint8 of x's shape and memory format, scale fp32 scalar, zero point int64
    scalar) with x ≈ scale · (q − zero point); the range always includes 0."""
    lo, hi = torch.aminmax(x.detach())
    lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
    scale = ((hi - lo) / 255).clamp_min(1e-12)
    zero = (-lo / scale).round_().clamp_(0, 255)
    q = (x.float() / scale).add_(zero).round_().clamp_(0, 255).to(torch.uint8)
    return q, scale, zero.long()


@functools.cache
def fused_quantizer() -> Callable:
    """`quantize_activation` in one C++ op (ops/quantize_u8_cpu.py: bit for bit the same, 2-2.6× faster than
    TorchInductor's fusion per call at SD 1.5's shapes, none of its per-call guards), eager for an input it does
    not take; where the C++ kernel cannot be built, compiled by TorchInductor (dynamic shapes), once per process
    (cached on disk where the program chose a persistent cache, compile.use_persistent_cache)."""
    if quantize_u8_cpu.unavailable() is not None:
        return torch.compile(quantize_activation, dynamic=True)

    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if quantize_u8_cpu.supports(x) is not None:
            return quantize_activation(x)
        return torch.ops.fastldm.quantize_u8(x)
    return quantize


class _Int8(nn.Module):
    """What both int8 layers keep of the float layer besides their packed weights: the activation quantizer,
    the weights' zero points (0: symmetric), the bias in fp32 and the dtype to return."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, quantize: Callable, dtype: torch.dtype | None = None):
        super().__init__()
        self.quantize = quantize
        self.dtype = dtype or layer.weight.dtype
        self.bias = None if layer.bias is None else layer.bias.detach().float()
        self.w_zp = torch.zeros(layer.weight.shape[0], dtype=torch.int64)


class Int8Conv2d(_Int8):
    """A Conv2d (any kernel size, stride, padding; groups 1) as int8 oneDNN convolution; a 1×1 one (stride 1, no
    padding) as an int8 matmul over its channels_last pixels instead: the same products, where oneDNN's int8
    convolution ran 1.2-3.7× slower at SD 1.5's 1×1 layers from 32² to 8² (2 × 1280 × 8 × 8: 2.05 against 0.56 ms
    on a 2-core AVX-512 VNNI EPYC; docs/benchmarks.md, "int8 attention")."""

    def __init__(self, conv: nn.Conv2d, quantize: Callable = quantize_activation, dtype: torch.dtype | None = None):
        super().__init__(conv, quantize, dtype)
        q, self.w_scale = _weight_int8(conv.weight)
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.pointwise = (conv.kernel_size == (1, 1) and self.stride == [1, 1] and self.padding == [0, 0]
                          and conv.groups == 1)
        if self.pointwise:
            self.packed = torch.ops.onednn.qlinear_prepack(q.flatten(1), None)   # (K, C)
        else:
            # x_scale and x_zero_point given to the prepack only select oneDNN's kernel; each call passes its own.
            self.packed = torch.ops.onednn.qconv_prepack(q, self.w_scale, 1.0, 128, self.stride, self.padding,
                                                         self.dilation, 1, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qx, scale, zero = self.quantize(x.contiguous(memory_format=torch.channels_last))
        if self.pointwise:
            B, C, H, W = qx.shape
            y = torch.ops.onednn.qlinear_pointwise.tensor(
                qx.permute(0, 2, 3, 1).reshape(B * H * W, C), scale, zero, self.packed, self.w_scale, self.w_zp,
                self.bias, 1.0, 0, self.dtype, "none", [], "")     # (B·H·W, K): channels_last's memory order
            return y.view(B, H, W, -1).permute(0, 3, 1, 2)        # (B, K, H, W) channels_last
        return torch.ops.onednn.qconv_pointwise.tensor(
            qx, scale, zero, self.packed, self.w_scale, self.w_zp, self.bias, self.stride,
            self.padding, self.dilation, 1, 1.0, 0, self.dtype, "none", [], "")  # (B, K, H', W') channels_last


class Int8WinogradConv2d(_Int8):
    """A 3×3, stride-1, padding-1 Conv2d (groups 1) as Winograd F(2×2, 3×3) with int8 GEMMs: x (B, C, H, W) ->
    (B, K, H, W) channels_last in `dtype`. V = Bᵀ d B in bf16 (16, P, C), quantized as one uint8 tensor; per tile
    plane k, U_k (K, C) quantized per output channel and prepacked; M_k = V_k · U_kᵀ by oneDNN's u8·s8 matmul into
    bf16; y = Aᵀ M A + bias."""

    def __init__(self, conv: nn.Conv2d, quantize: Callable = quantize_activation, dtype: torch.dtype | None = None):
        why = winograd_unavailable()
        if why is not None:
            raise BackendUnavailable(f"int8 Winograd is unavailable: {why}")
        super().__init__(conv, quantize, dtype)
        u = winograd_f2_cpu.transform_weight(conv.weight).float()  # (16, C, K)
        self.planes = []
        for k in range(16):
            q, scale = _weight_int8(u[k].t().contiguous())  # (K, C) int8, (K,); prepack reads it dense
            self.planes.append((torch.ops.onednn.qlinear_prepack(q, None), scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        v = torch.ops.fastldm.winograd_f2_input(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
        P = v.shape[1]
        qv, scale, zero = self.quantize(v.view(16 * P, C))  # (16·P, C) uint8
        m = torch.stack([torch.ops.onednn.qlinear_pointwise.tensor(
            qv[k * P:(k + 1) * P], scale, zero, packed, w_scale, self.w_zp, None, 1.0, 0, torch.bfloat16, "none",
            [], "") for k, (packed, w_scale) in enumerate(self.planes)])  # (16, P, K) bf16
        return torch.ops.fastldm.winograd_f2_output(m, self.bias, B, H, W).to(self.dtype)


def winograd_unavailable() -> str | None:
    """Why int8 layers cannot run as Winograd F(2×2) here, or None (its C++ transforms are built on first use)."""
    return supported() or winograd_f2_cpu.unavailable()


class Int8Linear(_Int8):
    """An nn.Linear as int8 oneDNN matmul on x (..., in) -> (..., out)."""

    def __init__(self, linear: nn.Linear, quantize: Callable = quantize_activation, dtype: torch.dtype | None = None):
        super().__init__(linear, quantize, dtype)
        q, self.w_scale = _weight_int8(linear.weight)
        self.out_features = linear.out_features
        self.packed = torch.ops.onednn.qlinear_prepack(q, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        qx, scale, zero = self.quantize(x.reshape(-1, x.shape[-1]))  # (M, in)
        y = torch.ops.onednn.qlinear_pointwise.tensor(
            qx, scale, zero, self.packed, self.w_scale, self.w_zp, self.bias, 1.0, 0,
            self.dtype, "none", [], "")  # (M, out)
        return y.view(*lead, self.out_features)


def int8_layer(dtype: torch.dtype | None = None, skip: tuple[str, ...] = SKIP, fused: bool = True,
               winograd: bool = False) -> Callable[[str, nn.Module], nn.Module]:
    """layer(name, module) -> its int8 form where `quantize_int8` would swap it, else the module: for a loader
    that quantizes each layer as soon as its weights are read (loading.load.build)."""
    why = supported()
    if why is not None:
        raise BackendUnavailable(f"int8 quantization is unavailable: {why}; run without quantization")
    quantize = fused_quantizer() if fused else quantize_activation

    def layer(name: str, module: nn.Module) -> nn.Module:
        if any(part in skip for part in name.split(".")):
            return module
        if winograd and eligible(module):
            return Int8WinogradConv2d(module, quantize, dtype)
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            return Int8Conv2d(module, quantize, dtype)
        if isinstance(module, nn.Linear):
            return Int8Linear(module, quantize, dtype)
        return module
    return layer


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = SKIP, fused: bool = True,
                  dtype: torch.dtype | None = None, winograd: bool = False) -> int:
    """Swap, in place, every Conv2d (groups 1) and Linear of `model` whose qualified name has no part in
    `skip` for its int8 form. Returns how many were swapped. CPU only. `fused`: quantize activations with
    the inductor-compiled quantizer (needs a C++ compiler, as torch.compile does), else in eager ops. dtype:
    what the int8 layers take and return (default: each float layer's dtype). Each layer is swapped as soon
    as it is quantized, so the float weights are released one layer at a time. winograd: the 3×3 stride-1
    convolutions as `Int8WinogradConv2d` (the caller checks `winograd_unavailable()`)."""
    why = supported()
    if why is not None:
        raise BackendUnavailable(f"int8 quantization is unavailable: {why}; run without quantization")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise BackendUnavailable("int8 quantization runs on CPU only; load the model on the CPU")
    quantize = fused_quantizer() if fused else quantize_activation
    n = 0
    names = [name for name, _ in model.named_modules()]  # names only: a list of modules would keep them alive
    for name in names:
        if any(part in skip for part in name.split(".")):
            continue
        module = model.get_submodule(name)
        if winograd and eligible(module):
            new = Int8WinogradConv2d(module, quantize, dtype)
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            new = Int8Conv2d(module, quantize, dtype)
        elif isinstance(module, nn.Linear):
            new = Int8Linear(module, quantize, dtype)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
        del module, new
        n += 1
    return n

