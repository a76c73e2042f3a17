"""Load time and peak resident memory: fastldm.load vs diffusers' from_pretrained on the same full-size
SD 1.5 random-weight fp16 safetensors folder. Each load runs in a fresh process (A, B, A, B, ...).

    python benchmarks/load_sd15.py --runs 3 [--folder /tmp/sd15-fp16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import resource, sys, time, torch
t0 = time.perf_counter()
if sys.argv[1] == "fastldm":
    import fastldm
    pipe = fastldm.load(sys.argv[2], dtype="fp16")
else:
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(sys.argv[2], torch_dtype=torch.float16)
dt = time.perf_counter() - t0
print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def make_folder(path: Path) -> None:
    """A full SD 1.5 architecture with random fp16 weights, saved as a diffusers folder."""
    import torch

    from fastldm.testing import save_random_folder

    save_random_folder("sd1", path, dtype=torch.float16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", type=Path, default=Path("/tmp/sd15-fp16"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.folder.exists():
        make_folder(args.folder)
    res = {"fastldm": [], "diffusers": []}
    for _ in range(args.runs):
        for engine in res:
            out = subprocess.run([sys.executable, "-c", CHILD, engine, str(args.folder)], capture_output=True,
                                 text=True, check=True).stdout.split()
            res[engine].append((float(out[-2]), float(out[-1])))
    table = {e: {"load_s": statistics.median(r[0] for r in v), "peak_rss_mb": statistics.median(r[1] for r in v),
                 "runs": v} for e, v in res.items()}
    size = sum(f.stat().st_size for f in args.folder.rglob("*.safetensors")) / 2**20
    print(f"SD 1.5 fp16 folder, {size:.0f} MB of safetensors, {args.runs} runs each, alternating, medians")
    print("| engine | load (s) | peak RSS (MB) |\n|---|---|---|")
    for e, r in table.items():
        print(f"| {e} | {r['load_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    f, d = table["fastldm"], table["diffusers"]
    print(f"ratio fastldm/diffusers: load {f['load_s'] / d['load_s']:.2f}, peak RSS {f['peak_rss_mb'] / d['peak_rss_mb']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"weights_mb": size, **table}, indent=2))


if __name__ == "__main__":
    main()
