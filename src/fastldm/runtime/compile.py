"""torch.compile (TorchInductor) of the UNet, with the compile cache kept across runs.

Inductor fuses the memory-bound ops between the GEMMs and convolutions (GroupNorm+SiLU, GEGLU's gate,
LayerNorm, residual and time-embedding adds) into generated C++/OpenMP loops and leaves the convolutions
and matmuls to oneDNN (Ansel et al. 2024, "PyTorch 2", §4-5).

Cache: inductor's FX-graph and AOTAutograd caches store each compiled graph, keyed by the graph, the
input shapes and the torch version, under TORCHINDUCTOR_CACHE_DIR, so only a process that meets a new
model architecture or resolution pays the full compile; later ones re-trace with Dynamo and load the
graph. Inductor reads the folder from that environment variable only, so the library never sets it: the
CLI and the server point it at ~/.cache/fastldm/inductor (rather than inductor's /tmp default, which does
not survive a reboot) with `use_persistent_cache`, as part of `device.configure_process`. Freezing (`freezing=True`: weights folded in as constants and
prepacked into oneDNN's blocked layout) is off by default: its prepacked weights are opaque mkldnn
tensors that the cache cannot pickle, so a frozen graph is compiled from scratch in every process
("Bypassing FX Graph Cache because 'mkldnn tensors unpickleable'", torch 2.13), and on the project's
box it did not run faster than the unfrozen graph (docs/benchmarks.md, "CPU fast path").
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..files import cache_root


def cache_dir() -> Path:
    """Where compiled graphs persist: $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/fastldm/inductor (or under
    $XDG_CACHE_HOME), the folder `use_persistent_cache` points inductor at."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return cache_root() / "inductor"


def use_persistent_cache() -> Path:
    """For programs that own their process: keep inductor's compiled graphs in `cache_dir()`."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
    return cache_dir()


def compile_module(module: nn.Module, *, freezing: bool = False) -> nn.Module:
    """`module` compiled with inductor, as a wrapper that shares its parameters (the module itself stays
    eager). Compilation happens at the first call of each new input signature. Backends forced with
    `fastldm.ops.use` are read when a graph is traced and stay fixed in it."""
    return torch.compile(module, options={"freezing": freezing})


@dataclass
class CompileReport:
    seconds: float      # wall time of the first call, which traces and compiles
    cache_hits: int     # compiled graphs loaded from the cache
    cache_misses: int   # compiled graphs built from scratch

    def __str__(self) -> str:
        where = "from the cache" if self.cache_hits and not self.cache_misses else (
            f"{self.cache_misses} graph(s) compiled, cached in {cache_dir()}")
        return f"compiled in {self.seconds:.1f} s ({where})"


def timed_first_call(fn, *args, **kwargs) -> CompileReport:
    """Run `fn(*args, **kwargs)` once under no_grad and report how long the compile took and whether the
    persistent cache served it."""
    from torch._dynamo.utils import counters

    before = dict(counters["inductor"])
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(*args, **kwargs)
    seconds = time.perf_counter() - t0
    delta = {k: counters["inductor"].get(k, 0) - before.get(k, 0) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}
    return CompileReport(seconds, delta["fxgraph_cache_hit"], delta["fxgraph_cache_miss"])
