"""Where the bytes of a forward pass go: every storage's birth, size, last use and death, and two peaks.

`MemoryTrace` is a `TorchDispatchMode`: it sees every aten op the code inside it runs (one UNet call, a
whole generation) and records, per *storage* (what the allocator really holds; views and in-place ops
allocate nothing):

- birth: the op that returned it first, with its aten name, the output's shape and dtype, and the module
  running then (the dotted path inside the modules given to the trace, from forward hooks);
- last use: the last op that read or wrote it (through any view);
- death: when its last reference went away. Python frees by reference count, so a finalizer on the
  storage's Python object (which PyTorch keeps alive exactly as long as the storage itself) says when.

From these it reports, for the op order that ran:

- `peak_bytes`: the most bytes of storages born in the trace and not yet freed, over the ops (what an
  allocator holding only those would need; the bytes live before the trace are not counted);
- `lower_bound_bytes`: the same maximum if every storage were freed right after its last use — the
  live-set lower bound of this op order (a perfect planner reusing buffers: TFLite's greedy-by-size arena,
  ggml-alloc, `torch/_inductor/memory.py::estimate_peak_memory` compute plans against this bound);
- the storages alive at the peak, largest first, and how many of their bytes were already past their
  last use there (held by a Python reference, not needed);
- `weight_bytes`: storages the ops read that existed before the trace (parameters, buffers, the caller's
  inputs) — the paper's Weight MB when the inputs are small.

What it cannot see: scratch memory an op allocates and frees inside its kernel (oneDNN's reordered conv
weights, im2col buffers, a fused attention's blocks) and tensors made outside the dispatcher
(`torch.from_numpy`), which count as pre-existing; and oneDNN's packed weights (runtime/prepack.py),
opaque tensors without a storage, neither as weights nor when a first call packs them. `torch.profiler`'s memory events include the first
(fastldm.bench.ablation.peak_bytes); compare the two to size them.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MiB = 2**20


@dataclass
class Storage:
    """One storage seen by the trace. Op indices count the aten ops of the trace from 0."""
    nbytes: int
    op: str                                 # the aten op that made it ("aten.convolution"), "" if pre-existing
    shape: tuple[int, ...] = ()             # of the tensor that op returned
    dtype: torch.dtype | None = None
    module: str | None = None               # dotted path of the innermost module running at birth
    born: int = -1                          # -1: existed before the trace
    last_use: int = -1
    died: int | None = None                 # freed before op `died` ran; None: alive at the end of the trace

    def alive_at(self, i: int) -> bool:
        return self.born <= i and (self.died is None or i < self.died)


@dataclass
class MemoryReport:
    ops: int
    peak_bytes: int
    peak_op: int                            # index of the op after which `peak_bytes` were held
    lower_bound_bytes: int
    bound_op: int
    weight_bytes: int
    end_bytes: int                          # born in the trace and still alive at its end (outputs, caches)
    total_allocated_bytes: int              # all bytes born in the trace, reuse not counted
    at_peak: list[Storage] = field(repr=False, default_factory=list)    # largest first
    at_bound: list[Storage] = field(repr=False, default_factory=list)   # the bound's live set, largest first
    peak_op_name: str = ""

    @property
    def held_past_last_use(self) -> int:
        """Bytes alive at the peak whose last use was earlier: what freeing at last use would have saved there."""
        return sum(s.nbytes for s in self.at_peak if s.last_use < self.peak_op)

    def summary(self) -> str:
        return (f"{self.ops} ops; peak {self.peak_bytes / MiB:.1f} MiB after op {self.peak_op} ({self.peak_op_name}), "
                f"live-set lower bound {self.lower_bound_bytes / MiB:.1f} MiB (peak/bound "
                f"{self.peak_bytes / max(self.lower_bound_bytes, 1):.2f}); held past last use at the peak "
                f"{self.held_past_last_use / MiB:.1f} MiB; weights/inputs {self.weight_bytes / MiB:.1f} MiB")

    def table(self, top: int = 10) -> str:
        """The `top` largest storages alive at the peak, as a markdown table."""
        lines = ["| MiB | op | shape | dtype | module | born | last use |", "|---:|---|---|---|---|---:|---:|"]
        for s in self.at_peak[:top]:
            dtype = str(s.dtype).removeprefix("torch.")
            lines.append(f"| {s.nbytes / MiB:.1f} | {s.op} | {list(s.shape)} | {dtype} | {s.module or ''} | "
                         f"{s.born} | {s.last_use} |")
        return "\n".join(lines)


class MemoryTrace(TorchDispatchMode):
    """Record every storage the code inside `with MemoryTrace(*modules) as trace:` makes; then
    `trace.report()`. `modules` (optional) name the module running at each birth (forward hooks)."""

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.modules = modules
        self.storages: list[Storage] = []
        self._live: dict[int, int] = {}          # storage cdata -> index into self.storages, while alive
        self._finalizers: list[weakref.finalize] = []
        self._hooks: list = []
        self._path: list[str] = []
        self._ops = 0
        self._names: list[str] = []              # aten name per op
        self._now = self._peak = 0
        self._peak_op = -1
        self._open = False

    # ---- context ------------------------------------------------------------------------------------------

    def __enter__(self):
        for root in self.modules:
            for name, m in root.named_modules():
                self._hooks.append(m.register_forward_pre_hook(lambda _m, _a, n=name: self._path.append(n)))
                self._hooks.append(m.register_forward_hook(self._leave, always_call=True))
        self._open = True
        return super().__enter__()

    def _leave(self, *_) -> None:  # a forward hook: returning None keeps the module's output
        self._path.pop()

    def __exit__(self, *exc):
        self._open = False
        for h in self._hooks:
            h.remove()
        for f in self._finalizers:
            f.detach()
        self._hooks, self._finalizers = [], []
        return super().__exit__(*exc)

    # ---- recording ----------------------------------------------------------------------------------------

    def _died(self, key: int, index: int) -> None:
        if not self._open:
            return
        del self._live[key]
        s = self.storages[index]
        s.died = self._ops
        if s.born >= 0:
            self._now -= s.nbytes

    def _lookup(self, t: torch.Tensor, op: str) -> Storage | None:
        """The record of `t`'s storage; a new one (born at this op when `op` is given, else pre-existing)."""
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, some subclasses)
            return None
        key = st._cdata
        if key in self._live:
            return self.storages[self._live[key]]
        born = self._ops if op else -1
        s = Storage(st.nbytes(), op, tuple(t.shape), t.dtype, self._path[-1] if self._path else None, born, born)
        self._live[key] = len(self.storages)
        self._finalizers.append(weakref.finalize(st, self._died, key, len(self.storages)))
        self.storages.append(s)
        if op:
            self._now += s.nbytes
        return s

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        i, name = self._ops, str(func.overloadpacket)
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and (s := self._lookup(t, "")) is not None:
                s.last_use = i
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (s := self._lookup(t, name)) is not None:
                s.last_use = i  # a view or an in-place write of a known storage is a use of it
        self._names.append(name)
        if self._now > self._peak:
            self._peak, self._peak_op = self._now, i
        self._ops += 1
        return out

    # ---- results ------------------------------------------------------------------------------------------

    def report(self) -> MemoryReport:
        n = self._ops
        made = [s for s in self.storages if s.born >= 0]
        # Live-set lower bound: each storage lives from its birth to its last use (to the end if it outlives
        # the trace: the caller holds it). A difference array over the op indices.
        delta = [0] * (n + 1)
        for s in made:
            delta[s.born] += s.nbytes
            delta[(n - 1 if s.died is None else s.last_use) + 1] -= s.nbytes
        bound = bound_op = live = 0
        for i in range(n):
            live += delta[i]
            if live > bound:
                bound, bound_op = live, i
        at_peak = sorted((s for s in made if s.alive_at(self._peak_op)), key=lambda s: -s.nbytes)
        at_bound = sorted((s for s in made if s.born <= bound_op <= (n - 1 if s.died is None else s.last_use)),
                          key=lambda s: -s.nbytes)
        return MemoryReport(
            ops=n, peak_bytes=self._peak, peak_op=self._peak_op, lower_bound_bytes=bound, bound_op=bound_op,
            weight_bytes=sum(s.nbytes for s in self.storages if s.born < 0),
            end_bytes=sum(s.nbytes for s in made if s.died is None),
            total_allocated_bytes=sum(s.nbytes for s in made), at_peak=at_peak, at_bound=at_bound,
            peak_op_name=self._names[self._peak_op] if self._peak_op >= 0 else "")
