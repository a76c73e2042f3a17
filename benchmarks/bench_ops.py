"""Per-op benchmark: every backend × dtype at Stable Diffusion 1.5 shapes, against the reference backend.

    python benchmarks/bench_ops.py                                  # CPU, all backends that can run
    python benchmarks/bench_ops.py --device cuda --latent 64        # GPU, SD 1.5 at 512x512
    python benchmarks/bench_ops.py --ops conv2d --backends reference,winograd --dtypes float32,bfloat16
    python benchmarks/bench_ops.py --attention-ab flash_cpu --threads 2 --unet-latent 32

Prints a markdown table (median ms, speed-up over the reference, max |out − reference| in the same dtype)
and writes the rows as JSON. The shapes and the timer are fastldm.ops.autotune's, so these rows are what
the `auto` table is built from.

`--attention-ab BACKEND` instead compares one attention backend with the reference (torch's SDPA) side
by side (BENCHMARKS.md rule 1): at SD 1.5's attention shapes for 512² and 256² images (batch 2, 8 heads),
each round runs a 2048³ fp32 matmul (the machine's GEMM ceiling), the reference and the backend once in
turn; medians of the rounds, as ms and effective GFLOP/s (4·B·H·N·M·D per call). `--unet-latent L` adds
one full-size SD 1.5 UNet call (random weights, batch 2, 77-token context) at an L×L latent, alternating
the reference attention with the backend forced.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from fastldm import ops as fops
from fastldm.bench.ablation import random_unet, unet_inputs
from fastldm.families import PRESETS
from fastldm.ops import autotune, registry

CEILING = 2048  # the fp32 matmul that stands for the machine's GEMM ceiling: CEILING³


def run(device: torch.device, dtypes: list[torch.dtype], latent: int, ops: list[str], names: list[str] | None,
        repeats: int) -> list[dict]:
    rows = []
    for case in (c for c in autotune.sd15_cases(latent) if c.op in ops):
        for dtype in dtypes:
            args, kwargs = case.make(device, dtype, torch.Generator().manual_seed(0))
            ref_out, ref_ms = None, None
            for b in autotune.candidates(case.op, device):
                if (names is not None and b.name not in names and b.name != "reference") \
                        or b.supports(*args, **kwargs) is not None:
                    continue
                ms = autotune.time_ms(b.fn, args, kwargs, device, repeats)
                with torch.inference_mode():
                    out = b.fn(*args, **kwargs).float()
                if b.name == "reference":
                    ref_out, ref_ms = out, ms
                rows.append({"op": case.op, "case": case.label, "dtype": str(dtype).removeprefix("torch."),
                             "backend": b.name, "ms": round(ms, 3),
                             "speedup": None if ref_ms is None else round(ref_ms / ms, 2),
                             "max_abs_err": None if ref_out is None else (out - ref_out).abs().max().item()})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| op | case | dtype | backend | ms | × ref | max abs Δ vs ref |", "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        err = "" if r["max_abs_err"] is None or r["backend"] == "reference" else f"{r['max_abs_err']:.2e}"
        lines.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['backend']} | {r['ms']:.2f} | "
                     f"{r['speedup'] or ''} | {err} |")
    return "\n".join(lines)


def _alternate(fns: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    """Median ms of each function over `repeats` rounds that call every function once in turn, after one
    warm-up round, timed by `clock`."""
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = clock()
                fn()
                times[name].append((clock() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def sd15_attention_shapes(latent: int) -> list[tuple[str, int, int, int]]:
    """(label, queries N, keys M, head dim D) of SD 1.5's attention calls at a latent×latent latent: self-
    and cross-attention (77 text tokens) at the 3 attention levels of the down/up blocks and the mid block."""
    levels = [(latent, 40), (latent // 2, 80), (latent // 4, 160), (latent // 8, 160)]
    return [(f"{kind} N={S * S}{' M=77' if kind == 'cross' else ''} D={D}{' (mid)' if i == 3 else ''}",
             S * S, S * S if kind == "self" else 77, D) for i, (S, D) in enumerate(levels) for kind in ("self", "cross")]


def attention_ab(backend: str, repeats: int, clock: Callable[[], float]) -> list[dict]:
    """The backend against the reference at SD 1.5's attention shapes (512² and 256² images, batch 2, 8
    heads, (B, N, H, D) memory viewed as (B, H, N, D) as the UNet passes it), with the fp32 matmul ceiling
    measured in the same rounds."""
    a, b = torch.randn(CEILING, CEILING), torch.randn(CEILING, CEILING)
    g = torch.Generator().manual_seed(0)
    rows = []
    for latent in (64, 32):
        for label, N, M, D in sd15_attention_shapes(latent):
            q, k, v = (torch.randn(2, n, 8, D, generator=g).transpose(1, 2) for n in (N, M, M))  # (B, H, n, D)
            flop = 4 * 2 * 8 * N * M * D
            _forced(backend, q, k, v)  # raises here if the backend cannot run the case
            ms = _alternate({"ceiling": lambda: torch.mm(a, b), **{name: functools.partial(_forced, name, q, k, v)
                                                                      for name in ("reference", backend)}}, repeats,
                            clock)
            ceiling = 2 * CEILING ** 3 / ms["ceiling"] / 1e6
            rows.append({"image": latent * 8, "case": label, "ref_ms": round(ms["reference"], 3),
                         "ms": round(ms[backend], 3), "speedup": round(ms["reference"] / ms[backend], 3),
                         "ref_gflops": round(flop / ms["reference"] / 1e6, 1),
                         "gflops": round(flop / ms[backend] / 1e6, 1), "ceiling_gflops": round(ceiling, 1)})
    return rows


def _forced(backend: str, q, k, v):
    with fops.use(attention=backend):
        return fops.attention(q, k, v)


def unet_ab(backend: str, latent: int, repeats: int, clock: Callable[[], float]) -> dict:
    """One SD 1.5 UNet call (fp32, random weights) with the reference attention and with `backend`."""
    config = PRESETS["sd1"].unet
    unet = random_unet(config)
    args = unet_inputs(config, latent, "cpu", torch.float32)

    def call(name):
        with fops.use(attention=name):
            return unet(**args)
    with torch.inference_mode():
        err = ((call(backend) - call("reference")).abs().max() / call("reference").abs().max()).item()
    ms = _alternate({"reference": lambda: call("reference"), backend: lambda: call(backend)}, repeats, clock)
    return {"latent": latent, "ref_ms": round(ms["reference"], 1), "ms": round(ms[backend], 1),
            "speedup": round(ms["reference"] / ms[backend], 3), "rel_err": err}


def attention_markdown(rows: list[dict], backend: str) -> str:
    lines = [f"| image | case | SDPA ms | {backend} ms | × SDPA | SDPA GFLOP/s | {backend} GFLOP/s | "
             f"matmul GFLOP/s | {backend} / matmul |", "|---|---|" + "---:|" * 7]
    for r in rows:
        lines.append(f"| {r['image']}² | {r['case']} | {r['ref_ms']:.2f} | {r['ms']:.2f} | {r['speedup']:.2f} | "
                     f"{r['ref_gflops']:.1f} | {r['gflops']:.1f} | {r['ceiling_gflops']:.1f} | "
                     f"{r['gflops'] / r['ceiling_gflops']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default=None, help="comma-separated, e.g. float32,bfloat16")
    p.add_argument("--latent", type=int, default=64, help="latent size (64 = 512x512 images)")
    p.add_argument("--ops", default=",".join(registry.OPS))
    p.add_argument("--backends", default=None, help="comma-separated backends (the reference always runs)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/ops_<device>.json)")
    p.add_argument("--attention-ab", default=None, metavar="BACKEND",
                   help="compare this CPU attention backend with the reference, side by side (see above)")
    p.add_argument("--unet-latent", type=int, default=None, help="with --attention-ab: also one SD 1.5 UNet call")
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's)")
    p.add_argument("--cpu-time", action="store_true",
                   help="with --attention-ab --threads 1: time by the thread's CPU time, not the wall clock (on a "
                        "shared machine, time the OS gives other processes then does not count)")
    a = p.parse_args()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    if a.cpu_time and torch.get_num_threads() != 1:
        p.error("--cpu-time measures the calling thread only: use it with --threads 1")
    if a.attention_ab:
        clock = time.thread_time if a.cpu_time else time.perf_counter
        rows = attention_ab(a.attention_ab, a.repeats, clock)
        unet = None if a.unet_latent is None else unet_ab(a.attention_ab, a.unet_latent, a.repeats, clock)
        print(f"device: {autotune.device_kind(torch.device('cpu'))}, torch {torch.__version__}, fp32, "
              f"median of {a.repeats} alternated rounds, {'thread CPU time' if a.cpu_time else 'wall clock'}\n")
        print(attention_markdown(rows, a.attention_ab))
        if unet is not None:
            print(f"\nSD 1.5 UNet call, latent {unet['latent']}², batch 2: reference {unet['ref_ms']:.1f} ms, "
                  f"{a.attention_ab} {unet['ms']:.1f} ms ({unet['speedup']:.2f}×), rel. Δ {unet['rel_err']:.1e}")
        out = Path(a.json or Path(__file__).parent / "results" / f"attention_{a.attention_ab}.json")
        out.write_text(json.dumps({"device_kind": autotune.device_kind(torch.device("cpu")),
                                   "torch": torch.__version__, "repeats": a.repeats,
                                   "clock": "thread_time" if a.cpu_time else "perf_counter",
                                   "loadavg": os.getloadavg(), "attention": rows, "unet": unet}, indent=1))
        print(f"\nwrote {out}")
        return
    device = torch.device(a.device)
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")] if a.dtypes else list(autotune.DTYPES[device.type])
    rows = run(device, dtypes, a.latent, a.ops.split(","), a.backends.split(",") if a.backends else None,
               a.repeats)
    table = markdown(rows)
    print(f"device: {autotune.device_kind(device)}, torch {torch.__version__}, latent {a.latent}\n")
    print(table)
    out = Path(a.json or Path(__file__).parent / "results" / f"ops_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device_kind": autotune.device_kind(device), "torch": torch.__version__,
                               "python": platform.python_version(), "latent": a.latent, "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
