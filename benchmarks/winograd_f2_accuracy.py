"""Does Winograd F(2×2, 3×3)'s bf16 rounding show in images? One SD 1.5 pipeline (random full-size weights) in
fp32 as the reference, and in bf16 with direct convolutions and then with F(2×2) Winograd at every level that
fits (what `fastldm.load` runs on an AVX-512 bf16 CPU where tuning measured it faster): the same prompt, seed and
steps, PSNR of each bf16 image against the fp32 one.

    python benchmarks/winograd_f2_accuracy.py [--models /work/models] [--size 512] [--steps 10] [--json out.json]

F(2×2) rounds its tiles, weights and GEMM products to bf16 where a direct bf16 convolution rounds only its
output: per layer ~2× the direct convolution's error (benchmarks/winograd_f2.py). Convolutions run unpacked in
all three (a forced `reference` conv2d backend), so that only the dtype and Winograd differ.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import fastldm
from fastldm.ops import winograd_f2_cpu
from fastldm.runtime.device import configure_process, cpu_info
from fastldm.runtime.winograd_conv import depth, use_winograd, winograd_levels
from fastldm.testing import psnr

PROMPT = "a lighthouse on a cliff at sunset, oil painting"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("/work/models"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    configure_process(args.threads)
    why = winograd_f2_cpu.unavailable()
    if why is not None:
        raise SystemExit(why)
    folder = args.models / "sd15-fp16"
    if not folder.exists():
        raise SystemExit(f"{folder} is missing: make it with benchmarks/peer_models.py (see docs/benchmarks.md)")
    info = cpu_info()
    print(f"{platform.processor() or info.name} ({info.name}); avx512_bf16: {info.bf16}; threads {args.threads}; "
          f"torch {torch.__version__}; SD 1.5 random weights, {args.size}², {args.steps} steps, seed {args.seed}")
    request = dict(steps=args.steps, seed=args.seed, width=args.size, height=args.size)
    images, seconds = {}, {}

    def generate(name: str, pipe) -> None:
        t = time.perf_counter()
        images[name] = pipe.generate(PROMPT, **request).raw  # (1, H, W, C) in [0, 1]
        seconds[name] = time.perf_counter() - t
        print(f"{name}: {seconds[name]:.1f} s", flush=True)

    direct = {"conv2d": "reference"}
    generate("fp32", fastldm.load(folder, dtype="fp32", backends=direct))
    pipe = fastldm.load(folder, dtype="bf16", backends=direct)
    generate("bf16 direct", pipe)
    swapped = use_winograd(pipe.unet, depth(pipe.unet))
    levels = winograd_levels(pipe.unet)
    generate("bf16 Winograd F(2x2)", pipe)
    rows = {name: psnr(images[name], images["fp32"]) for name in ("bf16 direct", "bf16 Winograd F(2x2)")}
    rows["F(2x2) against bf16 direct"] = psnr(images["bf16 Winograd F(2x2)"], images["bf16 direct"])
    print(f"F(2x2): {swapped} layers, {levels} of {depth(pipe.unet)} levels")
    print("| image | PSNR (dB) |\n|---|---:|")
    for name, db in rows.items():
        print(f"| {name}{'' if 'against' in name else ' against fp32'} | {db:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": info.name, "bf16": info.bf16, "threads": args.threads, "torch": torch.__version__,
                       "size": args.size, "steps": args.steps, "seed": args.seed, "layers": swapped,
                       "levels": levels, "psnr_db": rows, "seconds": seconds}, f, indent=1)


if __name__ == "__main__":
    main()
