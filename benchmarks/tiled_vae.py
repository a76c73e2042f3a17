"""Tiled VAE decode (src/fastldm/runtime/tiled_vae.py) against the untiled decode of the same latents, on the
full-size SD 1.x VAE with seeded random weights (fastldm.testing.random_module), fp32, channels_last
as `fastldm.load` runs it on a CPU. Images are compared as the pipeline makes them: x/2 + 0.5 clamped to [0, 1].

    python benchmarks/tiled_vae.py match --size 1024 [--config exact:64 estimate:64:300e6] [--json out.json]
        untiled, then each tiled config (stats:tile[:budget]): seconds, traced peak (MemoryTrace), PSNR, max|Δ|,
        and the seam check: mean |horizontal/vertical step| across tile borders / everywhere else, in the
        tiled image and, at the same places, in the untiled one (a seam shows as a larger border ratio).
    python benchmarks/tiled_vae.py rss --size 4096 --config estimate:32:2e9
        one decode in this fresh process: peak RSS (VmHWM) above the RSS with the VAE loaded, beside the weights.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from fastldm.testing import random_module
from fastldm.bench.memory import MB, status
from fastldm.families import PRESETS
from fastldm.models import AutoencoderKL
from fastldm.runtime.memory_trace import MemoryTrace
from fastldm.runtime.tiled_vae import _cores, decode_peak_bytes, tiled_decode, tiled_decode_peak_bytes


def build(size: int, seed: int = 0) -> tuple[AutoencoderKL, torch.Tensor]:
    vae = random_module("vae", PRESETS["sd1"].vae, seed=seed).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(seed)
    z = vae.from_unet_latents(torch.randn(1, 4, size // 8, size // 8, generator=g))  # unit-variance UNet latents
    return vae, z


def parse(config: str) -> tuple[str, int, int | None]:
    """"stats:tile[:budget]" -> (stats, tile, budget); "untiled" -> ("untiled", 0, None)."""
    parts = config.split(":") + ["0"]
    return parts[0], int(parts[1]), int(float(parts[2])) if len(parts) > 3 else None


def image(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 2 + 0.5).clamp(0, 1)


def seam_ratios(img: torch.Tensor, cuts_y: list[int], cuts_x: list[int]) -> tuple[float, float]:
    """Mean |step| between the two pixels either side of each tile border over the mean |step| elsewhere, for
    vertical borders (horizontal steps) and horizontal borders (vertical steps); img (B, C, H, W)."""
    out = []
    for steps, cuts in (((img[..., :, 1:] - img[..., :, :-1]).abs(), cuts_x),
                        ((img[..., 1:, :] - img[..., :-1, :]).abs().transpose(-1, -2), cuts_y)):
        border = torch.zeros(steps.shape[-1], dtype=torch.bool)
        border[[c - 1 for c in cuts]] = True  # the step from pixel c-1 to c
        out.append((steps[..., border].mean() / steps[..., ~border].mean()).item())
    return out[0], out[1]


def match(size: int, configs: list[str]) -> dict:
    vae, z = build(size)
    with torch.no_grad(), MemoryTrace() as trace:
        t0 = time.perf_counter()
        ref = image(vae.decode(z))
        secs = time.perf_counter() - t0
    rows = [{"config": "untiled", "seconds": round(secs, 1), "traced_peak_mb": trace.report().peak_bytes / MB,
             "estimate_mb": decode_peak_bytes(vae.config, size // 8, size // 8, channels_last=True) / MB}]
    print(rows[-1], flush=True)
    for config in configs:
        stats, tile, budget = parse(config)
        with MemoryTrace() as trace:
            t0 = time.perf_counter()
            out = image(tiled_decode(vae, z, tile, budget, stats))
            secs = time.perf_counter() - t0
        cores = _cores(size // 8, size // 8, tile)
        cuts = sorted({8 * c[1] for c in cores if c[1] < size // 8})
        mse = (out - ref).square().mean().item()
        diff = (out - ref).abs()
        near = torch.zeros(size, dtype=torch.bool)
        for c in cuts:
            near[max(c - 8, 0):c + 8] = True
        border = near[:, None] | near[None, :]  # within 8 px of a tile border
        rows.append({"config": config, "seconds": round(secs, 1), "traced_peak_mb": trace.report().peak_bytes / MB,
                     "estimate_mb": tiled_decode_peak_bytes(vae.config, size // 8, size // 8, tile, budget,
                                                            channels_last=True) / MB,
                     "psnr_db": 10 * math.log10(1 / mse) if mse else math.inf,
                     "max_abs_diff_255": diff.max().item() * 255,
                     "max_abs_diff_near_borders_255": diff[..., border].max().item() * 255,
                     "max_abs_diff_elsewhere_255": diff[..., ~border].max().item() * 255,
                     "seam_ratio_tiled": seam_ratios(out, cuts, cuts), "seam_ratio_untiled": seam_ratios(ref, cuts, cuts)})
        print(rows[-1], flush=True)
    return {"size": size, "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}


def rss(size: int, config: str) -> dict:
    base = status()
    vae, z = build(size)
    weights = sum(p.nbytes for p in vae.parameters())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (the VAE built)
    loaded = status()
    stats, tile, budget = parse(config)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = vae.decode(z) if stats == "untiled" else tiled_decode(vae, z, tile, budget, stats)
    secs = time.perf_counter() - t0
    peak = status()["VmHWM"]
    return {"size": size, "config": config, "seconds": round(secs, 1), "weights_mb": weights / MB,
            "output_mb": out.nbytes / MB, "peak_rss_mb": (peak - base["VmRSS"]) / MB,
            "peak_above_loaded_mb": (peak - loaded["VmRSS"]) / MB, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["match", "rss"])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--config", nargs="+", default=["exact:64"], help="stats:tile[:budget], or untiled (rss)")
    ap.add_argument("--json")
    args = ap.parse_args()
    result = match(args.size, args.config) if args.mode == "match" else rss(args.size, args.config[0])
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
