"""Triton kernels, registered with the ops registry when triton is installed (`pip install fastldm[triton]`).

Backend names: "triton" for attention (FlashAttention), group_norm, gelu and geglu, so that
`ops.use("triton")` forces all of them; "triton_softmax" for the partially fused softmax attention;
"triton_winograd" for conv2d. Attention and Winograd rank below the reference (torch's SDPA already
runs fused CUDA kernels; Winograd is approximate): `auto` picks them only from a measured table
(fastldm.ops.autotune). Kernels built for the interpreter (TRITON_INTERPRET=1, how the tests run them on
CPU) all rank below the reference, so `auto` never runs an interpreted kernel.
"""
try:
    import triton
except ImportError:
    triton = None

if triton is not None:
    from ..registry import register
    from . import activations, flash_attention, group_norm, softmax_attention, winograd
    from .device import INTERPRET

    def _rank(priority: int) -> int:
        return -200 if INTERPRET else priority

    register("attention", "triton", flash_attention.attention, flash_attention.supports, _rank(-110))
    register("attention", "triton_softmax", softmax_attention.attention, softmax_attention.supports, _rank(-120))
    register("group_norm", "triton", group_norm.group_norm, group_norm.supports, _rank(10))
    register("gelu", "triton", activations.gelu, activations.supports_gelu, _rank(10))
    register("geglu", "triton", activations.geglu, activations.supports_geglu, _rank(10))
    register("conv2d", "triton_winograd", winograd.conv2d, winograd.supports, _rank(-160))
