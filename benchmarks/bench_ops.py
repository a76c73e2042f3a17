"""Per-op benchmark: every backend × dtype at Stable Diffusion 1.5 shapes, against the reference backend.

    python benchmarks/bench_ops.py                                  # CPU, all backends that can run
    python benchmarks/bench_ops.py --device cuda --latent 64        # GPU, SD 1.5 at 512x512
    python benchmarks/bench_ops.py --ops conv2d --backends reference,winograd --dtypes float32,bfloat16

Prints a markdown table (median ms, speed-up over the reference, max |out − reference| in the same dtype)
and writes the rows as JSON. The shapes and the timer are fastldm.ops.autotune's, so these rows are what
the `auto` table is built from.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from fastldm.ops import autotune, registry


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default=None, help="comma-separated, e.g. float32,bfloat16")
    p.add_argument("--latent", type=int, default=64, help="latent size (64 = 512x512 images)")
    p.add_argument("--ops", default=",".join(registry.OPS))
    p.add_argument("--backends", default=None, help="comma-separated backends (the reference always runs)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/ops_<device>.json)")
    a = p.parse_args()
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
