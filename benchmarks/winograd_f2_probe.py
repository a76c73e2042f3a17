"""Would Winograd F(2×2, 3×3) with bf16 GEMMs pay on a native-bf16 CPU? Its error and its GEMMs' time per SD 1.5
3×3 convolution shape, beside oneDNN's packed bf16 convolution and the F(4×4, 3×3) layer fastldm runs today.

    python benchmarks/winograd_f2_probe.py [--threads 2] [--rounds 7] [--json out.json]

F(4×4, 3×3) (runtime/winograd_conv.py) keeps its GEMMs in fp32: rounding its transformed tiles to bf16 costs
~10 % of max|y| (its Bᵀ and Aᵀ have entries up to 5 and 8). F(2×2, 3×3) (Lavin & Gray 2016, §4.1: Bᵀ, G, Aᵀ
below) has entries 0, ±1 and ½, so its transformed tiles V = Bᵀ d B and filters U = G g Gᵀ may be rounded to
bf16 and its 16 GEMMs run at the bf16 rate, for 2.25× fewer multiplies than a direct convolution and transformed
weights of 16/9 × a bf16 weight (F(4×4)'s fp32 ones are 8×). This probe measures the two things that decide it,
without building its C++ transforms:
  error   against an fp64 direct convolution, relative to max|y|: V and U rounded to bf16, the GEMMs exact in
          fp32 (what a bf16 GEMM with fp32 accumulators computes), the output rounded to bf16; beside oneDNN's
          bf16 convolution (its output rounding), post-SiLU bf16 inputs, weights N(0, 1/(9C)), batch 2
  time    the 16 bf16 GEMMs (16, P, C) · (16, C, K), P = 2 · ⌈H/2⌉ · ⌈W/2⌉ tiles, against oneDNN's packed bf16
          convolution and the F(4×4) WinogradConv2d (transforms included), medians of `--rounds` alternated calls.
          F(2×2)'s transforms are not included: they read each pixel into 4 tile values (F(4×4): 2.25), so
          expect about twice F(4×4)'s transform time (its `input` + `output` columns in winograd_conv.py's table).
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
from fastldm.runtime.winograd_conv import WinogradConv2d

BT = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
G = torch.tensor([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], dtype=torch.float64)
AT = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64)


def bf16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16, back in t's dtype."""
    return t.to(torch.bfloat16).to(t.dtype)


def f2_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F(2×2, 3×3) of x (B, C, H, W) with w (K, C, 3, 3), H and W even: V and U rounded to bf16, fp32 GEMMs, the
    output rounded to bf16; returned in fp64."""
    B, C, H, W = x.shape
    K = w.shape[0]
    tiles = F.pad(x.double(), (1, 1, 1, 1)).unfold(2, 4, 2).unfold(3, 4, 2)  # (B, C, H/2, W/2, 4, 4)
    v = bf16((BT @ tiles @ BT.T).float())                                    # (B, C, h, w, 4, 4)
    v = v.permute(4, 5, 0, 2, 3, 1).reshape(16, -1, C)                       # (16, P, C)
    u = bf16((G @ w.double() @ G.T).float()).permute(2, 3, 1, 0).reshape(16, C, K)  # (16, C, K)
    m = torch.bmm(v, u).double().view(4, 4, B, H // 2, W // 2, K)           # (4, 4, B, h, w, K)
    y = torch.einsum("ai,ijbhwk,cj->bkhawc", AT, m, AT)                      # (B, K, h, 2, w, 2)
    return bf16(y.reshape(B, K, H, W).float()).double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    configure_process(args.threads)
    info = cpu_info()
    print(f"{platform.processor() or info.name} ({info.name}); avx512_bf16: {info.bf16}; threads {args.threads}; "
          f"torch {torch.__version__}\n")
    print("| image | in → out | spatial | oneDNN bf16 ms | F(4×4) fp32 GEMMs ms | F(2×2) bf16 GEMMs ms | oneDNN ÷ "
          "F(2×2) GEMMs | error oneDNN | error F(2×2) bf16 |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows, g = [], torch.Generator().manual_seed(0)
    for image in (256, 512):
        for cin, cout, s256, _ in SHAPES:
            S = s256 * image // 256
            x = bf16(F.silu(torch.randn(2, cin, S, S, generator=g)))
            w = bf16(torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin ** 0.5))
            err = {}
            if image == 256:  # the error does not depend on the size; fp64 references at 512² take minutes
                ref = F.conv2d(x.double(), w.double(), padding=1)
                peak = ref.abs().max()
                err = {"onednn": float((bf16(ref.float()).double() - ref).abs().max() / peak),
                       "f2_bf16": float((f2_bf16(x, w) - ref).abs().max() / peak)}
            conv = torch.nn.Conv2d(cin, cout, 3, padding=1).requires_grad_(False).to(torch.bfloat16)
            conv.weight.copy_(w)
            xb = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            packed, wino = PackedConv2d(conv), WinogradConv2d(conv)
            P = 2 * (S // 2) ** 2
            v = torch.randn(16, P, cin, generator=g).to(torch.bfloat16)
            u = torch.randn(16, cin, cout, generator=g).to(torch.bfloat16)
            with torch.inference_mode():
                direct, f4, f2 = median_ms([lambda: packed(xb), lambda: wino(xb), lambda: torch.bmm(v, u)],
                                           args.rounds)
            rows.append({"image": image, "in": cin, "out": cout, "spatial": S, "onednn_ms": direct, "f4_ms": f4,
                         "f2_gemms_ms": f2, "error": err})
            e = (f"{err['onednn']:.1e} | {err['f2_bf16']:.1e}" if err else "– | –")
            print(f"| {image}² | {cin} → {cout} | {S}² | {direct:.2f} | {f4:.2f} | {f2:.2f} | {direct / f2:.2f} | {e} |",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": info.name, "bf16": info.bf16, "threads": args.threads, "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
