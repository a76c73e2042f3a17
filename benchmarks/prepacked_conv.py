"""Convolutions with weights packed once per input shape (runtime/prepack.py) against eager `F.conv2d`, which
lets oneDNN reorder the weight at every call: each SD 1.5 UNet convolution shape alone, then whole UNet calls;
and the same for linears at few rows (`--pack conv,linear --against conv`: what packing linears adds) and for
the full-resolution convolutions as Winograd layers (`--pack conv,linear,winograd --against conv,linear`;
runtime/winograd_conv.py), and the half-resolution ones too (`--pack conv,linear,winograd,winograd2 --against
conv,linear,winograd`: in a 16-bit UNet, where their transforms fit).

    python benchmarks/prepacked_conv.py [--sizes 256,512] [--rounds 5] [--threads 2] [--pack conv,linear]
                                        [--against KINDS] [--dtype fp32|bf16] [--json out.json]

Layers: every distinct (in, out, kernel, stride, spatial) convolution of SD 1.5's UNet at each image size, batch
2 (CFG), channels_last (fastldm's CPU layout) in `--dtype` (default: the one `fastldm.load` picks here), median
of 7 calls each, with the summed time per UNet call (each shape times its count). The process is set up as the CLI's (threads, and glibc's malloc keeping large
freed blocks: without that, the per-call reorder buffer of a big weight is mmapped and page-faulted afresh at
every call, and plain convolutions cost more still). UNet: two full-size SD 1.5 UNets with the same seeded
random weights, one prepacked, called alternately (plain, packed, plain, ...) with the kernels `fastldm.load` picks on this machine
(runtime/tuning.py);
`--pack` says which kinds of layer the packed UNet packs (default: conv,linear, as `fastldm.load`), `--against`
which the UNet it is compared to packs (default: none);
per-round times, their medians, the ratio, and the outputs' max relative difference; the first call of each
(the packed one packs there) and two batch-1 calls after the rounds (a changed shape: the packed layers go back
to their plain weights once, then run as plain ones).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from fastldm import ops
from fastldm.bench.ablation import random_unet, unet_inputs
from fastldm.families import PRESETS
from fastldm.runtime.device import configure_process, cpu_info
from fastldm.runtime.optimize import layout
from fastldm.runtime.prepack import PackedConv2d, prepack
from fastldm.runtime.tuning import choose
from fastldm.runtime.winograd_conv import depth, use_winograd


def conv_shapes(unet: nn.Module, inputs: dict) -> Counter:
    """{(in, out, k, stride, padding, H, W): count} of `unet`'s Conv2d calls on `inputs`."""
    seen: Counter = Counter()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.update([(m.in_channels, m.out_channels, m.kernel_size[0],
                                                                   m.stride[0], m.padding[0], *i[0].shape[2:])]))
             for m in unet.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        unet(**inputs)
    for h in hooks:
        h.remove()
    return seen


def median_ms(fn, n: int = 7) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def layer_table(shapes: Counter, dtype: torch.dtype, batch: int = 2) -> list[dict]:
    rows = []
    for (cin, cout, k, stride, pad, h, w), count in sorted(shapes.items(), key=lambda kv: (-kv[0][5], kv[0][:2])):
        conv = nn.Conv2d(cin, cout, k, stride, pad, dtype=dtype).requires_grad_(False).to(
            memory_format=torch.channels_last)
        x = torch.randn(batch, cin, h, w).to(dtype).to(memory_format=torch.channels_last)
        packed = PackedConv2d(conv)
        with torch.no_grad():
            plain_ms = median_ms(lambda: F.conv2d(x, conv.weight, conv.bias, stride, pad))
            packed_ms = median_ms(lambda: packed(x))
        rows.append({"in": cin, "out": cout, "k": k, "stride": stride, "hw": h, "count": count,
                     "plain_ms": plain_ms, "packed_ms": packed_ms})
    return rows


def pack_unet(unet: nn.Module, kinds: frozenset[str]) -> int:
    """Pack `kinds` of layer as `fastldm.load` does (Winograd layers first: they are convolutions no longer)."""
    return ((use_winograd(unet, depth(unet) if "winograd2" in kinds else 1) if "winograd" in kinds else 0)
            + prepack(unet, kinds - {"winograd", "winograd2"}))


def unet_ab(latent: int, rounds: int, pack: frozenset[str], against: frozenset[str], dtype: torch.dtype) -> dict:
    config = PRESETS["sd1"].unet
    cpu = torch.device("cpu")
    plain = layout("unet", random_unet(config).to(dtype), cpu)
    packed = layout("unet", random_unet(config).to(dtype), cpu)
    inputs = unet_inputs(config, latent, cpu, dtype)
    shapes = conv_shapes(plain, inputs)
    pack_unet(plain, against)
    n = pack_unet(packed, pack)
    times = {"plain": [], "packed": []}
    kernels = ops.Kernels(preferred=choose(PRESETS["sd1"]).preferred())
    single = {k: v[:1] for k, v in inputs.items()}  # batch 1: what an unguided call, or a shrunk batch, sends

    def timed(unet, args) -> float:
        t0 = time.perf_counter()
        unet(**args)
        return time.perf_counter() - t0
    with torch.inference_mode(), ops.using(kernels):
        first = {"plain": timed(plain, inputs), "packed": timed(packed, inputs)}  # the packed UNet packs here
        err = ((plain(**inputs) - packed(**inputs)).abs().max() / plain(**inputs).abs().max()).item()
        for i in range(rounds):  # each first in turn
            for name, unet in (("plain", plain), ("packed", packed))[::1 if i % 2 == 0 else -1]:
                times[name].append(timed(unet, inputs))
        # a change of batch: the packed layers go back to their plain weights (a one-off), then run plain
        change = {name: [timed(unet, single), timed(unet, single)] for name, unet in (("plain", plain),
                                                                                     ("packed", packed))}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"latent": latent, "packed_layers": n, "seconds": times, "median_s": med, "first_call_s": first,
            "batch_change_s": change, "speedup": med["plain"] / med["packed"], "max_rel_diff": err,
            "pairwise": statistics.median(a / b for a, b in zip(times["plain"], times["packed"], strict=True)),
            "shapes": shapes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pack", default="conv,linear", help="kinds of layer the packed UNet packs")
    ap.add_argument("--against", default="", help="kinds of layer the UNet it is compared to packs")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), help="default: what fastldm.load picks on this CPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    pack, against = (frozenset(k for k in v.split(",") if k) for v in (args.pack, args.against))
    configure_process(args.threads)  # threads and glibc's malloc as the CLI sets them
    info = cpu_info()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: choose(PRESETS["sd1"]).torch_dtype}[args.dtype]
    print(f"{platform.processor() or info.name}; avx512_bf16: {info.bf16}; threads {args.threads}; "
          f"torch {torch.__version__}; {dtype}")
    out = {"cpu": info.name, "bf16": info.bf16, "threads": args.threads, "torch": torch.__version__,
           "dtype": str(dtype).removeprefix("torch."),
           "pack": sorted(pack), "against": sorted(against), "sizes": {}}
    for size in (int(s) for s in args.sizes.split(",")):
        r = unet_ab(size // 8, args.rounds, pack, against, dtype)
        shapes = r.pop("shapes")
        rows = layer_table(shapes, dtype) if "conv" in pack - against else []
        plain_sum = sum(x["plain_ms"] * x["count"] for x in rows)
        packed_sum = sum(x["packed_ms"] * x["count"] for x in rows)
        if rows:
            print(f"\n{size}² ({size // 8}² latent), batch 2, {dtype}: each conv shape alone (median ms)")
            print("| in → out | k / stride | spatial | calls | plain | packed | × |")
            print("|---|---|---:|---:|---:|---:|---:|")
            for x in rows:
                print(f"| {x['in']} → {x['out']} | {x['k']}×{x['k']} / {x['stride']} | {x['hw']}² | {x['count']} | "
                      f"{x['plain_ms']:.1f} | {x['packed_ms']:.1f} | {x['plain_ms'] / x['packed_ms']:.2f} |")
            print(f"| all, × calls | | | | {plain_sum:.0f} | {packed_sum:.0f} | {plain_sum / packed_sum:.2f} |")
        print(f"\n{size}²: whole UNet call, alternated, {args.rounds} rounds: 'plain' (packing "
              f"{', '.join(sorted(against)) or 'nothing'}) {r['median_s']['plain']:.3f} s, packed "
              f"({', '.join(sorted(pack))}) {r['median_s']['packed']:.3f} s → {r['speedup']:.3f}× (pairwise "
              f"median {r['pairwise']:.3f}×; {r['packed_layers']} layers packed; max rel diff "
              f"{r['max_rel_diff']:.1e})")
        f, c = r["first_call_s"], r["batch_change_s"]
        print(f"first call (the packed UNet packs): plain {f['plain']:.3f} s, packed {f['packed']:.3f} s; then batch 1 "
              f"twice (packed layers go back to plain weights): plain {c['plain'][0]:.3f}, {c['plain'][1]:.3f} s, "
              f"packed {c['packed'][0]:.3f}, {c['packed'][1]:.3f} s")
        out["sizes"][size] = r | {"layers": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
