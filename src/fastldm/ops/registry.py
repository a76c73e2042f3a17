"""The ops registry: the one seam between the models and the kernels (DESIGN rule 2).

Each op ("attention", "group_norm", "gelu", "geglu", "conv2d") has an ordered list of backends. A backend
registers a function and a `supports(*args, **kwargs) -> str | None` check that returns the reason it
cannot run a given call, or None. Dispatch takes the forced backend for the op if one is set with `use()`
(and raises if it cannot run the call: never a silent fallback), otherwise the first backend, in priority
order, whose check passes. `reference` (plain PyTorch) is registered for every op and always applies.
A measured table (fastldm.ops.autotune) can put one backend first per (op, device type, dtype): `prefer`.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable

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
_forced: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("fastldm_forced", default={})
_preferred: dict[tuple[str, str, torch.dtype], str] = {}  # (op, device type, dtype) -> backend tried first


def _always(*args, **kwargs) -> None:
    return None


def register(op: str, name: str, fn: Callable, supports: Callable[..., str | None] = _always,
             priority: int = 0) -> None:
    """Add (or replace) backend `name` for `op`; higher priority is tried first by `auto`."""
    if op not in _backends:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    lst = [b for b in _backends[op] if b.name != name] + [Backend(name, fn, supports, priority)]
    _backends[op] = sorted(lst, key=lambda b: -b.priority)


def backends(op: str) -> list[str]:
    """Names of the backends registered for `op`, in `auto` order."""
    return [b.name for b in _backends[op]]


def prefer(table: dict[tuple[str, str, torch.dtype], str]) -> dict[tuple[str, str, torch.dtype], str]:
    """Make `auto` try `table[(op, device type, dtype)]` (keyed on the first tensor argument) before the
    priority order; its `supports` still applies. Replaces the previous table, which is returned.
    `fastldm.ops.autotune.install` sets it from measurements; `prefer({})` restores the priority order."""
    for (op, _, _), name in table.items():
        if op not in _backends or name not in backends(op):
            raise ValueError(f"cannot prefer {name!r} for {op!r}: not a registered backend of that op")
    previous = dict(_preferred)
    _preferred.clear()
    _preferred.update(table)
    return previous


def selection() -> tuple:
    """The backend selection in force, hashable: the forced backends (`use`) and the `prefer` table. Code
    that caches a traced call (CUDA graphs) keys on it, since another selection is another kernel sequence."""
    forced = tuple(sorted(_forced.get().items()))
    preferred = tuple(sorted((op, dev, str(dt), name) for (op, dev, dt), name in _preferred.items()))
    return forced, preferred


def _auto_order(op: str, args: tuple) -> list[Backend]:
    """The order `auto` tries backends in: the preferred one for this call first, then by priority."""
    first = args[0] if args else None
    if not _preferred or not isinstance(first, torch.Tensor):
        return _backends[op]
    name = _preferred.get((op, first.device.type, first.dtype))
    return _backends[op] if name is None else sorted(_backends[op], key=lambda b: b.name != name)


@torch.compiler.assume_constant_result
def _forced_backend(op: str) -> str | None:
    """The backend forced for `op` by `use()`, if any. Under torch.compile this is read once, at trace time
    (a context variable cannot be traced), so a compiled model keeps the backends it was compiled with."""
    return _forced.get().get(op)


def dispatch(op: str, *args, **kwargs):
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
    for backend in _auto_order(op, args):
        if backend.supports(*args, **kwargs) is None:
            return backend.fn(*args, **kwargs)
    raise BackendUnavailable(f"no backend can run {op} for this input")  # unreachable: reference applies


def select(op: str, *args, **kwargs) -> str:
    """The name of the backend `dispatch` would use for this call (for tests and reports)."""
    forced = _forced.get().get(op)
    if forced is not None:
        return forced
    return next(b.name for b in _auto_order(op, args) if b.supports(*args, **kwargs) is None)


@contextlib.contextmanager
def use(backend: str | None = None, **per_op: str):
    """Force backends inside a `with` block: `use("reference")` for every op, or per op:
    `use(attention="triton", conv2d="winograd")`. "auto" removes a force."""
    unknown = set(per_op) - set(OPS)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; ops are {', '.join(OPS)}")
    forced = dict(_forced.get())
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
    if backend not in (None, "auto") and not any(backend in backends(op) for op in OPS):
        raise ValueError(f"no backend named {backend!r}; known: "
                         f"{', '.join(sorted({b for op in OPS for b in backends(op)}))}")
    token = _forced.set(forced)
    try:
        yield
    finally:
        _forced.reset(token)
