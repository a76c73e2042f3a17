"""Weights stored in 16 bits, computed in fp32: widened layer by layer, as each layer runs.

On a CPU without native bf16 dot products the compute stays fp32 (oneDNN emulates bf16 more slowly than it
runs fp32, runtime/device.py), but a weight need not be *held* in fp32: `store_16bit` keeps every weight
matrix and convolution kernel (every `weight` parameter of 2 or more dimensions: Linear, Conv2d, Embedding)
in fp16 and registers a parametrization (torch.nn.utils.parametrize) that widens it to fp32 each time the
layer reads `self.weight`. Norm weights and biases (1-D, 0.1 % of SD's bytes) stay fp32.

The widened copy goes into one scratch buffer per module tree, reused by every layer: the weights of a
whole model are never held in fp32 at once, and no layer allocates (so no page faults for a fresh 100 MB
block per layer). A Conv2d or Linear with more than MAX_WIDEN weights (SD's 2560→1280 3×3 convs, 113 MiB
in fp32, and its 1280→10240 feed-forward projections) is swapped for `ChunkedConv2d` / `ChunkedLinear`, which
widen and run it a slice of output channels at a time and concatenate the slices: those layers sit at the
lowest resolutions, where an output is a few MB, and the scratch (and oneDNN's reordered copy of the weight)
stays at MAX_WIDEN. The price is a rule: a widened weight is valid until the next layer of the same tree
widens its own. fastldm's models read a weight and pass it straight to its op (models/layers.py), so that
holds; code that keeps `module.weight` across another layer's call must `.clone()` it.

fp16 rather than bf16 for storage: 10 mantissa bits instead of 7, and SD checkpoints are published in fp16,
so storing an fp16 file's tensors loses nothing. The compute equals fp32 compute on fp16-rounded weights.
Speed cost: one read of the 16-bit weight and one write of the fp32 copy per layer call (the lead's command
for measuring it is in docs/benchmarks.md, "Memory planner").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .. import ops
from ..models.layers import Conv2d

MAX_WIDEN = 8 << 20   # weights widened at once (32 MiB in fp32)


class Scratch:
    """The fp32 buffer widened weights are written into; grown to the largest weight on first use."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def widen(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        n = w.numel()
        if self.buffer is None or self.buffer.numel() < n or self.buffer.device != w.device \
                or self.buffer.dtype != dtype:
            self.buffer = None  # drop the old one before the new one is allocated
            self.buffer = torch.empty(n, dtype=dtype, device=w.device)
        out = self.buffer.as_strided(w.shape, w.stride())  # the stored weight's layout (channels_last kept)
        return out.copy_(w)

    def clear(self) -> None:
        self.buffer = None


class Widen(nn.Module):
    """Parametrization: the stored 16-bit weight -> its fp32 copy in the shared scratch buffer."""

    def __init__(self, scratch: Scratch, dtype: torch.dtype):
        super().__init__()
        self.scratch, self.dtype = scratch, dtype

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if w.device.type == "meta":  # a released (meta) module: shapes only
            return w.to(self.dtype)
        return self.scratch.widen(w, self.dtype)


class _Chunked(nn.Module):
    """A layer's 16-bit weight (K, ...) and fp32 bias, run `rows` output channels at a time."""

    def __init__(self, layer: nn.Module, scratch: Scratch, storage: torch.dtype, compute: torch.dtype,
                 max_widen: int = MAX_WIDEN):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().to(storage), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(compute),
                                                                    requires_grad=False)
        self.scratch, self.compute = scratch, compute
        self.rows = max(1, max_widen // (self.weight[0].numel()))

    def slices(self):
        for i in range(0, self.weight.shape[0], self.rows):
            w = self.scratch.widen(self.weight[i:i + self.rows], self.compute)
            yield w, None if self.bias is None else self.bias[i:i + self.rows]


class ChunkedConv2d(_Chunked):
    """A Conv2d (models.layers, square kernel, groups 1) with 16-bit weights, widened by output-channel slices."""

    def __init__(self, conv: Conv2d, scratch: Scratch, storage: torch.dtype, compute: torch.dtype,
                 max_widen: int = MAX_WIDEN):
        super().__init__(conv, scratch, storage, compute, max_widen)
        self.stride, self.padding = conv.stride[0], conv.padding[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [ops.conv2d(x, w, b, self.stride, self.padding) for w, b in self.slices()]  # (B, k, H', W') each
        return torch.cat(parts, dim=1)                                                      # (B, K, H', W')


class ChunkedLinear(_Chunked):
    """An nn.Linear with 16-bit weights, widened by output-feature slices: x (..., in) -> (..., out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(x, w, b) for w, b in self.slices()], dim=-1)  # (..., out)


def widened_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose weight `store_16bit` widens per call: a `weight` parameter of >= 2 dimensions (not
    the chunked layers, which widen their own slices)."""
    return [m for m in model.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)
            and m.weight.dim() >= 2 and not parametrize.is_parametrized(m, "weight") and not isinstance(m, _Chunked)]


def store_16bit(model: nn.Module, storage: torch.dtype = torch.float16, compute: torch.dtype = torch.float32,
                max_widen: int = MAX_WIDEN) -> Scratch:
    """Hold `model`'s weight matrices and kernels in `storage`, widened to `compute` when a layer reads them
    (see the module docstring); every other floating tensor (biases, norms, buffers) in `compute`. In place,
    tensor by tensor (never a second copy of the model). Returns the scratch buffer (`clear()` frees it)."""
    scratch = Scratch()
    swaps = [(name, m) for name, m in model.named_modules() if m.__class__ in (Conv2d, nn.Linear)
             and m.weight.numel() > max_widen and (not isinstance(m, Conv2d) or m.groups == 1)]
    for name, m in swaps:  # one at a time: the fp32 layer is dropped as its 16-bit form takes its place
        parent, _, attr = name.rpartition(".")
        chunked = (ChunkedConv2d if isinstance(m, Conv2d) else ChunkedLinear)(m, scratch, storage, compute, max_widen)
        setattr(model.get_submodule(parent), attr, chunked)
    widened = widened_modules(model)
    ids = {id(m) for m in widened}
    for m in model.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is None or not t.is_floating_point():
                    continue
                dtype = storage if (id(m) in ids or isinstance(m, _Chunked)) and name == "weight" else compute
                if t.dtype != dtype:
                    new = t.detach().to(dtype)
                    table[name] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
    for m in widened:
        parametrize.register_parametrization(m, "weight", Widen(scratch, compute), unsafe=True)
    return scratch


def stored_bytes(*models: nn.Module) -> int:
    """Bytes of the parameters and buffers of `models` as stored (16-bit weights counted at 2 bytes), each
    storage once; oneDNN's packed weights (opaque tensors without a storage, runtime/prepack.py) by their
    elements; meta tensors (a staged component between its stages) not at all."""
    seen = {}
    for t in (t for m in models for t in (*m.parameters(), *m.buffers())):
        if t.device.type == "meta":
            continue
        if t.is_mkldnn:
            seen[("opaque", id(t))] = t.numel() * t.element_size()
        else:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
