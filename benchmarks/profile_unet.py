"""Where one SD 1.5 UNet call's time goes on this CPU: torch.profiler over a call, grouped by op.

    python benchmarks/profile_unet.py [--latent 64] [--threads 2] [--calls 2] [--rows 20] [--quant int8]
                                      [--json out.json]

The UNet as `fastldm.load` runs it here: random full-size SD 1.5 weights in the dtype the machine's tuning
chose (runtime/tuning.py), optimised the same way (channels_last, packed weights, Winograd where measured
faster) under the tuned kernel preferences, batch 2 (CFG), a 77-token context; with `--quant int8` as
`fastldm.load(quant="int8")` runs it (int8 convolutions and linears, int8 Winograd and int8 attention where the
tuning measured them faster, the rest in the tuned dtype). One warm-up call (packs
weights per shape), then `--calls` profiled calls; the table gives each op's self CPU time per call, its
share of the call, and the commonest input shapes of the heaviest ops. Self time: an op's time minus that of
the ops it calls, so the rows add up to the call.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter, defaultdict

import torch

from fastldm import ops
from fastldm.bench.ablation import random_unet, unet_inputs
from fastldm.families import PRESETS
from fastldm.runtime.device import configure_process, cpu_info
from fastldm.runtime.optimize import optimize
from fastldm.runtime.tuning import choose


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--quant", default=None, choices=["int8"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    configure_process(args.threads)
    config = PRESETS["sd1"]
    choice = choose(config)
    dtype = choice.torch_dtype
    int8 = args.quant == "int8"
    unet = optimize({"unet": random_unet(config.unet, dtype=dtype)}, torch.device("cpu"),
                    pack=choice.packed_kinds, quant=args.quant, dtype=dtype,
                    int8_winograd=int8 and choice.int8_winograd == "faster",
                    int8_attention=int8 and choice.int8_attention == "faster")["unet"]
    inputs = {k: v.to(dtype) if v.is_floating_point() else v
              for k, v in unet_inputs(config.unet, args.latent, "cpu", dtype).items()}
    info = cpu_info()
    print(f"{platform.processor() or info.name} ({info.name}); avx512_bf16: {info.bf16}; threads {args.threads}; "
          f"torch {torch.__version__}\nchoice: {choice}" + (f"; quant {args.quant}" if args.quant else "") + "\n")
    with torch.inference_mode(), ops.registry.prefer(choice.preferred()):
        unet(**inputs)
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.calls):
                unet(**inputs)
        wall = (time.perf_counter() - t0) / args.calls
    self_us, calls, shapes = defaultdict(float), Counter(), defaultdict(Counter)
    for e in prof.events():
        self_us[e.name] += e.self_cpu_time_total
        calls[e.name] += 1
        shapes[e.name][str(e.input_shapes)] += e.self_cpu_time_total
    total = sum(self_us.values())
    print(f"{args.latent}² latent ({args.latent * 8}² image), {dtype}: {wall:.3f} s a call under the profiler "
          f"({total / 1e6 / args.calls:.3f} s of op self time)\n")
    print("| op | ms a call | share | calls a call | heaviest input shapes (ms a call) |\n|---|---:|---:|---:|---|")
    rows = []
    for name, us in sorted(self_us.items(), key=lambda kv: -kv[1])[:args.rows]:
        top = shapes[name].most_common(2)
        heavy = "; ".join(f"{s} ({t / 1e3 / args.calls:.0f})" for s, t in top)
        rows.append({"op": name, "ms": us / 1e3 / args.calls, "share": us / total, "calls": calls[name] / args.calls,
                     "shapes": [[s, t / 1e3 / args.calls] for s, t in top]})
        print(f"| {name} | {us / 1e3 / args.calls:.1f} | {100 * us / total:.1f} % | {calls[name] / args.calls:.0f} | "
              f"{heavy} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": info.name, "bf16": info.bf16, "threads": args.threads, "torch": torch.__version__,
                       "latent": args.latent, "dtype": str(dtype), "quant": args.quant, "choice": choice.__dict__,
                       "wall_s": wall,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
