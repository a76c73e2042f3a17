"""int8 attention in an int8 UNet: how much faster, how far from the float output. One SD 1.5 UNet (random
full-size weights) loaded with `quant="int8"`, called alternately with its self-attention in bf16 (blocked
attention, what the float path runs) and with int8 GEMMs (ops/int8_attention_cpu.py, the `int8_cpu` backend
preferred by the UNet's attention layers); the bf16 UNet's output of the same inputs is the reference.

    python benchmarks/int8_attention.py [--models /work/models] [--sizes 256,512] [--rounds 5] [--json out.json]

Per size: the median time of a guided UNet call (batch 2) each way and their ratio, and the UNet output's PSNR
against the bf16 UNet's (peak = the bf16 output's range, as benchmarks/cpu_peers.py's int8 check), each way.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import fastldm
from fastldm.models.layers import Attention
from fastldm.runtime.device import configure_process, cpu_info
from fastldm.testing import psnr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("/work/models"))
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    configure_process(args.threads)
    folder = args.models / "sd15-fp16"
    if not folder.exists():
        raise SystemExit(f"{folder} is missing: make it with benchmarks/peer_models.py (see docs/benchmarks.md)")
    info = cpu_info()
    print(f"{platform.processor() or info.name} ({info.name}); avx512_bf16: {info.bf16}; threads {args.threads}; "
          f"torch {torch.__version__}; SD 1.5 random weights")
    ref = fastldm.load(folder)                      # the machine's measured defaults, as `fastldm generate`
    int8 = fastldm.load(folder, quant="int8")
    layers = [m for m in int8.unet.modules() if isinstance(m, Attention)]
    out = {"cpu": info.name, "bf16": info.bf16, "threads": args.threads, "torch": torch.__version__, "sizes": {}}
    g = torch.Generator().manual_seed(0)
    for size in map(int, args.sizes.split(",")):
        x = torch.randn(2, 4, size // 8, size // 8, generator=g).bfloat16()
        x = x.contiguous(memory_format=torch.channels_last)
        t = torch.tensor([500, 500])
        ctx = torch.randn(2, 77, 768, generator=g).bfloat16()
        results, times = {}, {"bf16 attention": [], "int8 attention": []}
        with torch.inference_mode():
            with ref.kernels_active():
                want = ref.unet(x, t, encoder_hidden_states=ctx).float()
            for r in range(args.rounds + 1):               # round 0 warms up both
                for name, backend in (("bf16 attention", None), ("int8 attention", "int8_cpu")):
                    for m in layers:
                        m.backend = backend
                    with int8.kernels_active():
                        start = time.perf_counter()
                        y = int8.unet(x, t, encoder_hidden_states=ctx)
                        if r:
                            times[name].append(time.perf_counter() - start)
                    results[name] = y.float()
        lo, hi = float(want.min()), float(want.max())
        row = {}
        for name in times:
            row[name] = {"s": statistics.median(times[name]), "all_s": times[name],
                         "psnr_db": psnr((results[name] - lo) / (hi - lo), (want - lo) / (hi - lo))}
        row["speedup"] = row["bf16 attention"]["s"] / row["int8 attention"]["s"]
        out["sizes"][size] = row
        print(f"{size}²: int8 UNet, bf16 attention {row['bf16 attention']['s']:.3f} s "
              f"({row['bf16 attention']['psnr_db']:.1f} dB vs the bf16 UNet), int8 attention "
              f"{row['int8 attention']['s']:.3f} s ({row['int8 attention']['psnr_db']:.1f} dB): "
              f"{row['speedup']:.2f}×", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
