"""One guided UNet call, or one VAE decode, traced by MemoryTrace: traced peak vs the live-set lower bound of its
op order (issue 15).

    python benchmarks/trace_memory.py [unet | decode] [--family sd1] [--latent 64] [--device cpu] [--top 10]

unet: the family's full-size UNet with seeded random weights, fp32, batch 2 (CFG), a 77-token context.
decode: its full-size VAE, fp32, channels_last (as `fastldm.load` runs it on a CPU), one latent.
The kernels are those the registry picks on this machine (on the meta device attention falls back to a
score-materialising path, so trace on the CPU). Prints the summary, the largest storages alive at the peak and
the bound's live set.
"""
from __future__ import annotations

import argparse
import functools

import torch

from fastldm.bench.ablation import random_unet, unet_inputs
from fastldm.families import PRESETS
from fastldm.runtime.memory_trace import MemoryTrace, MiB
from fastldm.testing import random_module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="unet", choices=["unet", "decode"])
    ap.add_argument("--family", default="sd1", choices=sorted(PRESETS))
    ap.add_argument("--latent", type=int, default=64, help="latent side (64: a 512² image)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    config = PRESETS[args.family]
    if args.what == "unet":
        model = random_unet(config.unet, device=args.device).eval()
        inputs = unet_inputs(config.unet, args.latent, args.device, torch.float32)
        call = functools.partial(model, **inputs)
    else:
        model = random_module("vae", config.vae, device=args.device).to(memory_format=torch.channels_last).eval()
        z = torch.randn(1, config.vae.latent_channels, args.latent, args.latent, device=args.device)
        call = functools.partial(model.decode, z)
    with torch.no_grad(), MemoryTrace(model) as trace:
        call()
    r = trace.report()
    print(r.summary())
    print(r.table(args.top))
    print("\nthe bound's live set:")
    for s in r.at_bound[:args.top]:
        print(f"  {s.nbytes / MiB:7.1f} MiB  {s.op} {list(s.shape)} {s.module} (ops {s.born}-{s.last_use})")


if __name__ == "__main__":
    main()
