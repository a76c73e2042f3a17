"""Whole pipelines on a CUDA GPU, side by side in one process: fastldm (eager, and with CUDA graphs) and
diffusers, on the same random full-size weights.

    python benchmarks/gpu_pipeline.py [--family sd1] [--size 512] [--rounds 3] [--json out.json]

(`--device cpu --family tiny:sd1 --size 64` is a smoke test of the script itself on a machine without a GPU.)

Every engine makes the same request: PROMPT, SEED, Euler, guidance 7.5 (classifier-free: UNet batch 2), SIZE²,
fp16. Per step = (t(LONG) − t(SHORT)) / (LONG − SHORT) through whole generate calls (text encoding, sampling, VAE
decode; the PIL/NumPy image at the end is the synchronisation), engines alternated round by round, medians;
the fixed cost (text encoder, VAE, first-step work) is t(SHORT) − SHORT · per step. Also per engine: load time,
the first image's time (kernel compilation, graph capture), parameter bytes on the GPU and the peak bytes a
generate call allocates above what was live before it (`max_memory_allocated`). The weights are written once
as a diffusers folder (fastldm.testing.save_random_folder) that both engines load, as users load a checkpoint.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPT, SEED, GUIDANCE = "a photo of a cat", 1, 7.5


class FastLDM:
    def __init__(self, folder: Path, device: torch.device, graphs: bool):
        import fastldm

        self.pipe = fastldm.load(folder, device=device, dtype="fp16" if device.type == "cuda" else "fp32",
                                 cuda_graphs=graphs)

    def generate(self, size: int, steps: int) -> None:
        self.pipe.generate(PROMPT, steps=steps, sampler="Euler", seed=SEED, width=size, height=size,
                           guidance=GUIDANCE)


class Diffusers:
    def __init__(self, folder: Path, device: torch.device, graphs: bool):
        import diffusers

        cls = diffusers.StableDiffusionXLPipeline if (folder / "text_encoder_2").is_dir() else \
            diffusers.StableDiffusionPipeline
        extra = {} if cls is diffusers.StableDiffusionXLPipeline else {"safety_checker": None,
                                                                        "requires_safety_checker": False}
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe = cls.from_pretrained(folder, dtype=dtype, **extra).to(device)
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe

    def generate(self, size: int, steps: int) -> None:
        self.pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, width=size, height=size,
                  generator=torch.Generator(self.pipe.device).manual_seed(SEED), output_type="np")


ENGINES = {"fastldm": (FastLDM, False), "fastldm + CUDA graphs": (FastLDM, True), "diffusers": (Diffusers, False)}


def timed(fn, *args) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sd1", help="a row of fastldm.families (full size), or tiny:<row>")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--folder", type=Path, help="an existing diffusers folder instead of random weights")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--short", type=int, default=5)
    ap.add_argument("--long", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine", action="append", choices=sorted(ENGINES), help="default: all")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here")
    from fastldm.testing import save_random_folder

    cuda = device.type == "cuda"
    out = {"machine": {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
                       "cuda": torch.version.cuda},
           "request": {"family": a.family, "size": a.size, "sampler": "Euler", "guidance": GUIDANCE,
                       "dtype": "fp16" if cuda else "fp32", "steps": [a.short, a.long], "rounds": a.rounds},
           "engines": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.folder
        if folder is None:
            t0 = time.perf_counter()
            folder = save_random_folder(a.family, Path(tmp) / "model", dtype=torch.float16)
            out["request"]["weights_written_s"] = round(time.perf_counter() - t0, 1)
        engines = {}
        for name in a.engine or list(ENGINES):
            cls, graphs = ENGINES[name]
            before = allocated(device)
            t0 = time.perf_counter()
            engine = cls(folder, device, graphs)
            if cuda:
                torch.cuda.synchronize(device)
            rec = {"load_s": round(time.perf_counter() - t0, 2),
                   "weights_mb": round((allocated(device) - before) / 2**20, 1)}
            rec["first_image_s"] = round(timed(engine.generate, a.size, a.short), 3)
            base = allocated(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            engine.generate(a.size, a.short)
            rec["peak_above_mb"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1) if cuda else 0
            engines[name], out["engines"][name] = engine, rec | {"short_s": [], "long_s": []}
            print(name, rec, flush=True)
        for r in range(a.rounds):
            for name, engine in engines.items():
                rec = out["engines"][name]
                rec["short_s"].append(round(timed(engine.generate, a.size, a.short), 4))
                rec["long_s"].append(round(timed(engine.generate, a.size, a.long), 4))
    first = next(iter(out["engines"]))
    print(f"\n{out['machine']['device']}, torch {out['machine']['torch']}: {a.family} {a.size}², Euler, CFG 7.5, "
          f"{out['request']['dtype']}; "
          f"per step = (t({a.long}) − t({a.short})) / {a.long - a.short}, median of {a.rounds}")
    print("| engine | per step (ms) | ÷ fastldm | fixed (ms) | first image (s) | load (s) | weights MB | "
          "peak above MB |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rec in out["engines"].items():
        short, long = statistics.median(rec["short_s"]), statistics.median(rec["long_s"])
        rec["per_step_ms"] = round((long - short) / (a.long - a.short) * 1e3, 2)
        rec["fixed_ms"] = round((short - a.short * rec["per_step_ms"] / 1e3) * 1e3, 1)
    for name, rec in out["engines"].items():
        ratio = rec["per_step_ms"] / out["engines"][first]["per_step_ms"]
        print(f"| {name} | {rec['per_step_ms']:.2f} | {ratio:.2f} | {rec['fixed_ms']:.1f} | {rec['first_image_s']:.2f} | "
              f"{rec['load_s']:.1f} | {rec['weights_mb']:.0f} | {rec['peak_above_mb']:.0f} |")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
