"""The `auto` table: which backend is fastest for each op on this device, measured rather than assumed.

`measure_table(device)` times every backend that can run each op on representative Stable Diffusion 1.5
shapes (512×512 image, 64×64 latent, classifier-free-guidance batch 2) and chooses, per op and dtype,
the backend with the least total time over the cases. `preferences(table)` turns those choices into the
`preferred` table of a `registry.Kernels` (a Pipeline's) or of `registry.prefer`, so `auto` tries the chosen
backend first and falls back to the priority order for calls it cannot run. Without preferences, `auto` is
the registry's priority order.

A backend is a candidate if it can run every case of its op and its output stays close to the
reference's; the fastest candidate wins. Backends whose kernels would run in the Triton interpreter
are left out (their times mean nothing).
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import registry

DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float16, torch.bfloat16)}


@dataclass(frozen=True)
class Case:
    """One representative call: `make(device, dtype, generator)` returns the op's (args, kwargs)."""
    op: str
    label: str
    make: Callable[[torch.device, torch.dtype, torch.Generator], tuple[tuple, dict]]


def _randn(g: torch.Generator, device, dtype, *shape, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(device, dtype)


def _attention(B: int, H: int, N: int, M: int, D: int):
    def make(device, dtype, g):
        q = _randn(g, device, dtype, B, N, H, D).transpose(1, 2)  # (B, H, N, D), the UNet's strides
        k = _randn(g, device, dtype, B, M, H, D).transpose(1, 2)  # (B, H, M, D)
        v = _randn(g, device, dtype, B, M, H, D).transpose(1, 2)
        return (q, k, v), {}
    return make


def _group_norm(B: int, C: int, S: int):
    def make(device, dtype, g):
        x = _randn(g, device, dtype, B, C, S, S)
        w, b = _randn(g, device, dtype, C, scale=0.1) + 1, _randn(g, device, dtype, C, scale=0.1)
        return (x, 32, w, b, 1e-5), {"act": "silu"}
    return make


def _conv3x3(B: int, C: int, S: int):
    def make(device, dtype, g):
        x = _randn(g, device, dtype, B, C, S, S)
        w = _randn(g, device, dtype, C, C, 3, 3, scale=1 / (3 * C ** 0.5))
        return (x, w, _randn(g, device, dtype, C, scale=0.1)), {"stride": 1, "padding": 1}
    return make


def _geglu(B: int, N: int, F: int):
    return lambda device, dtype, g: ((_randn(g, device, dtype, B, N, 2 * F),), {})


def _gelu(B: int, N: int, F: int, approximate: str):
    return lambda device, dtype, g: ((_randn(g, device, dtype, B, N, F),), {"approximate": approximate})


def sd15_cases(latent: int = 64) -> list[Case]:
    """SD 1.5 UNet calls at a latent of `latent`×`latent` (64 = 512 px), batch 2; CLIP-L's MLP for gelu.
    UNet levels: 320 channels at the latent size (8 heads of 40), 640 at 1/2 (80), 1280 at 1/4 (160)
    and 1/8 (no attention)."""
    if latent % 8:
        raise ValueError(f"latent size {latent} is not a multiple of 8 (the SD UNet halves it three times)")
    levels = [(320, latent, 40), (640, latent // 2, 80), (1280, latent // 4, 160), (1280, latent // 8, None)]
    cases = []
    for C, S, D in levels:
        cases.append(Case("conv2d", f"3x3 {C}ch {S}x{S}", _conv3x3(2, C, S)))
        cases.append(Case("group_norm", f"GN+SiLU {C}ch {S}x{S}", _group_norm(2, C, S)))
        if D is not None:
            cases.append(Case("attention", f"self N={S * S} D={D}", _attention(2, 8, S * S, S * S, D)))
            cases.append(Case("attention", f"cross N={S * S} M=77 D={D}", _attention(2, 8, S * S, 77, D)))
            cases.append(Case("geglu", f"GEGLU {S * S}x{8 * C}->{4 * C}", _geglu(2, S * S, 4 * C)))
    cases.append(Case("gelu", "quick 77x3072 (CLIP-L)", _gelu(2, 77, 3072, "quick")))
    return cases


def time_ms(fn: Callable, args: tuple, kwargs: dict, device: torch.device, repeats: int = 5) -> float:
    """Median wall time of `fn(*args, **kwargs)` in ms, after one warm-up call (compiles kernels, fills
    the Winograd weight cache), synchronizing CUDA around every call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        fn(*args, **kwargs)
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn(*args, **kwargs)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_kind(device: torch.device) -> str:
    """What a table is valid for: the GPU's name, or the CPU's model name and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")), name)
    return f"{name} ({torch.get_num_threads()} threads)"


def candidates(op: str, device: torch.device) -> list[registry.Backend]:
    """The backends of `op` worth timing on `device`, the reference first; kernels that would run in the
    Triton interpreter are left out."""
    def interpreted(b: registry.Backend) -> bool:
        if device.type != "cpu" or not b.fn.__module__.startswith(f"{__package__}.triton"):
            return False
        from .triton.device import INTERPRET
        return INTERPRET
    return sorted((b for b in registry._backends[op] if not interpreted(b)), key=lambda b: b.name != "reference")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out − ref| / max |ref|."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def measure_table(device: str | torch.device, path: str | Path | None = None,
                  dtypes: tuple[torch.dtype, ...] | None = None, latent: int = 64, repeats: int = 5,
                  max_rel_err: float = 0.02, ops: tuple[str, ...] = registry.OPS) -> dict:
    """Time the backends of each op in `ops` on `sd15_cases(latent)` and return (and write to `path` as JSON)
    {"device", "device_kind", "latent", "ms": {op: {dtype: {backend: total ms}}}, "rel_err": {op: {dtype:
    {backend: max|out − reference| / max|reference|}}}, "choice": {op: {dtype: backend}}}.

    The choice is the fastest backend whose output stays within `max_rel_err` of the reference's (in the
    same dtype) on every case: F(4x4, 3x3) Winograd in bf16, at ~10%, is timed but never chosen. Ops
    where the reference wins get no choice."""
    device = torch.device(device)
    dtypes = dtypes or DTYPES[device.type]
    cases = sd15_cases(latent)
    ms: dict[str, dict[str, dict[str, float]]] = {}
    errs: dict[str, dict[str, dict[str, float]]] = {}
    choice: dict[str, dict[str, str]] = {}
    for op in ops:
        op_cases = [c for c in cases if c.op == op]
        for dtype in dtypes:
            dt = str(dtype).removeprefix("torch.")
            g = torch.Generator().manual_seed(0)
            calls = [c.make(device, dtype, g) for c in op_cases]
            backends = candidates(op, device)
            with torch.inference_mode():
                refs = [backends[0].fn(*a, **kw) for a, kw in calls]  # the reference comes first
            totals, rel = {}, {}
            for b in backends:
                if any(b.supports(*a, **kw) is not None for a, kw in calls):
                    continue
                totals[b.name] = round(sum(time_ms(b.fn, a, kw, device, repeats) for a, kw in calls), 3)
                with torch.inference_mode():
                    rel[b.name] = max(rel_err(b.fn(*a, **kw), r) for (a, kw), r in zip(calls, refs, strict=True))
            ms.setdefault(op, {})[dt], errs.setdefault(op, {})[dt] = totals, rel
            best = min((n for n in totals if rel[n] <= max_rel_err), key=totals.get)
            if best != "reference":
                choice.setdefault(op, {})[dt] = best
    table = {"device": device.type, "device_kind": device_kind(device), "latent": latent, "ms": ms,
             "rel_err": errs, "choice": choice}
    if path is not None:
        Path(path).write_text(json.dumps(table, indent=1))
    return table


def preferences(table: dict | str | Path) -> dict[tuple[str, str, torch.dtype], str]:
    """The `auto` preferences of a table from `measure_table` (the dict or its JSON file), for a
    `registry.Kernels(preferred=...)` (a Pipeline's) or `registry.prefer(...)`; raises if the table was
    measured on another kind of device than this machine's."""
    if not isinstance(table, dict):
        table = json.loads(Path(table).read_text())
    here = device_kind(torch.device(table["device"]))
    if table["device_kind"] != here:
        raise ValueError(f"this autotune table was measured on {table['device_kind']!r}, not on this {here!r}; "
                         f"measure one here with fastldm.ops.autotune.measure_table")
    return {(op, table["device"], getattr(torch, dt)): name
            for op, per in table["choice"].items() for dt, name in per.items()}
