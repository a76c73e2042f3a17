"""Convolution and small-row linear weights packed into oneDNN's blocked layout once per input shape, not once
per call (CPU).

Eager `F.conv2d` on a CPU hands oneDNN the weight in torch's plain layout (OIHW, or OHWI for channels_last),
and oneDNN reorders it into the blocked layout its kernel reads on every call. On a large feature map the
reorder hides behind the arithmetic; on SD's deep levels it does not. SD 1.5's 3×3 convolutions, batch 2,
fp32, 2 threads of an AVX2 EPYC (benchmarks/prepacked_conv.py): 1280→1280 at 4×4 (the deepest level of a
256² image) 10.4 ms plain against 6.2 ms packed, 2560→1280 at 4×4 22.6 vs 12.9 ms; at 32×32 and larger the
two are level; a whole 256² UNet call 1.08-1.09× faster, 512² 1.01-1.02×. Inductor's freezing pass does the
same for compiled graphs (weights folded, then `mkldnn._reorder_convolution_weight` for the traced shape).

Linears are the same story at few rows: `F.linear` (MKL's sgemm) packs its weight into panels at every call,
which at 128 rows (SD 1.5's 64-token level, CFG batch 2) costs about what the product does once the weight
comes from memory rather than the cache. oneDNN's `_linear_pointwise` on a weight packed once: the 64-token
GEGLU projection 29.7 → 22.4 ms inside a 256² UNet call, its 1280×1280 products 3.6 → 2.9 ms; a whole call
1.03-1.04×. At 512 rows and more it is level or slower (the 256-token feed-forward output 9.7 → 10.7 ms), so a
`PackedLinear` runs calls of MAX_ROWS rows or fewer on its packed weight and larger ones plain. Unlike a
convolution's, a linear's two paths are different kernels (MKL's sgemm, oneDNN's matmul) that round
differently, so which one a call takes depends on its row count alone, never on the calls before it: the same
request gives the same numbers whatever ran earlier. oneDNN's packed layout does not depend on the row count it
is packed for (the outputs are bitwise the same, the times within 2 %), so one packing serves every small call.

A convolution's layout is another matter: oneDNN picks it for the whole input shape, batch included, and a
weight packed for another shape is still right but the call can be 10-25× slower than plain (1920→1280 at 8×8
packed for 64×64: 771 ms against 31.5) as oneDNN reorders it back or falls to a slower algorithm (its plain and
packed outputs are bitwise the same). So a packed layer packs at its first call, for that call's shape (a
linear: for any small call), and holds only the packed weight: no extra memory, and a run at one resolution
and batch (every step of a generation) pays the packing once (+1.2 s on a first 256² SD 1.5 call; +0.44 s
more for its linears). At another shape a convolution goes back to the plain weight (+3.0 s once, at 256²) and
runs as an unpacked layer, and packs again only for a shape met REPACK_AFTER calls in a row (a whole default
generation): a server whose batch changes every few steps runs plain, as before packing existed, instead of
paying at every change. A linear changes weight only when a call crosses MAX_ROWS, at once either way. A
swap hands a dropped weight of TRIM_BYTES or more back to the system (`release_free_memory`): freed inside
malloc's heap it would stay resident. Inference only. The state dict holds the plain weight (unpacked when
asked for), so exports of a loaded pipeline are unchanged. The kernel layer's `conv2d` backends (Winograd,
Triton) do not reach packed layers: `fastldm.load` leaves the convolutions plain when one is forced, and the
ablation packs in rows of its own.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .device import release_free_memory

REPACK_AFTER = 20  # calls in a row at one input shape before a layer that left its packing packs again
TRIM_BYTES = 4 << 20  # a dropped weight at least this big is handed back to the system at once
MAX_ROWS = 256  # a linear packs for calls of at most this many rows (tokens × batch); larger ones run plain
KINDS = frozenset({"conv", "linear"})  # the kinds of layer `prepack` swaps


@functools.cache
def unsupported(dtype: torch.dtype, kind: str = "conv") -> str | None:
    """Why `kind` ("conv" or "linear") weights of `dtype` cannot be prepacked on this CPU, or None. oneDNN packs
    fp32 everywhere it is built in; bf16 only where the CPU has the instructions for it (AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT)."""
    op = "_convolution_pointwise" if kind == "conv" else "_linear_pointwise"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, op):
        return f"this torch build has no oneDNN {kind} (torch.ops.mkldnn.{op})"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN packs fp32 and bf16 {kind} weights, not {dtype}"
    try:  # an 8×8 weight: the cheapest question oneDNN answers for this CPU and dtype
        if kind == "conv":
            torch.ops.mkldnn._reorder_convolution_weight(torch.zeros(8, 8, 1, 1, dtype=dtype), [0, 0], [1, 1],
                                                         [1, 1], 1, None)
        else:
            torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), 8)
    except RuntimeError as e:
        return str(e).strip().splitlines()[0]
    return None


class PackedLayer(nn.Module):
    """A layer whose weight lives in oneDNN's blocked layout for the last input shape it met (subclasses say
    what a shape is, how to pack and unpack, and how to call)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        # Buffers, so memory accounting counts them; the state dict is written by hand below.
        self.register_buffer("weight", layer.weight.detach(), persistent=False)  # plain until the first call
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach(), persistent=False)
        # (weight, the input shape it is packed for or None while plain): one attribute, so one read gives a
        # consistent pair whatever other threads swap meanwhile. `weight` above mirrors its tensor for memory
        # accounting; the traced (compiled) path reads only this.
        self._state: tuple[torch.Tensor, tuple[int, ...] | None] = (self.weight, None)
        self.last: tuple[int, ...] | None = None  # the last input shape, and how many calls in a row had it
        self.streak = 0
        self.packs = 0

    @property
    def packed_for(self) -> tuple[int, ...] | None:
        """The input shape the weight is packed for; None while it is plain."""
        return self._state[1]

    sticky = True   # after leaving its packing, stay plain until REPACK_AFTER calls in a row at one shape

    def _packs_at(self, shape: tuple[int, ...]) -> bool:
        return True

    def _pack(self, plain: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def _plain(self, packed: torch.Tensor) -> torch.Tensor:
        """The plain weight, in the layout the unpacked call reads fastest."""
        return packed.to_dense()

    def _weight_for(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...] | None]:
        """(weight, the shape it is packed for or None) for a call at `shape`."""
        weight, packed_for = self._state  # other threads may swap it meanwhile: this call goes on with this pair
        if shape != packed_for:
            weight, packed_for, dropped = self._swap(weight, packed_for, shape)
            # The weight just dropped (its last reference went with the assignment above) was freed inside
            # malloc's heap, where it would stay resident, and the next layers' new copies rarely fit its hole:
            # a first 256² call grew the RSS by 1.4 GB (SD 1.5, fp32). A trim walks the whole heap, so small
            # weights are left to malloc (the embedded model's first image: +0.2 s).
            if dropped >= TRIM_BYTES:
                release_free_memory()
        return weight, packed_for

    def _swap(self, weight: torch.Tensor, packed_for: tuple[int, ...] | None, shape: tuple[int, ...]):
        """(weight, packed_for, bytes dropped) for a call at `shape` that `weight` is not packed for: packed for
        it (the layer's first packable call, or REPACK_AFTER calls in a row at it), else plain; held from now
        on."""
        self.streak = self.streak + 1 if shape == self.last else 1
        self.last = shape
        plain = weight if packed_for is None else self._plain(weight)
        if not self._packs_at(shape) or (self.sticky and self.packs and self.streak < REPACK_AFTER):
            new, new_for = plain, None
        else:
            new, new_for = self._pack(plain, shape), shape
            self.packs += 1
        if new is weight:
            return new, new_for, 0
        self._state = (new, new_for)
        self.weight = new
        return new, new_for, weight.numel() * weight.element_size()

    def _apply(self, fn, recurse=True):
        """`.to()`, `.float()` and the like see the plain weight; the layer packs again at its next call, as a
        fresh one."""
        weight, packed_for = self._state
        if packed_for is not None:
            self.weight = self._plain(weight)
        super()._apply(fn, recurse)
        self._state = (self.weight, None)
        self.packs = self.streak = 0
        return self

    # The state dict holds the plain weight, as the torch layer's would: exports and copies of a loaded
    # pipeline see the model, not the CPU's layout.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight, packed_for = self._state
        destination[prefix + "weight"] = weight.detach() if packed_for is None else weight.to_dense()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("weight", "bias") if self.bias is not None else ("weight",):
            if prefix + name not in state_dict:
                missing_keys.append(prefix + name)
        if prefix + "weight" in state_dict:  # a new plain weight, packed at the next call as a fresh layer's
            self.weight = state_dict[prefix + "weight"].detach().clone()
            self._state = (self.weight, None)
            self.packs = self.streak = 0
        if self.bias is not None and prefix + "bias" in state_dict:
            self.bias = state_dict[prefix + "bias"].detach().clone()


class PackedConv2d(PackedLayer):
    """An nn.Conv2d (groups 1) whose weight lives in oneDNN's blocked layout for the last input shape it met.
    Takes and returns (B, C, H, W) in the weight's dtype; the output is channels_last, as oneDNN writes it."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv)
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        weight, packed_for = self._weight_for(tuple(x.shape))
        if packed_for is None:
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, self.bias, self.padding, self.stride, self.dilation, 1, "none", [], "")  # (B, out, H', W')

    def _pack(self, plain: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_convolution_weight(plain, self.padding, self.stride, self.dilation, 1,
                                                            list(shape))

    def _plain(self, packed: torch.Tensor) -> torch.Tensor:
        # (out, in, k, k) in the layout load gave it: F.conv2d reorders an OIHW weight more slowly
        return packed.to_dense().contiguous(memory_format=torch.channels_last)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, stride={tuple(self.stride)}, "
                f"padding={tuple(self.padding)}, {self.weight.dtype}, packed for {self.packed_for}")


class PackedLinear(PackedLayer):
    """An nn.Linear whose calls of at most MAX_ROWS rows (the product of the input's leading dims) run on its
    weight packed in oneDNN's blocked layout, and larger ones on the plain weight: the weight is held in the
    layout the last call needed. (..., in) -> (..., out). Traced by torch.compile it is a plain linear
    (`fastldm.load` does not pack the linears of a UNet it compiles)."""

    sticky = False  # the kernel follows the call's rows, so that its numbers never depend on earlier calls
    FEW = ("at most", MAX_ROWS)    # the shape key of a small call: one packing serves every row count
    MANY = ("more than", MAX_ROWS)

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # inductor lowers oneDNN's packed linear only for frozen weights
            weight, packed_for = self._state
            return F.linear(x, weight if packed_for is None else weight.to_dense(), self.bias)
        weight, packed_for = self._weight_for(self.FEW if x.numel() // self.in_features <= MAX_ROWS else self.MANY)
        if packed_for is None:
            return F.linear(x, weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, self.bias, "none", [], "")

    def _packs_at(self, shape) -> bool:
        return shape == self.FEW

    def _pack(self, plain: torch.Tensor, shape) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(plain, MAX_ROWS)

    def extra_repr(self) -> str:
        held = f"packed for calls of at most {MAX_ROWS} rows" if self.packed_for else "plain"
        return f"{self.in_features}, {self.out_features}, {self.weight.dtype}, {held}"


def prepack(model: nn.Module, kinds: frozenset[str] = KINDS) -> int:
    """Swap, in place, every Conv2d (groups 1; kind "conv") and nn.Linear ("linear") of `model` for a packed
    layer holding the same weight tensor (packed at its first call); returns how many. The caller checks
    `unsupported(dtype, kind)` first."""
    wanted = tuple(t for kind, t in (("conv", nn.Conv2d), ("linear", nn.Linear)) if kind in kinds)
    names = [name for name, m in model.named_modules()
             if isinstance(m, wanted) and getattr(m, "groups", 1) == 1]
    for name in names:  # names only: a list of modules would keep the plain weights alive
        parent, _, attr = name.rpartition(".")
        layer = model.get_submodule(name)
        setattr(model.get_submodule(parent), attr,
                PackedConv2d(layer) if isinstance(layer, nn.Conv2d) else PackedLinear(layer))
    return len(names)
