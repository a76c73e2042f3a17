"""The ops registry: the one seam between the models and the kernels (DESIGN rule 2).

Each op ("attention", "group_norm", "gelu", "geglu", "conv2d") has an ordered list of backends. A backend
registers a function and a `supports(*args, **kwargs) -> str | None` check that returns the reason it
cannot run a given call, or None. Dispatch takes the forced backend for the op if one is set with `use()`
(and raises if it cannot run the call: never a silent fallback), otherwise the first backend, in priority
order, whose check passes. `reference` (plain PyTorch) is registered for every op and always applies.
A measured table (fastldm.ops.autotune) can put one backend first per (op, device type, dtype): `prefer`.
A calling layer can name a backend of its own (`dispatch(..., _prefer=name)`; an int8 UNet's attention layers
name int8 attention), tried before the table where it supports the call and nothing is forced.

Selections are per context, never process-wide: a `Kernels` object (forced backends, preferred backends and
the kernel caches that go with them, such as Winograd's transformed weights) is made active for a block of
code with `using(kernels)`; a Pipeline owns one and activates it around every call into its models, so two
pipelines with different selections run side by side, in two threads or one. `use` and `prefer` layer a
change on top of the active selection for a `with` block. Outside any pipeline the process's default
`Kernels()` applies (priority order, empty caches).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

import torch

from ..errors import BackendUnavailable

OPS = ("attention", "group_norm", "gelu", "geglu", "conv2d")


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    supports: Callable[..., str | None]
    priority: int


_backends: dict[str, list[Backend]] = {op: [] for op in OPS}


def _always(*args, **kwargs) -> None:
    return None


@dataclass(frozen=True)
class Kernels:
    """A kernel selection and its caches. forced: {op: backend} (dispatch raises if it cannot run a call);
    preferred: {(op, device type, dtype): backend} tried first by `auto`; caches: per-selection kernel state
    (`cache(name, factory)`), owned by whoever owns this object."""
    forced: Mapping[str, str] = field(default_factory=dict)
    preferred: Mapping[tuple[str, str, torch.dtype], str] = field(default_factory=dict)
    caches: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        for op, name in self.forced.items():
            if op not in _backends or name not in backends(op):
                raise ValueError(f"no backend {name!r} for op {op!r}; available: "
                                 f"{', '.join(backends(op)) if op in _backends else 'none (ops: ' + ', '.join(OPS) + ')'}")
        for (op, _, _), name in self.preferred.items():
            if op not in _backends or name not in backends(op):
                raise ValueError(f"cannot prefer {name!r} for {op!r}: not a registered backend of that op")

    def replace(self, **changes) -> "Kernels":
        """The same selection with some fields changed; the caches are shared (they key on the weights)."""
        return dataclasses.replace(self, **changes, caches=self.caches)


_active: contextvars.ContextVar[Kernels] = contextvars.ContextVar("fastldm_kernels", default=Kernels())


def active() -> Kernels:
    """The selection in force in this context."""
    return _active.get()


@contextlib.contextmanager
def using(kernels: Kernels):
    """Make `kernels` the selection for the `with` block (in this thread / task only)."""
    token = _active.set(kernels)
    try:
        yield kernels
    finally:
        _active.reset(token)


def cache(name: str, factory: Callable[[], object]):
    """The active selection's cache `name`, made by `factory()` on first use."""
    caches = _active.get().caches
    if name not in caches:
        caches[name] = factory()
    return caches[name]


def register(op: str, name: str, fn: Callable, supports: Callable[..., str | None] = _always,
             priority: int = 0) -> None:
    """Add (or replace) backend `name` for `op`; higher priority is tried first by `auto`."""
    if op not in _backends:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    lst = [b for b in _backends[op] if b.name != name] + [Backend(name, fn, supports, priority)]
    _backends[op] = sorted(lst, key=lambda b: -b.priority)


def backend(op: str, name: str) -> Backend:
    """Backend `name` of `op`; ValueError if there is none."""
    found = next((b for b in _backends.get(op, ()) if b.name == name), None)
    if found is None:
        raise ValueError(f"no backend {name!r} for op {op!r}")
    return found


def backends(op: str) -> list[str]:
    """Names of the backends registered for `op`, in `auto` order."""
    return [b.name for b in _backends[op]]


def prefer(table: Mapping[tuple[str, str, torch.dtype], str]):
    """Inside the `with` block, `auto` tries `table[(op, device type, dtype)]` (keyed on the first tensor
    argument) before the priority order; its `supports` still applies. Replaces the active preferences
    (`prefer({})` restores the priority order). `fastldm.ops.autotune.preferences` makes one from measurements."""
    return using(_active.get().replace(preferred=dict(table)))


def selection() -> tuple:
    """The backend selection in force, hashable: the forced backends and the preferences. Code that caches a
    traced call (CUDA graphs) keys on it, since another selection is another kernel sequence."""
    k = _active.get()
    forced = tuple(sorted(k.forced.items()))
    preferred = tuple(sorted((op, dev, str(dt), name) for (op, dev, dt), name in k.preferred.items()))
    return forced, preferred


@torch.compiler.assume_constant_result
def _preferred_backend(op: str, device_type: str, dtype: torch.dtype) -> str | None:
    """The backend preferred for `op` on this device type and dtype, if any; read at trace time under
    torch.compile, as `_forced_backend` is."""
    return _active.get().preferred.get((op, device_type, dtype))


def _auto_order(op: str, args: tuple, layer: str | None = None) -> list[Backend]:
    """The order `auto` tries backends in: the calling layer's choice, then the preferred one for this call,
    then by priority."""
    first = args[0] if args else None
    name = None if not isinstance(first, torch.Tensor) else _preferred_backend(op, first.device.type, first.dtype)
    firsts = [n for n in (layer, name) if n is not None]
    return sorted(_backends[op], key=lambda b: firsts.index(b.name) if b.name in firsts else len(firsts))


@torch.compiler.assume_constant_result
def _forced_backend(op: str) -> str | None:
    """The backend forced for `op` by `use()`, if any. Under torch.compile this is read once, at trace time
    (a context variable cannot be traced), so a compiled model keeps the backends it was compiled with."""
    return _active.get().forced.get(op)


def dispatch(op: str, *args, _prefer: str | None = None, **kwargs):
    """Run `op` on the backend the selection picks (see the module's docstring); `_prefer`: a backend the calling
    layer tries first where it supports the call and none is forced."""
    forced = _forced_backend(op)
    if forced is not None:
        backend = next((b for b in _backends[op] if b.name == forced), None)
        if backend is None:
            raise BackendUnavailable(f"backend {forced!r} is not registered for op {op!r} "
                                     f"(available: {', '.join(backends(op))})")
        why = backend.supports(*args, **kwargs)
        if why is not None:
            raise BackendUnavailable(f"backend {forced!r} cannot run {op}: {why}; "
                                     f"choose another with fastldm.ops.use(...)")
        return backend.fn(*args, **kwargs)
    for backend in _auto_order(op, args, _prefer):
        if backend.supports(*args, **kwargs) is None:
            return backend.fn(*args, **kwargs)
    raise BackendUnavailable(f"no backend can run {op} for this input")  # unreachable: reference applies


def select(op: str, *args, _prefer: str | None = None, **kwargs) -> str:
    """The name of the backend `dispatch` would use for this call (for tests and reports)."""
    forced = _active.get().forced.get(op)
    if forced is not None:
        return forced
    return next(b.name for b in _auto_order(op, args, _prefer) if b.supports(*args, **kwargs) is None)


def use(backend: str | None = None, **per_op: str):
    """Force backends inside a `with` block, on top of the active selection: `use("reference")` for every op
    that has it, or per op: `use(attention="triton", conv2d="winograd")`. "auto" removes a force."""
    unknown = set(per_op) - set(OPS)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; ops are {', '.join(OPS)}")
    if backend not in (None, "auto") and not any(backend in backends(op) for op in OPS):
        raise ValueError(f"no backend named {backend!r}; known: "
                         f"{', '.join(sorted({b for op in OPS for b in backends(op)}))}")
    return using(_active.get().replace(forced=forced_table(backend, **per_op, base=_active.get().forced)))


def forced_table(backend: str | None = None, *, base: Mapping[str, str] = MappingProxyType({}),
                 **per_op: str) -> dict[str, str]:
    """{op: backend} from `use`'s arguments on top of `base`: `backend` for every op that has it, `per_op`
    naming a backend per op ("auto" removes the op's force)."""
    forced = dict(base)
    for op in OPS:
        name = per_op.get(op, backend)
        if name is None:
            continue
        if name == "auto":
            forced.pop(op, None)
        elif name in backends(op):
            forced[op] = name
        elif op in per_op:
            raise ValueError(f"no backend {name!r} for op {op!r}; available: {', '.join(backends(op))}")
    return forced
