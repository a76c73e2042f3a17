"""Winograd F(4×4, 3×3) with C++ transforms (ops/winograd_cpu.py) against oneDNN's packed direct convolution, per
SD 1.5 3×3 convolution shape, with where Winograd's time goes (input transform, the 36 GEMMs, output transform).

    python benchmarks/winograd_conv.py [--threads 2] [--rounds 9] [--dtype fp32|bf16] [--json out.json]

Shapes: the stride-1 3×3 convolutions of SD 1.5's UNet at a 256² and a 512² image, batch 2 (CFG), channels_last
in `--dtype` (bf16: images and oneDNN's weights in bf16, Winograd's GEMMs in fp32 as runtime/winograd_conv.py
runs a bf16 model), each weight packed for oneDNN for its input shape as `fastldm.load` packs it (runtime/prepack.py);
the full-resolution ones (the layers runtime/winograd_conv.py swaps) are marked. Medians of `--rounds` calls after
two warm-up calls, the two kernels alternated; the process set up as the CLI's (threads, malloc). Beside the
times, Winograd's max error against an fp64 convolution relative to max|y|, and oneDNN's.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from fastldm.ops import winograd, winograd_cpu
from fastldm.runtime.device import configure_process, cpu_info

# (in, out, spatial at 256², full resolution?) for SD 1.5's stride-1 3×3 convolutions; 512² doubles the spatial.
SHAPES = [(320, 320, 32, True), (640, 320, 32, True), (960, 320, 32, True), (640, 640, 32, True),
          (640, 640, 16, False), (1280, 640, 16, False), (1920, 640, 16, False), (1280, 1280, 16, False),
          (1280, 1280, 8, False), (2560, 1280, 8, False), (1280, 1280, 4, False)]


def median_ms(fns: list, rounds: int) -> list[float]:
    """Median ms of each of `fns`, called in turn `rounds` times after two warm-up calls each."""
    for fn in fns:
        fn(), fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            t.append(1e3 * (time.perf_counter() - t0))
    return [sorted(t)[len(t) // 2] for t in times]


def measure(C: int, K: int, S: int, rounds: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(C + K + S)
    x = torch.randn(2, C, S, S, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(K, C, 3, 3, generator=g) / (3 * C ** 0.5)).to(dtype).contiguous(memory_format=torch.channels_last)
    b = (0.1 * torch.randn(K, generator=g)).to(dtype)
    with torch.inference_mode():
        packed = torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1, list(x.shape))
        onednn = lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, b, [1, 1], [1, 1], [1, 1], 1, "none",
                                                                 [], "")
        u = winograd.transform_weight(w, torch.float32).transpose(1, 2).contiguous()  # (36, C, K), as held
        v = torch.ops.fastldm.winograd_input(x)
        m = torch.bmm(v, u)
        parts = [lambda: winograd_cpu.conv(x, u, b), onednn, lambda: torch.ops.fastldm.winograd_input(x),
                 lambda: torch.bmm(v, u), lambda: torch.ops.fastldm.winograd_output(m, b, 2, S, S, dtype)]
        wino, direct, t_in, t_mm, t_out = median_ms(parts, rounds)
        ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
        scale = ref.abs().max().item()
        err = (winograd_cpu.conv(x, u, b).double() - ref).abs().max().item() / scale
        err_direct = (onednn().double() - ref).abs().max().item() / scale
    return {"in": C, "out": K, "spatial": S, "onednn_ms": direct, "winograd_ms": wino, "input_ms": t_in,
            "gemm_ms": t_mm, "output_ms": t_out, "speedup": direct / wino, "rel_err": err, "rel_err_onednn": err_direct}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    why = winograd_cpu.unavailable()
    if why is not None:
        raise SystemExit(f"the Winograd transforms cannot run here: {why}")
    configure_process(args.threads)
    info = cpu_info()
    print(f"{platform.processor() or info.name} ({info.name}); avx512_bf16: {info.bf16}; threads {args.threads}; "
          f"torch {torch.__version__}; {dtype}\n")
    print("| image | in → out | spatial | full res | oneDNN ms | Winograd ms | × | input | GEMMs | output | "
          "rel err (oneDNN) |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    for image in (256, 512):
        for C, K, S, full in SHAPES:
            r = measure(C, K, S * image // 256, args.rounds, dtype) | {"image": image, "full_resolution": full}
            rows.append(r)
            print(f"| {image}² | {C} → {K} | {r['spatial']}² | {'yes' if full else ''} | {r['onednn_ms']:.2f} | "
                  f"{r['winograd_ms']:.2f} | {r['speedup']:.2f} | {r['input_ms']:.2f} | {r['gemm_ms']:.2f} | "
                  f"{r['output_ms']:.2f} | {r['rel_err']:.1e} ({r['rel_err_onednn']:.1e}) |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": info.name, "bf16": info.bf16, "threads": args.threads, "torch": torch.__version__,
                       "dtype": args.dtype, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
