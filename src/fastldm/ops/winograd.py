"""Winograd convolution F(4×4, 3×3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks").

Each 4×4 output tile of a 3×3, stride-1, padding-1 convolution is Y = Aᵀ [ Σ_c (G g Gᵀ) ⊙ (Bᵀ d B) ] A,
where d is the 6×6 input tile and g the 3×3 filter. Over all tiles this is
    U = G g Gᵀ          (36, K, C)  weights, transformed once
    V = Bᵀ d B          (36, C, P)  input transform, P = batch · tiles
    M = U @ V           (36, K, P)  36 batched GEMMs
    y = Aᵀ M A          (B, K, H, W) output transform
which takes 36 multiplies per 16 outputs per channel pair instead of 144 (2.25 vs 9 per output).
Chen et al. 2023 ("Speed Is All You Need", §3.3) apply it to every 3×3 stride-1 convolution.

Costs, stated up front:
- Accuracy: the transforms have coefficients up to 5 (Bᵀ) and 8 (Aᵀ) and cancel, so the error is larger
  than direct convolution's in the same dtype: measured 5-36× F.conv2d's error in fp32 (~1e-5 of max|y|)
  and 23-55× in fp16/bf16 (~1% of max|y| in fp16, ~10% in bf16); tests/ops/test_winograd.py bounds it.
- Memory: transformed weights are 36/9 = 4× the 3×3 weights (kept in the active selection's cache, `weights()`); per call the tile
  buffers V and M are 36/16 = 2.25× the (tile-padded) input and output.
Inference only (the cached weight transform does not carry gradients). This module is plain PyTorch and
runs anywhere; fastldm.ops.triton.winograd swaps in Triton input/output transforms on CUDA.
"""
from __future__ import annotations

import functools
import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from . import registry

# The F(4×4, 3×3) matrices of Lavin & Gray 2016, from the interpolation points 0, ±1, ±2, ∞.
BT = torch.tensor([[4, 0, -5, 0, 1, 0],
                   [0, -4, -4, 1, 1, 0],
                   [0, 4, -4, -1, 1, 0],
                   [0, -2, -1, 2, 1, 0],
                   [0, 2, -1, -2, 1, 0],
                   [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
G = torch.tensor([[1 / 4, 0, 0],
                  [-1 / 6, -1 / 6, -1 / 6],
                  [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6],
                  [0, 0, 1]], dtype=torch.float64)
AT = torch.tensor([[1, 1, 1, 1, 1, 0],
                   [0, 1, -1, 2, -2, 0],
                   [0, 1, 1, 4, 4, 0],
                   [0, 1, -1, 8, -8, 1]], dtype=torch.float64)
# Aᵀ's second column is all ones: a constant added to plane (1, 1) of M reaches all 16 outputs of a tile.
BIAS_PLANE = 1 * 6 + 1


def transform_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(K, C, 3, 3) -> U = G g Gᵀ as (36, K, C), computed in float64 and stored in `dtype` (default: the
    weight's)."""
    K, C = weight.shape[:2]
    gg = torch.kron(G, G).to(weight.device)  # (36, 9): gg[6i + j, 3a + b] = G[i, a]·G[j, b]
    u = gg @ weight.detach().double().reshape(K * C, 9).T  # (36, K·C)
    return u.reshape(36, K, C).to(dtype or weight.dtype)


class TransformedWeights:
    """The weight transforms, computed once per weight tensor: a bounded LRU keyed by tensor identity.

    An entry is found through the weight's data_ptr and checked against a weak reference to the weight
    (a freed tensor's address can be reused) and its version counter (an in-place edit invalidates it;
    inference-mode tensors have no counter: call `clear()` after editing them in place). Entries go when
    their weight is freed, or least-recently-used first once they exceed `max_bytes`."""

    def __init__(self, max_bytes: int = 4 << 30):
        self.max_bytes = max_bytes
        # (data_ptr, dtype of U) -> (weak reference to the weight, its version, U)
        self._entries: OrderedDict[tuple, tuple[weakref.ref, int | None, torch.Tensor]] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for _, _, u in self._entries.values())

    def get(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """U of `weight` in `dtype` (default: the weight's), transformed on the first call."""
        key, version = (weight.data_ptr(), dtype or weight.dtype), None if weight.is_inference() else weight._version
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is weight and entry[1] == version:
            self._entries.move_to_end(key)
            return entry[2]
        u = transform_weight(weight, dtype)
        self._entries[key] = (weakref.ref(weight, lambda _, k=key: self._forget(k)), version, u)
        self._entries.move_to_end(key)
        while len(self._entries) > 1 and self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)
        return u

    def _forget(self, key: tuple[int, torch.dtype]) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is None:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()


def weights() -> TransformedWeights:
    """The transformed-weight cache of the active kernel selection (registry.Kernels): each Pipeline owns
    its own, bounded by `max_bytes`."""
    return registry.cache("winograd", TransformedWeights)


def prepare(module: nn.Module) -> int:
    """Transform now the weights of every conv in `module` that Winograd can run (3×3, stride 1,
    padding 1, no dilation or groups), so the first denoising step does not pay for it. Returns the
    bytes the transformed weights take."""
    for m in module.modules():
        if (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1)
                and m.padding == (1, 1) and m.dilation == (1, 1) and m.groups == 1):
            weights().get(m.weight)
    return weights().nbytes


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1,
             padding: int = 0) -> str | None:
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        return f"Winograd F(4x4, 3x3) needs a 3x3 kernel and a 4-D input, got weight {tuple(weight.shape)}"
    if stride != 1 or padding != 1:
        return f"Winograd needs stride 1 and padding 1, got stride {stride}, padding {padding}"
    if weight.shape[1] != x.shape[1]:
        return f"input has {x.shape[1]} channels, weight expects {weight.shape[1]} (grouped convs unsupported)"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or weight.dtype != x.dtype:
        return f"x and weight must share a float dtype, got {x.dtype} and {weight.dtype}"
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device):
        return "bias must match x in dtype and device"
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return "Winograd is inference-only; run under torch.no_grad() or torch.inference_mode()"
    return None


def tile_counts(H: int, W: int) -> tuple[int, int]:
    """Number of 4×4 output tiles down and across."""
    return -(-H // 4), -(-W // 4)


@functools.cache
def _matrix(name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """BT or AT on `device` in `dtype`, copied there once: a copy per call would be a host-to-device
    transfer inside every conv, which a CUDA graph cannot capture."""
    return {"BT": BT, "AT": AT}[name].to(device, dtype)


def transform_input(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) -> V = Bᵀ d B for every 6×6 tile d (stride 4, zero padding): (36, C, B·nH·nW)."""
    B, C, H, W = x.shape
    nH, nW = tile_counts(H, W)
    xp = F.pad(x, (1, 4 * nW + 1 - W, 1, 4 * nH + 1 - H))  # (B, C, 4nH + 2, 4nW + 2)
    d = xp.unfold(2, 6, 4).unfold(3, 6, 4)  # (B, C, nH, nW, 6, 6), a view
    bt = _matrix("BT", x.device, x.dtype)
    v = torch.einsum("ia,bcnmaz,jz->ijcbnm", bt, d, bt)  # (6, 6, C, B, nH, nW)
    return v.reshape(36, C, B * nH * nW)


def transform_output(m: torch.Tensor, B: int, H: int, W: int, channels_last: bool = False) -> torch.Tensor:
    """M (36, K, B·nH·nW) -> y = Aᵀ M A assembled into (B, K, H, W), NCHW or channels_last memory."""
    K = m.shape[1]
    nH, nW = tile_counts(H, W)
    at = _matrix("AT", m.device, m.dtype)
    y = torch.einsum("ia,abkp,jb->kpij", at, m.view(6, 6, K, -1), at)  # (K, P, 4, 4)
    y = y.view(K, B, nH, nW, 4, 4)
    if channels_last:
        y = y.permute(1, 2, 4, 3, 5, 0).reshape(B, 4 * nH, 4 * nW, K)[:, :H, :W]  # (B, H, W, K)
        return y.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)  # (B, K, H, W)
    y = y.permute(1, 0, 2, 4, 3, 5).reshape(B, K, 4 * nH, 4 * nW)  # (B, K, 4nH, 4nW)
    return y[:, :, :H, :W].contiguous()


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1,
           padding: int = 0) -> torch.Tensor:
    """3×3 stride-1 padding-1 convolution of x (B, C, H, W) by weight (K, C, 3, 3) -> (B, K, H, W),
    in x's dtype and memory format."""
    B, _, H, W = x.shape
    m = torch.bmm(weights().get(weight), transform_input(x))  # (36, K, P)
    if bias is not None:
        m[BIAS_PLANE] += bias[:, None]
    return transform_output(m, B, H, W, x.is_contiguous(memory_format=torch.channels_last))
