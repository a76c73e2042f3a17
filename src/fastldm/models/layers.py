"""Building blocks shared by the UNet and the VAE. Parameter names are diffusers' (canonical).

Every convolution, group norm, attention and GELU goes through `fastldm.ops`, so kernels plug in below
the models without touching them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..runtime import context_kv


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose forward is `ops.conv2d` (square kernels, symmetric padding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.conv2d(x, self.weight, self.bias, self.stride[0], self.padding[0])


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm with the following activation fused into the same op (`act="silu"` or None)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float, act: str | None = None):
        super().__init__(num_groups, num_channels, eps)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.act)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017 §3.5; DDPM): t (B,) -> (B, dim), fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - shift))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResnetBlock2D(nn.Module):
    """GN-SiLU-conv, + time embedding, GN-SiLU-conv, + (1x1-projected) input (Ho et al. 2020)."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float, temb_dim: int | None):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin, eps, act="silu")
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout) if temb_dim else None
        self.norm2 = GroupNorm(groups, cout, eps, act="silu")
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, Cin, H, W) -> (B, Cout, H, W). The first half's output goes straight into norm2, so no name
        holds it through conv2, and at inference the sums are taken in place: one (B, Cout, H, W) buffer
        fewer at each (128 MiB at the last level of a 512² VAE decode, its memory peak)."""
        add = torch.add if torch.is_grad_enabled() else torch.Tensor.add_
        h = self.conv2(self.norm2(self._first_half(x, temb, add)))
        return add(h, x if self.conv_shortcut is None else self.conv_shortcut(x))

    def _first_half(self, x: torch.Tensor, temb: torch.Tensor | None, add) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is None:
            return h
        return add(h, self.time_emb_proj(F.silu(temb))[:, :, None, None])  # (B, C) -> (B, C, 1, 1)


class Attention(nn.Module):
    """Multi-head attention on token sequences: x (B, N, C), context (B, M, Cctx) -> (B, N, C)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = False,
                 upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.backend: str | None = None  # an attention backend tried first where it can (an int8 UNet's int8 one)
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-attention (context given) reuses the keys and values of an earlier step of the same generation
        where one is active (runtime/context_kv.py): the text is the same at every step."""
        B, N, C = x.shape
        heads = lambda t: t.view(B, -1, self.heads, C // self.heads).transpose(1, 2)  # (B, M, C) -> (B, H, M, D)
        cache = None if context is None else context_kv.current()
        kv = None if cache is None else cache.get(self, context)
        if kv is None:
            ctx = x if context is None else context
            kv = heads(self.to_k(ctx)), heads(self.to_v(ctx))
            if cache is not None:
                cache.put(self, context, *kv)
        out = ops.attention(heads(self.to_q(x)), *kv, upcast=self.upcast, prefer=self.backend)  # (B, H, N, D)
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    """Linear to 2F, then value · GELU(gate) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """x (..., dim) -> (..., F); `norm` is applied to x first (see FeedForward)."""
        return ops.geglu(self.proj(x if norm is None else norm(x)))


class FeedForward(nn.Module):
    """diffusers' FeedForward: net = [GEGLU, Dropout (identity at inference), Linear]."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """x (..., dim) -> (..., dim). The caller's pre-norm is passed in rather than applied by the caller, so
        the normalised tensor is freed once the projection has read it instead of being held by the calling
        frames through the 2F-wide GEGLU, the UNet's memory peak (10 MiB at a guided 512² image)."""
        return self.net[2](self.net[0](x, norm))


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. `pad_asym` pads (0,1,0,1) and convolves unpadded (the VAE encoder's form)."""

    def __init__(self, channels: int, pad_asym: bool = False):
        super().__init__()
        self.pad_asym = pad_asym
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0 if pad_asym else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad_asym else x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (to `size` when given, else 2x), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)
