"""CUDA graphs for the denoising step: capture one UNet call per input signature, then replay it.

A Stable Diffusion UNet call launches several hundred kernels (~520 for SD 1.5 before fusion), each costing
the CPU microseconds to launch, which the GPU waits out whenever its kernels are shorter. A CUDA graph
records the whole call once and replays it with one launch (NVIDIA CUDA C++ Programming Guide, "CUDA Graphs"; PyTorch's
`torch.cuda.graph` capture API). A graph replays fixed kernels on fixed addresses, so:
- every input is copied into a static buffer owned by the graph, and the output is read from the static
  output tensor the capture produced (and cloned, so the next replay cannot overwrite what a caller holds);
- one graph is captured per signature: the name, shape and dtype of every input, plus the ops backend
  selection in force (`fastldm.ops.use` / `prefer`), since a different backend is a different kernel sequence;
- whatever the call would do differently from one call to the next (a DeepCache object, Python numbers)
  cannot be replayed: such arguments are refused with an error.
All graphs of one wrapper share one memory pool and the static buffers are the graph's, so calls take turns:
a lock holds from copying the inputs in to cloning the output out (a server may run two requests of one
pipeline from two threads; both enqueue on the device's current stream, which keeps their GPU work in that order).
Kernels are compiled and caches (Winograd's transformed weights) filled by warm-up calls on a side stream
before capture, as the PyTorch CUDA-graphs notes prescribe. Every backend in the call must be capture-safe
(no host-to-device copies or synchronization): the reference, the Triton kernels and Winograd (its transform
matrices are copied to the device once and cached) are.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BackendUnavailable
from ..ops import registry


@dataclass
class _Graph:
    """One captured call: static inputs (by argument name), the graph, its static output."""
    inputs: dict[str, torch.Tensor | None]
    graph: torch.cuda.CUDAGraph
    output: torch.Tensor


class CUDAGraphUNet:
    """`CUDAGraphUNet(unet)(sample, timestep, encoder_hidden_states, **extra)` behaves like `unet(...)` for
    tensor arguments (or None), capturing a CUDA graph on the first call of each signature and replaying
    it afterwards. Inputs may live on any device; they are copied into the graph's CUDA buffers.

    `warmup`: eager calls before capture (compile Triton kernels, fill caches). `graphs`: the captured
    graphs by signature; `reset()` frees them (e.g. after changing the weights in place)."""

    def __init__(self, unet: nn.Module, warmup: int = 2):
        device = next(unet.parameters()).device
        if device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailable(f"CUDA graphs need the UNet on a CUDA device, it is on {device.type}; "
                               f"move it with .to('cuda') or run the UNet without CUDA graphs")
        self.unet, self.device, self.warmup = unet, device, warmup
        self.graphs: dict[tuple, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.graphs.clear()

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        named = {str(i): a for i, a in enumerate(args)} | kwargs
        for name, value in named.items():
            if value is not None and not isinstance(value, torch.Tensor):
                raise ValueError(f"a CUDA graph cannot take {name}={type(value).__name__} (it would replay the "
                                 f"first call's behaviour); call the UNet without CUDA graphs for that")
        key = (tuple((n, None if v is None else (tuple(v.shape), v.dtype)) for n, v in named.items()),
               registry.selection())
        with torch.inference_mode(), self._lock:
            entry = self.graphs.get(key)
            if entry is None:
                entry = self.graphs[key] = self._capture(named)
            for name, static in entry.inputs.items():
                if static is not None:
                    static.copy_(named[name], non_blocking=True)
            entry.graph.replay()
            return entry.output.clone()

    def _call(self, inputs: dict[str, torch.Tensor | None]) -> torch.Tensor:
        n = sum(name.isdigit() for name in inputs)
        return self.unet(*(inputs[str(i)] for i in range(n)), **{k: v for k, v in inputs.items() if not k.isdigit()})

    def _capture(self, named: dict[str, torch.Tensor | None]) -> _Graph:
        inputs = {name: None if v is None else v.to(self.device, copy=True) for name, v in named.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._call(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # "thread_local": a server runs other pipelines' calls from other threads, on the device's default stream,
        # while one captures; the default ("global") would make their allocations fail during the capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = self._call(inputs)
        return _Graph(inputs, graph, output)
