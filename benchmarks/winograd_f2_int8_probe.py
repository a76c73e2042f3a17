"""Would an int8 UNet gain from Winograd F(2×2, 3×3) with int8 GEMMs? Per SD 1.5 3×3 convolution shape, oneDNN's int8
convolution (runtime/quant.py's Int8Conv2d, what `--quant int8` runs) against a prototype of F(2×2) whose 16 GEMMs
are oneDNN's u8·s8 int8 matmuls: time and error against fp64.

    python benchmarks/winograd_f2_int8_probe.py [--threads 2] [--rounds 5] [--json out.json]

The prototype (not in the package): F(2×2)'s bf16 input transform (ops/winograd_f2_cpu.py), the tiles V quantized
to uint8 with one dynamic scale for all 16 planes (runtime/quant.py's fused quantizer, as every int8 layer's
input), the transformed weights U = G g Gᵀ quantized per plane and output channel to int8 and prepacked, one
`onednn.qlinear_pointwise` per plane writing bf16 products, stacked, and F(2×2)'s output transform. Batch 2,
bf16 channels_last in and out, medians of `--rounds` alternated calls; errors at 256² (post-SiLU inputs, weights
N(0, 1/(9C))), relative to max|y|.
"""
from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F
from winograd_conv import SHAPES, median_ms

from fastldm.ops import winograd_f2_cpu
from fastldm.runtime.device import configure_process, cpu_info
from fastldm.runtime.quant import Int8Conv2d, _weight_int8, fused_quantizer


class Int8F2:
    """A bf16 3×3 convolution as F(2×2) with int8 GEMMs (the prototype of the module docstring)."""

    def __init__(self, conv: torch.nn.Conv2d, quantize):
        u = winograd_f2_cpu.transform_weight(conv.weight).float()  # (16, C, K)
        self.quantize, self.bias = quantize, conv.bias
        self.planes = [(torch.ops.onednn.qlinear_prepack(q, None), s)
                       for q, s in (_weight_int8(u[k].t().contiguous()) for k in range(16))]  # (K, C) int8 each
        self.zero = torch.zeros(conv.out_channels, dtype=torch.int64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        v = torch.ops.fastldm.winograd_f2_input(x.contiguous(memory_format=torch.channels_last))  # (16, P, C)
        P = v.shape[1]
        qv, scale, zp = self.quantize(v.view(16 * P, C))
        m = torch.stack([torch.ops.onednn.qlinear_pointwise.tensor(
            qv[k * P:(k + 1) * P], scale, zp, packed, s, self.zero, None, 1.0, 0, torch.bfloat16, "none", [], "")
            for k, (packed, s) in enumerate(self.planes)])  # (16, P, K) bf16
        return torch.ops.fastldm.winograd_f2_output(m, self.bias, B, H, W)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    configure_process(args.threads)
    why = winograd_f2_cpu.unavailable()
    if why is not None:
        raise SystemExit(why)
    quantize = fused_quantizer()
    info = cpu_info()
    print(f"{platform.processor() or info.name} ({info.name}); avx512_bf16: {info.bf16}; threads {args.threads}; "
          f"torch {torch.__version__}\n")
    print("| image | in → out | spatial | int8 conv ms | int8 F(2×2) ms | ratio | error int8 conv | error int8 F(2×2) |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    rows, g = [], torch.Generator().manual_seed(0)
    for image in (256, 512):
        for cin, cout, s256, _ in SHAPES:
            S = s256 * image // 256
            x = F.silu(torch.randn(2, cin, S, S, generator=g)).bfloat16().contiguous(memory_format=torch.channels_last)
            conv = torch.nn.Conv2d(cin, cout, 3, padding=1).requires_grad_(False).bfloat16()
            conv.weight.copy_(torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin ** 0.5))
            direct, wino = Int8Conv2d(conv, quantize, torch.bfloat16), Int8F2(conv, quantize)
            with torch.inference_mode():
                err = {}
                if image == 256:
                    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
                    err = {name: float((f(x).double() - ref).abs().max() / ref.abs().max())
                           for name, f in (("int8", direct), ("int8_f2", wino))}
                a, b = median_ms([lambda: direct(x), lambda: wino(x)], args.rounds)
            rows.append({"image": image, "in": cin, "out": cout, "spatial": S, "int8_ms": a, "int8_f2_ms": b,
                         "error": err})
            e = f"{err['int8']:.1e} | {err['int8_f2']:.1e}" if err else "– | –"
            print(f"| {image}² | {cin} → {cout} | {S}² | {a:.2f} | {b:.2f} | {a / b:.2f} | {e} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": info.name, "bf16": info.bf16, "threads": args.threads, "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
