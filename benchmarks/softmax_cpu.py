"""The C++ row softmax (ops/softmax_cpu.py) against torch.softmax, where blocked attention uses it.

    python benchmarks/softmax_cpu.py [--threads 2] [--rounds 15] [--unet-latent 64] [--json out.json]

Three levels, each an A/B of the two softmaxes alternated call by call, medians of `--rounds` after two
warm-up calls, the process set up as the CLI's (threads, malloc):
1. one bf16 score block as blocked attention cuts it (block_rows(M) rows of M keys) for SD 1.5's
   self-attention at 256² and 512² (M = 256 … 4096), with each softmax's max error against fp64;
2. the whole blocked attention call at those shapes (batch 2, 8 heads, (B, N, H, D) memory as the UNet
   passes it), the op run with the kernel and with torch's softmax;
3. with `--unet-latent L`, one full-size SD 1.5 UNet call in bf16 (random weights, optimised as
   `fastldm.load` does: channels_last, packed weights, Winograd; batch 2; "blocked" attention where it
   applies, as the tuning picks it) at an L×L latent (64: a 512² image), the kernel switched off by making it
   report itself unavailable.
"""
from __future__ import annotations

import argparse
import json
import platform
from unittest import mock

import torch
from winograd_conv import median_ms

from fastldm import ops
from fastldm.bench.ablation import random_unet, unet_inputs
from fastldm.families import PRESETS
from fastldm.ops import blocked_attention, softmax_cpu
from fastldm.runtime.device import configure_process, cpu_info
from fastldm.runtime.optimize import optimize

LEVELS = [(40, 1), (80, 2), (160, 4)]  # SD 1.5's self-attention levels: head dim, latent downsampling


def blocks(rounds: int, threads: int) -> list[dict]:
    rows = []
    for image in (256, 512):
        for D, down in LEVELS:
            M = (image // 8 // down) ** 2
            if M < blocked_attention.MIN_KEYS:
                continue
            R = min(M, blocked_attention.block_rows(M, threads))
            g = torch.Generator().manual_seed(M)
            scores = (8 * torch.randn(R, M, generator=g)).bfloat16()
            work = scores.clone()
            ref = torch.softmax(scores.double(), dim=-1)
            err = {name: (out.double() - ref).abs().max().item()
                   for name, out in (("torch", torch.softmax(scores, -1)),
                                     ("kernel", softmax_cpu.softmax_(scores.clone())))}
            t_torch, t_kernel = median_ms([lambda: torch.softmax(scores, -1), lambda: softmax_cpu.softmax_(work)],
                                          rounds)
            rows.append({"image": image, "rows": R, "keys": M, "torch_ms": t_torch, "kernel_ms": t_kernel,
                         "speedup": t_torch / t_kernel, "torch_err": err["torch"], "kernel_err": err["kernel"]})
            print(f"| {image}² | {R} × {M} | {t_torch:.3f} | {t_kernel:.3f} | {t_torch / t_kernel:.2f} | "
                  f"{err['torch']:.1e} | {err['kernel']:.1e} |")
    return rows


def calls(rounds: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for image in (256, 512):
        for D, down in LEVELS:
            N = (image // 8 // down) ** 2
            if N < blocked_attention.MIN_KEYS:
                continue
            q, k, v = (torch.randn(2, N, 8, D, generator=g).bfloat16().transpose(1, 2) for _ in range(3))
            t_torch, t_kernel = median_ms([lambda: torch.ops.fastldm.blocked_attention(q, k, v, False),
                                           lambda: torch.ops.fastldm.blocked_attention(q, k, v, True)], rounds)
            rows.append({"image": image, "tokens": N, "head_dim": D, "torch_ms": t_torch, "kernel_ms": t_kernel,
                         "speedup": t_torch / t_kernel})
            print(f"| {image}² | {N} × {D} | {t_torch:.2f} | {t_kernel:.2f} | {t_torch / t_kernel:.2f} |")
    return rows


def unet(latent: int, rounds: int) -> dict:
    config = PRESETS["sd1"].unet
    model = optimize({"unet": random_unet(config, dtype=torch.bfloat16)}, torch.device("cpu"))["unet"]
    args = {k: v.bfloat16() if v.is_floating_point() else v
            for k, v in unet_inputs(config, latent, "cpu", torch.bfloat16).items()}

    def call(native: bool):
        with ops.registry.prefer({("attention", "cpu", torch.bfloat16): "blocked"}), \
                mock.patch.object(softmax_cpu, "unavailable", lambda: None if native else "switched off"):
            return model(**args)

    with torch.inference_mode():
        t_torch, t_kernel = median_ms([lambda: call(False), lambda: call(True)], rounds)
    print(f"\nSD 1.5 UNet call, bf16, {latent}² latent, batch 2: torch softmax {t_torch:.0f} ms, kernel "
          f"{t_kernel:.0f} ms ({t_torch / t_kernel:.3f}×, {t_torch - t_kernel:.0f} ms)")
    return {"latent": latent, "torch_ms": t_torch, "kernel_ms": t_kernel, "speedup": t_torch / t_kernel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--unet-latent", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    why = softmax_cpu.unavailable()
    if why is not None:
        raise SystemExit(f"the softmax kernel cannot run here: {why}")
    configure_process(args.threads)
    info = cpu_info()
    print(f"{platform.processor() or info.name} ({info.name}); avx512_bf16: {info.bf16}; threads {args.threads}; "
          f"torch {torch.__version__}; kernel ISA {ops.native_build.isa()}\n")
    print("| image | block | torch.softmax ms | kernel ms | × | torch err | kernel err |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        result = {"blocks": blocks(args.rounds, args.threads)}
        print("\n| image | blocked attention call (tokens × head dim) | torch softmax ms | kernel ms | × |\n"
              "|---|---|---:|---:|---:|")
        result["calls"] = calls(args.rounds)
    if args.unet_latent:
        result["unet"] = unet(args.unet_latent, max(3, args.rounds // 3))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": info.name, "bf16": info.bf16, "threads": args.threads, "torch": torch.__version__,
                       "isa": ops.native_build.isa(), **result}, f, indent=1)


if __name__ == "__main__":
    main()
