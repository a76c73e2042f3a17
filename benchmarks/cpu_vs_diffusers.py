"""CPU fast path vs diffusers, side by side on the same random SD 1.5 weights (issue 6).

    python benchmarks/cpu_vs_diffusers.py [--sizes 512,256] [--repeats 5] [--threads N] [--json out.json]

Every engine runs in its own long-lived worker process (so one engine's process settings, compile
caches and allocator state cannot help or hurt another), all loading the same full-size SD 1.5
random-weight fp16 folder (benchmarks/load_sd15.py `make_folder`). The driver alternates them call by
call (A, B, C, A, B, C, ...). Engines:
  fastldm         fastldm.load(folder): its CPU defaults (bf16, channels_last, blocked attention)
  fastldm-int8    the same with quant="int8"
  diffusers-fp32  StableDiffusionPipeline.from_pretrained(folder): diffusers' default (fp32)
  diffusers-best  bf16, channels_last UNet and VAE, torch.compile(unet) with inductor freezing
Measured:
  per step     one classifier-free-guidance UNet call (batch 2, 77-token context) at each size; the
               first call (warm-up, and the compile for diffusers-best) is reported apart; median of
               --repeats. The sampler update is a few element-wise ops on the latent and is left out.
  end to end   one 20-step DPM++ 2M image (text encoders, sampler, VAE decode), same prompt and seed, after
               an untimed 2-step image (which pays diffusers-best's recompile for the pipeline's call);
               Random weights decode to a near-constant grey image and their ε barely moves the latents,
               so the int8 check at full size is one UNet call's output, int8 vs bf16 (PSNR, peak = the
               bf16 output's range); the image check is the embedded model's, below.
  embedded     the embedded ShapesWorld model, default vs int8: image PSNR and the evaluator's scores.
  cold start   a fresh process: imports, load, (compile,) and the first 20-step 512² image.
  ceilings     a 4096³ bf16 matmul and a bf16 3×3 conv (2×320×64×64) in TFLOP/s; floor = 1.61 TFLOP
               (one SD 1.5 CFG step at 512²) / ceiling.
  profile      torch.profiler's top ops of one fastldm and one diffusers-best step at the first size.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STEP_TFLOP_512 = 1.61  # one SD 1.5 CFG step at 512² (shared/reference/unet_flops.py)
PROMPT, SEED = "a photograph of an astronaut riding a horse", 0
ENGINES = ("fastldm", "fastldm-int8", "diffusers-fp32", "diffusers-best")


# ---- worker: one engine in its own process, driven by JSON lines on stdin --------------------------------

class Engine:
    def __init__(self, name: str, folder: str):
        import torch

        self.name, self.torch = name, torch
        t0 = time.perf_counter()
        if name.startswith("fastldm"):
            import fastldm

            self.pipe = fastldm.load(folder, quant="int8" if name.endswith("int8") else None)
            self.unet, self.dtype = self.pipe.unet, self.pipe.dtype
        else:
            from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

            self.dtype = torch.bfloat16 if name == "diffusers-best" else torch.float32
            pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=self.dtype, safety_checker=None,
                                                           requires_safety_checker=False)
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            if name == "diffusers-best":
                pipe.unet.to(memory_format=torch.channels_last)
                pipe.vae.to(memory_format=torch.channels_last)
                # static shapes: each resolution gets its own specialised graph (compiled at its warm-up)
                pipe.unet = torch.compile(pipe.unet, dynamic=False, options={"freezing": True})
            self.pipe, self.unet = pipe, pipe.unet
        self.load_s = time.perf_counter() - t0

    def unet_call(self, size: int):
        torch = self.torch
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(self.dtype)
        ctx = torch.randn(2, 77, 768, generator=g).to(self.dtype)
        t = torch.tensor([500.0, 500.0])
        if self.name.startswith("fastldm"):
            return lambda: self.unet(x, t, ctx)
        return lambda: self.unet(x, t, encoder_hidden_states=ctx)

    def step(self, size: int) -> float:
        call = self.unet_call(size)
        with self.torch.no_grad():
            t0 = time.perf_counter()
            call()
            return time.perf_counter() - t0

    def generate(self, size: int, steps: int, out: str | None) -> float:
        t0 = time.perf_counter()
        if self.name.startswith("fastldm"):
            raw = self.pipe.generate(PROMPT, steps=steps, seed=SEED, width=size, height=size, guidance=7.5).raw
        else:
            g = self.torch.Generator().manual_seed(SEED)
            raw = self.pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, width=size, height=size,
                            generator=g, output_type="np").images
        dt = time.perf_counter() - t0
        if out:
            np.save(out, raw.astype(np.float32))
        return dt

    def step_output(self, size: int, out: str) -> None:
        """Save one UNet call's output (the model's ε for the batch-2 CFG input) as .npy."""
        call = self.unet_call(size)
        with self.torch.no_grad():
            np.save(out, call().float().numpy())

    def profile(self, size: int, rows: int = 15) -> str:
        from torch.profiler import ProfilerActivity, profile

        call = self.unet_call(size)
        with self.torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50)


def worker(name: str, folder: str, threads: int | None, cold: bool, t_start: float) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
    engine = Engine(name, folder)
    if cold:  # one image from a fresh process, then exit
        engine.generate(512, 20, None)
        print(json.dumps({"cold_s": time.time() - t_start, "load_s": engine.load_s}), flush=True)
        return
    print(json.dumps({"load_s": engine.load_s}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "step":
            res = {"s": engine.step(cmd["size"])}
        elif cmd["op"] == "generate":
            res = {"s": engine.generate(cmd["size"], cmd["steps"], cmd.get("out"))}
        elif cmd["op"] == "step_output":
            engine.step_output(cmd["size"], cmd["out"])
            res = {}
        elif cmd["op"] == "profile":
            res = {"table": engine.profile(cmd["size"])}
        else:
            return
        print(json.dumps(res), flush=True)


# ---- driver --------------------------------------------------------------------------------------------

class Worker:
    def __init__(self, name: str, folder: Path, threads: int | None):
        args = [sys.executable, __file__, "--worker", name, "--folder", str(folder)]
        args += ["--threads", str(threads)] if threads else []
        self.name = name
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.load_s = self._read()["load_s"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait()


def ceilings() -> dict:
    """Large bf16 matmul and 3×3 conv throughput in TFLOP/s (best of 3, after a warm-up)."""
    import torch
    import torch.nn.functional as F

    def best(fn, flop):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return flop / min(times) / 1e12

    a, b = torch.randn(4096, 4096).bfloat16(), torch.randn(4096, 4096).bfloat16()
    x = torch.randn(2, 320, 64, 64).bfloat16().to(memory_format=torch.channels_last)
    w = torch.randn(320, 320, 3, 3).bfloat16().to(memory_format=torch.channels_last)
    with torch.no_grad():
        return {"matmul_bf16_tflops": best(lambda: a @ b, 2 * 4096 ** 3),
                "conv3x3_bf16_tflops": best(lambda: F.conv2d(x, w, padding=1), 2 * 2 * 320 * 320 * 9 * 64 * 64)}


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak ** 2 / mse)


def embedded_int8(n: int, threads: int | None) -> dict:
    """The embedded (trained) model on n held-out ShapesWorld captions: its default dtype vs quant="int8",
    image PSNR per caption (same seed) and the ShapesWorld evaluator's accuracies for both."""
    import torch

    import fastldm
    from fastldm.api import EMBEDDED_MODEL
    from fastldm.tools.shapes.captions import random_caption
    from fastldm.tools.shapes.evaluate import evaluate, score

    if threads:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(1234)
    captions = [random_caption(rng, split="heldout") for _ in range(n)]
    pipes = {"default": fastldm.load(EMBEDDED_MODEL), "int8": fastldm.load(EMBEDDED_MODEL, quant="int8")}
    results, raws = {k: [] for k in pipes}, {k: [] for k in pipes}
    for i, c in enumerate(captions):
        for k, pipe in pipes.items():
            r = pipe.generate(c, seed=i)
            raws[k].append(r.raw)
            results[k].append(evaluate(c, np.asarray(r.images[0]), r.depths[0].astype(np.float32) / 65535.0))
    psnrs = [psnr(a[..., :3], b[..., :3]) for a, b in zip(raws["default"], raws["int8"])]
    return {"n": n, "default_dtype": str(pipes["default"].dtype), "psnr_db_median": float(np.median(psnrs)),
            "psnr_db_min": float(np.min(psnrs)), "scores": {k: score(v) for k, v in results.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", type=Path, default=Path("/tmp/sd15-fp16"))
    ap.add_argument("--sizes", default="512,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every engine (default: torch's)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--e2e", default="fastldm,fastldm-int8,diffusers-best,diffusers-fp32@256",
                    help="engines that also run a 20-step image at each size (NAME@SIZE: at that size only; "
                    "diffusers-fp32's 512² image is timed by its cold start)")
    ap.add_argument("--e2e-sizes", default=None, help="sizes for the 20-step images (default: --sizes)")
    ap.add_argument("--cold", default="fastldm,diffusers-fp32", help="engines timed from a fresh process")
    ap.add_argument("--embedded", type=int, default=30, help="held-out captions for the embedded model's "
                    "int8 check (0: skip)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker")
    a = ap.parse_args()
    if a.worker:
        t_start = float(os.environ.get("FASTLDM_BENCH_T0", time.time()))  # cold runs: when the driver spawned us
        return worker(a.worker, str(a.folder), a.threads, os.environ.get("FASTLDM_BENCH_COLD") == "1", t_start)
    if not a.folder.exists():
        sys.path.insert(0, str(Path(__file__).parent))
        from load_sd15 import make_folder
        make_folder(a.folder)

    sizes = [int(s) for s in a.sizes.split(",")]
    e2e_sizes = [int(s) for s in (a.e2e_sizes or a.sizes).split(",")]
    e2e = {size: [e.split("@")[0] for e in a.e2e.split(",") if "@" not in e or e.endswith(f"@{size}")]
           for size in e2e_sizes}
    names = a.engines.split(",")
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:], "threads": a.threads,
                 "ceilings": ceilings()}
    print(json.dumps(out["ceilings"]), flush=True)
    workers = {n: Worker(n, a.folder, a.threads) for n in names}
    out["load_s"] = {n: w.load_s for n, w in workers.items()}
    out["first_call_s"], out["step_s"], out["e2e_s"], out["psnr_int8_db"] = {}, {}, {}, {}
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    for size in sizes:
        for n, w in workers.items():  # warm-up (and compile): one call each, timed apart
            out["first_call_s"].setdefault(n, {})[size] = w.ask(op="step", size=size)["s"]
            print(n, size, "first call", round(out["first_call_s"][n][size], 2), flush=True)
        runs = {n: [] for n in workers}
        for _ in range(a.repeats):
            for n, w in workers.items():
                runs[n].append(w.ask(op="step", size=size)["s"])
        for n, r in runs.items():
            out["step_s"].setdefault(n, {})[size] = {"median": statistics.median(r), "runs": r}
            print(n, size, "step median", round(statistics.median(r), 3), [round(x, 2) for x in r], flush=True)
        # 20-step images right after this size's steps. Each engine first makes one untimed 2-step image: the
        # pipeline calls the UNet with other arguments than the step timing does, and torch.compile
        # recompiles for them (~60 s for diffusers-best here), which is start-up cost, not image time.
        for n in e2e.get(size, []):
            if n in workers:
                workers[n].ask(op="generate", size=size, steps=2)
                path = str(tmp / f"cpu_bench_{n}_{size}.npy")
                out["e2e_s"].setdefault(n, {})[size] = workers[n].ask(op="generate", size=size, steps=20, out=path)["s"]
                print(n, size, "20-step image", round(out["e2e_s"][n][size], 1), flush=True)
        if {"fastldm", "fastldm-int8"} <= set(workers):
            eps = []
            for n in ("fastldm", "fastldm-int8"):
                workers[n].ask(op="step_output", size=size, out=str(tmp / f"cpu_bench_eps_{n}_{size}.npy"))
                eps.append(np.load(tmp / f"cpu_bench_eps_{n}_{size}.npy"))
            out["psnr_int8_db"][size] = psnr(eps[1], eps[0], peak=float(eps[0].max() - eps[0].min()))
            print("UNet output PSNR int8 vs bf16", size, round(out["psnr_int8_db"][size], 2), flush=True)
    out["profile"] = {n: workers[n].ask(op="profile", size=sizes[0])["table"]
                      for n in ("fastldm", "diffusers-best") if n in workers}
    for w in workers.values():
        w.close()
    out["cold_s"] = {}
    for n in a.cold.split(","):
        if not n:
            continue
        env = {**os.environ, "FASTLDM_BENCH_COLD": "1", "FASTLDM_BENCH_T0": str(time.time())}
        args = [sys.executable, __file__, "--worker", n, "--folder", str(a.folder)]
        args += ["--threads", str(a.threads)] if a.threads else []
        done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
        res = json.loads(done.stdout.splitlines()[-1])
        out["cold_s"][n] = res
        print(n, "cold start (process start -> first 20-step 512² image)", round(res["cold_s"], 1), flush=True)
    if a.embedded:
        out["embedded_int8"] = embedded_int8(a.embedded, a.threads)
        print(json.dumps(out["embedded_int8"]), flush=True)
    print_table(out, sizes)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


def print_table(out: dict, sizes: list[int]) -> None:
    c = out["ceilings"]
    floor = STEP_TFLOP_512 / max(c["matmul_bf16_tflops"], c["conv3x3_bf16_tflops"])
    print(f"\nceilings: bf16 matmul {c['matmul_bf16_tflops']:.3f} TFLOP/s, bf16 3x3 conv "
          f"{c['conv3x3_bf16_tflops']:.3f} TFLOP/s -> floor {floor:.2f} s per 512² CFG step")
    steps = out["step_s"]
    ref = "diffusers-best"
    print("| engine | " + " | ".join(f"{s}² step (s) | vs {ref}" for s in sizes) + f" | first call {sizes[0]}² (s) |")
    print("|---|" + "---|---|" * len(sizes) + "---|")
    for n, per in steps.items():
        cells = []
        for s in sizes:
            m = per[s]["median"]
            r = steps[ref][s]["median"] / m if ref in steps else float("nan")
            cells.append(f"{m:.2f} | {r:.2f}×")
        first = out["first_call_s"][n].get(sizes[0], float("nan"))
        print(f"| {n} | " + " | ".join(cells) + f" | {first:.1f} |")
    if 512 in sizes and "fastldm" in steps:
        print(f"fastldm measured/floor at 512²: {steps['fastldm'][512]['median'] / floor:.1f}×")
    for n, per in out["e2e_s"].items():
        print(f"20-step image {n}: " + ", ".join(f"{s}² {t:.1f} s" for s, t in per.items()))
    for s, p in out["psnr_int8_db"].items():
        print(f"UNet output PSNR (peak = output range) int8 vs bf16 at {s}²: {p:.1f} dB")
    for n, r in out["cold_s"].items():
        print(f"cold start {n}: {r['cold_s']:.1f} s (load {r['load_s']:.1f} s)")


if __name__ == "__main__":
    main()
