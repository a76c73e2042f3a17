"""Staged residency: components a memory plan marks "staged" hold weights only while their stage runs.

A staged component stays one module object for the pipeline's whole life (executors, kernel caches and the
callers' references keep pointing at it); what comes and goes are its insides. `acquire` reads the component
from its checkpoint again (the loader's plain reads, loading/safetensors_io.py), prepared exactly as the
first load did (storage dtype, channels_last, 16-bit widening or int8) and moves the fresh module's children,
parameters and buffers into the pipeline's module; `release` moves a meta-device skeleton's (shapes, no
bytes) in their place, and hands the freed pages back to the system. Moving submodules rather than tensors
carries what is not a parameter too (an int8 layer's packed oneDNN weights).

`acquire(*names)` first releases every other staged component, so at most one stage's staged weights are
held at a time: text encoders while prompts are encoded, the UNet while it denoises, the VAE while it
decodes. Resident components are never touched. Not thread-safe (one owner drives a pipeline's run).
"""
from __future__ import annotations

import gc
from collections.abc import Callable

from torch import nn

from .device import release_free_memory


def _transplant(src: nn.Module, dst: nn.Module) -> None:
    """Give `dst` the children, parameters and buffers of `src` (same class and config)."""
    for name, child in list(src.named_children()):
        setattr(dst, name, child)
    dst._parameters.update(src._parameters)
    dst._buffers.update(src._buffers)


class Residency:
    """modules: the pipeline's {name: module} (staged ones may start as skeletons); staged: the names released
    between stages; load(name): a freshly loaded, prepared module; skeleton(name): the same on the meta device."""

    def __init__(self, modules: dict[str, nn.Module], staged: tuple[str, ...] = (),
                 load: Callable[[str], nn.Module] | None = None, skeleton: Callable[[str], nn.Module] | None = None):
        if staged and (load is None or skeleton is None):
            raise ValueError("staged components need a loader and a skeleton")
        self.modules, self.staged = modules, tuple(s for s in staged if s in modules)
        self.load, self.skeleton = load, skeleton
        self.loads = {name: 0 for name in self.staged}   # loads so far, for tests and benchmarks

    def loaded(self, name: str) -> bool:
        module = self.modules[name]
        return next((t.device.type != "meta" for t in module.parameters()), True)

    def acquire(self, *names: str) -> None:
        """Make `names` resident for the coming stage (loading staged ones), releasing other staged ones."""
        for other in self.staged:
            if other not in names and self.loaded(other):
                self.release(other)
        for name in names:
            if name in self.staged and not self.loaded(name):
                self._swap(name, self.load(name))
                self.loads[name] += 1

    def release(self, name: str) -> None:
        """Drop a staged component's weights (its module keeps only shapes) and return the pages."""
        self._swap(name, self.skeleton(name))

    def release_all(self) -> None:
        for name in self.staged:
            if self.loaded(name):
                self.release(name)

    def _swap(self, name: str, src: nn.Module) -> None:
        _transplant(src, self.modules[name])
        del src
        gc.collect()           # parametrized modules form reference cycles that would hold their tensors
        release_free_memory()  # freed weights, and a load's transients, back to the system
