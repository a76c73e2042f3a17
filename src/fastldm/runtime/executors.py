"""How a UNet call executes, chosen once per plan: eager, compiled, CUDA graph or DeepCache.

Every executor is called like the UNet, `executor(sample, timestep, encoder_hidden_states, **conditioning)`
-> output, so the run loop (fastldm.run) does not know which one it holds. The batched run sends the calls of
several requests through one executor in one batch when their inputs have the same shapes; an executor that
keeps state across calls (DeepCache) is made per request and never shared.

    eager        the UNet module itself
    compiled     the UNet through TorchInductor (runtime/compile.py), compiled once per input signature
    cuda_graph   a CUDA graph per input signature, replayed (runtime/cuda_graph.py)
    deep_cache   DeepCache's full/shallow calls (runtime/deep_cache.py), one per request

`UNetRuntime` (owned by a Pipeline) holds the shared executors and picks one for a plan.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .compile import compile_module
from .cuda_graph import CUDAGraphUNet
from .deep_cache import DeepCache

KINDS = ("eager", "compiled", "cuda_graph", "deep_cache")


class UNetExecutor(Protocol):
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 **conditioning) -> torch.Tensor: ...


class UNetRuntime:
    """A pipeline's UNet executors. `compiled` and `cuda_graphs` switch the default executor; a plan with
    feature caching gets its own DeepCache executor."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.compiled: nn.Module | None = None
        self.graphs: CUDAGraphUNet | None = None

    def compile(self, on: bool = True) -> None:
        """TorchInductor for the eager path (compiled graphs cached on disk; runtime/compile.py)."""
        self.compiled = compile_module(self.unet) if on else None

    def use_cuda_graphs(self, on: bool = True) -> None:
        """Capture the UNet call as a CUDA graph per input shape and replay it; the UNet must be on CUDA."""
        self.graphs = CUDAGraphUNet(self.unet) if on else None

    def kind(self, cache_interval: int) -> str:
        """The executor a plan with this cache interval runs on."""
        if cache_interval > 1:
            return "deep_cache"
        return "cuda_graph" if self.graphs is not None else "compiled" if self.compiled is not None else "eager"

    def executor(self, kind: str, cache_interval: int = 1) -> UNetExecutor:
        """The executor of `kind` (see `kind`): the shared one, or a new DeepCache for one request."""
        if kind == "deep_cache":
            return DeepCache(self.unet, cache_interval)
        return {"eager": self.unet, "compiled": self.compiled, "cuda_graph": self.graphs}[kind]
