"""Winograd F(2×2, 3×3) in bf16 (ops/winograd_f2_cpu.py) per SD 1.5 3×3 convolution shape, beside oneDNN's packed
bf16 convolution and F(4×4, 3×3) with fp32 GEMMs (ops/winograd_cpu.py) on the same bf16 images: time and error.

    python benchmarks/winograd_f2.py [--threads 2] [--rounds 7] [--json out.json]

F(4×4, 3×3) must keep its GEMMs in fp32: rounding its transformed tiles to bf16 costs ~10 % of max|y| (its Bᵀ and
Aᵀ have entries up to 5 and 8). F(2×2, 3×3) (Lavin & Gray 2016, §4.1) has entries 0, ±1 and ½, so its tiles V,
filters U and products M are held in bf16 and its 16 GEMMs run at the bf16 rate, for 2.25× fewer multiplies than
a direct convolution and transformed weights of 16/9 × a bf16 weight (F(4×4)'s fp32 ones are 8×).
  time    each layer whole (transforms included), batch 2 (CFG), channels_last bf16 in and out, medians of
          `--rounds` alternated calls; and F(2×2)'s 16 bf16 GEMMs alone (16, P, C) · (16, C, K), P = 2·⌈H/2⌉·⌈W/2⌉
  error   against an fp64 direct convolution, relative to max|y|, post-SiLU bf16 inputs, weights N(0, 1/(9C)), at
          256² (the error does not depend on the size; fp64 references at 512² take minutes)
"""
from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F
from winograd_conv import SHAPES, median_ms

from fastldm.runtime.device import configure_process, cpu_info
from fastldm.runtime.prepack import PackedConv2d
from fastldm.ops import winograd_cpu, winograd_f2_cpu
from fastldm.runtime.winograd_conv import WinogradConv2d

def bf16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16, back in t's dtype."""
    return t.to(torch.bfloat16).to(t.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    configure_process(args.threads)
    why = winograd_f2_cpu.unavailable() or winograd_cpu.unavailable()
    if why is not None:
        raise SystemExit(why)
    info = cpu_info()
    print(f"{platform.processor() or info.name} ({info.name}); avx512_bf16: {info.bf16}; threads {args.threads}; "
          f"torch {torch.__version__}\n")
    print("| image | in → out | spatial | oneDNN bf16 ms | F(4×4) fp32 GEMMs ms | F(2×2) bf16 ms | its GEMMs ms | "
          "oneDNN ÷ F(2×2) | error oneDNN | error F(4×4) | error F(2×2) |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows, g = [], torch.Generator().manual_seed(0)
    for image in (256, 512):
        for cin, cout, s256, _ in SHAPES:
            S = s256 * image // 256
            x = bf16(F.silu(torch.randn(2, cin, S, S, generator=g)))
            w = bf16(torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin ** 0.5))
            conv = torch.nn.Conv2d(cin, cout, 3, padding=1).requires_grad_(False).to(torch.bfloat16)
            conv.weight.copy_(w)
            xb = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            packed, f2 = PackedConv2d(conv), WinogradConv2d(conv)  # a bf16 weight: F(2×2)
            u4 = WinogradConv2d(conv.float()).u  # F(4×4)'s fp32 transform, applied to the bf16 image below
            f4 = lambda: winograd_cpu.conv(xb, u4, conv.bias)  # noqa: E731
            v = torch.ops.fastldm.winograd_f2_input(xb)
            with torch.inference_mode():
                err = {}
                if image == 256:
                    ref = F.conv2d(x.double(), w.double(), conv.bias.double(), padding=1)
                    peak = ref.abs().max()
                    err = {name: float((y.double() - ref).abs().max() / peak)
                           for name, y in (("onednn", packed(xb)), ("f4", f4()), ("f2", f2(xb)))}
                direct, t4, t2, gemms = median_ms([lambda: packed(xb), f4, lambda: f2(xb),
                                                   lambda: torch.bmm(v, f2.u)], args.rounds)
            rows.append({"image": image, "in": cin, "out": cout, "spatial": S, "onednn_ms": direct, "f4_ms": t4,
                         "f2_ms": t2, "f2_gemms_ms": gemms, "error": err})
            e = (f"{err['onednn']:.1e} | {err['f4']:.1e} | {err['f2']:.1e}" if err else "– | – | –")
            print(f"| {image}² | {cin} → {cout} | {S}² | {direct:.2f} | {t4:.2f} | {t2:.2f} | {gemms:.2f} | "
                  f"{direct / t2:.2f} | {e} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": info.name, "bf16": info.bf16, "threads": args.threads, "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
