"""Functional ops the models call. Each is one line to the registry (see registry.py)."""
from __future__ import annotations

import torch

from . import blocked_attention, flash_attention_cpu, geglu_cpu, int8_attention_cpu, reference, winograd, winograd_cpu
from .registry import BackendUnavailable, Kernels, active, backends, dispatch, prefer, register, select, use, using

for _op in ("attention", "group_norm", "gelu", "geglu", "conv2d"):
    register(_op, "reference", getattr(reference, _op), priority=-100)
# Winograd trades accuracy for speed: below the reference, so only `use()` or a measured table picks it.
register("conv2d", "winograd", winograd.conv2d, winograd.supports, priority=-150)
register("conv2d", "winograd_cpu", winograd_cpu.conv2d, winograd_cpu.supports, priority=-140)  # its C++ transforms
# Query-blocked attention beats torch's fused CPU kernel at SD's long self-attention (measured, see its file).
register("attention", "blocked", blocked_attention.attention, blocked_attention.supports, priority=0)
# Flash attention in C++ (built on first use): beats torch's kernel in fp32 at SD's shapes (measured on AVX2,
# see its file); below "blocked", which has the measurements on native-bf16 CPUs.
register("attention", "flash_cpu", flash_attention_cpu.attention, flash_attention_cpu.supports, priority=-10)
# int8 GEMMs trade accuracy for speed: below the reference, so only an int8 UNet's layers (or `use()`) pick it.
register("attention", int8_attention_cpu.BACKEND, int8_attention_cpu.attention, int8_attention_cpu.supports, priority=-150)
# GEGLU in one C++ pass (built on first use): 1.4-2.2x the reference's three passes at SD's shapes, one rounding.
register("geglu", "fused_cpu", geglu_cpu.geglu, geglu_cpu.supports, priority=0)

from . import triton  # noqa: E402,F401  (registers the Triton kernels when triton is installed)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              upcast: bool = False, prefer: str | None = None) -> torch.Tensor:
    """q (B, H, Nq, D), k, v (B, H, Nk, D) -> (B, H, Nq, D). prefer: a backend tried first where it can run the
    call and no backend is forced (a layer's own choice, before the selection's preferences)."""
    return dispatch("attention", q, k, v, causal=causal, upcast=upcast, _prefer=prefer)


def group_norm(x: torch.Tensor, num_groups: int, weight, bias, eps: float, act: str | None = None):
    """x (B, C, H, W) -> GroupNorm(x), then `act` ("silu" or None)."""
    return dispatch("group_norm", x, num_groups, weight, bias, eps, act=act)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return dispatch("gelu", x, approximate=approximate)


def geglu(x: torch.Tensor) -> torch.Tensor:
    """x (..., 2F) -> (..., F): first half · GELU(second half)."""
    return dispatch("geglu", x)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias, stride: int = 1, padding: int = 0) -> torch.Tensor:
    return dispatch("conv2d", x, weight, bias, stride=stride, padding=padding)


__all__ = ["attention", "group_norm", "gelu", "geglu", "conv2d", "use", "using", "Kernels", "active", "register",
           "backends", "select", "prefer", "BackendUnavailable"]
