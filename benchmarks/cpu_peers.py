"""fastldm against its CPU peers on the same random full-size SD 1.5 weights (issue 16).

    python benchmarks/cpu_peers.py [--engines "A,B;C,D"] [--sizes 256,512] [--rounds 3] [--threads 2]
                                   [--cold fastldm,openvino,...] [--json out.json]

Engines (benchmarks/peer_workers.py; each in its own long-lived worker process, under the interpreter
that has it installed — see docs/benchmarks.md, "CPU peers", for the two virtualenvs):
  fastldm            fastldm.load(folder): its CPU defaults (bf16 where native, else fp32; channels_last)
  fastldm-int8       the same with quant="int8"
  diffusers-default  StableDiffusionPipeline.from_pretrained(folder): fp32 eager
  diffusers-best     bf16 where native, else fp32; channels_last; torch.compile(unet) with inductor freezing
  openvino           optimum-intel's OVStableDiffusionPipeline on `optimum-cli export openvino` IR (fp16
                     weights, OpenVINO's default inference precision for this CPU)
  openvino-int8      the same on the `--weight-format int8` export (its int8 weight compression)
  sdcpp-f16          stable-diffusion.cpp's Python bindings, single-file checkpoint, f16 weights
  sdcpp-q8_0         the same quantized to q8_0 at load
Every engine: prompt "a photo of a cat", seed 1, its own Euler, guidance 7.5 (UNet batch 2), --threads.

Measured:
  per step     (t(8-step image) − t(2-step image)) / 6 through each engine's whole pipeline (prompt ->
               image), the two images back to back; after an untimed 2-step warm-up image per size (its
               time, which holds compiles, is reported as "first image"); median over --rounds.
               Engines in one ';'-group live together and alternate round by round (the order rotates);
               groups run one after another because all eight do not fit in 24 GB at once. fastldm joins
               every group, so each ratio is taken against fastldm of the same group, in the same minutes.
  int8 check   one UNet call's output, fastldm-int8 vs fastldm, PSNR (peak = the unquantized output's range):
               random weights decode to a near-constant grey image, so the images cannot tell.
  cold start   a fresh process per --cold engine: imports, load (OpenVINO: from the IR, compiling it),
               first 20-step 512² image. Exports are made once beforehand and timed apart.
  memory       each worker's peak RSS (VmHWM) and, at its end, RssAnon / RssFile (heap / mapped files).
  ceilings     a 4096³ matmul and a 2×320×64×64 3×3 conv in each dtype the CPU runs natively (fp32; bf16
               where avx512_bf16 / amx_bf16), TFLOP/s; floor of a step = its conv FLOPs / conv ceiling + its
               matmul FLOPs / matmul ceiling (FLOPs counted on fastldm's UNet, batch 2).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from peer_models import prepare
from peer_workers import ENGINES

HERE = Path(__file__).resolve().parent
REF = "fastldm"
# sized for 24 GB: steady RSS about 5 GB for fastldm, OpenVINO and diffusers' default, 6 for OpenVINO int8,
# 9 for diffusers-best; the targets' pairs fastldm(-int8) / openvino live together
GROUPS = "fastldm-int8,openvino;diffusers-best;openvino-int8,diffusers-default;sdcpp-f16,sdcpp-q8_0"
COLD = "fastldm,fastldm-int8,openvino,openvino-int8,diffusers-default"


# ---- the machine ---------------------------------------------------------------------------------------

def machine(threads: int) -> dict:
    from fastldm.runtime.device import BF16_FLAGS, INT8_FLAGS, cpu_info

    cpu = cpu_info()
    kind = ("amx" if cpu.amx else "avx512bf16" if "avx512_bf16" in cpu.flags else
            "avx512" if "avx512f" in cpu.flags else "avx2" if "avx2" in cpu.flags else "other")
    shown = sorted(cpu.flags & ({"avx2", "fma", "avx512f", "amx_tile"} | BF16_FLAGS | INT8_FLAGS))
    return {"cpu": cpu.name, "kind": kind, "flags": shown, "native_bf16": cpu.bf16, "cpus": cpu.cpus,
            "threads": threads, "torch": torch.__version__}


def ceilings(dtypes: list[torch.dtype]) -> dict:
    """TFLOP/s of a large matmul and a large 3×3 conv per dtype: best of 3 after a warm-up."""
    import torch.nn.functional as F

    def best(fn, flop: float) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(flop / min(times) / 1e12, 4)

    out = {}
    with torch.no_grad():
        for dt in dtypes:
            a, b = torch.randn(4096, 4096, dtype=dt), torch.randn(4096, 4096, dtype=dt)
            x = torch.randn(2, 320, 64, 64, dtype=dt).to(memory_format=torch.channels_last)
            w = torch.randn(320, 320, 3, 3, dtype=dt).to(memory_format=torch.channels_last)
            out[str(dt).removeprefix("torch.")] = {
                "matmul": best(lambda: a @ b, 2 * 4096 ** 3),
                "conv3x3": best(lambda: F.conv2d(x, w, padding=1), 2 * 2 * 320 * 320 * 9 * 64 * 64)}
    return out


def step_flops(sizes: list[int]) -> dict:
    """{size: {"conv": TFLOP, "matmul": TFLOP}} of one CFG UNet call, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastldm.config import PRESETS
    from fastldm.loading.load import _MODELS

    with torch.device("meta"):
        unet = _MODELS["unet"](PRESETS["sd1"].unet)
    out = {}
    for size in sizes:
        with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as fc:
            unet(torch.empty(2, 4, size // 8, size // 8), torch.empty(2), torch.empty(2, 77, 768))
        counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
        conv = counts.pop("aten.convolution", 0)
        out[size] = {"conv": conv / 1e12, "matmul": sum(counts.values()) / 1e12}
    return out


# ---- workers -------------------------------------------------------------------------------------------

class Worker:
    """One engine's process (peer_workers.py) under its interpreter; its stderr goes to LOGS/NAME.log."""

    def __init__(self, name: str, a: argparse.Namespace, cold: bool = False):
        python = {"system": sys.executable, "openvino": a.openvino_python, "sdcpp": a.sdcpp_python}[ENGINES[name][2]]
        self.name, self.log = name, a.logs / f"{name}{'-cold' if cold else ''}.log"
        args = [str(python), str(HERE / "peer_workers.py"), name, "--models", str(a.models),
                "--threads", str(a.threads)] + (["--cold", a.cold_image] if cold else [])
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     stderr=self.log.open("w"), env={**os.environ, "PYTHONPATH": _pythonpath()})
        self.info = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text().strip().splitlines()[-5:]
            raise RuntimeError(f"{self.name} exited ({self.proc.wait()}): " + " / ".join(tail))
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        with contextlib.suppress(BrokenPipeError):  # it died: read() says how
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.wait()


def _pythonpath() -> str:
    """The fastldm this driver imports (a worktree's src/ if PYTHONPATH points there), for the workers."""
    import fastldm

    return os.pathsep.join([str(Path(fastldm.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])


def start(names: list[str], a, out: dict) -> dict[str, Worker]:
    """Workers for NAMES; an engine that cannot start is recorded in out["failed"] with its log's last lines."""
    workers = {}
    for n in names:
        try:
            workers[n] = Worker(n, a)
            out["engines"][n] = workers[n].info
            print(f"{n}: loaded in {workers[n].info['load_s']:.1f} s ({workers[n].info['dtype']})", flush=True)
        except RuntimeError as e:
            out["failed"][n] = str(e)
            print(f"did not start: {e}", flush=True)
    return workers


def run_group(gi: int, group: list[str], a, out: dict) -> None:
    workers = start(group, a, out)
    try:
        measure(gi, workers, a, out)
    except RuntimeError as e:  # a worker died mid-run: keep what the other groups measure
        out["failed"][f"group {gi + 1}"] = str(e)
        print(f"group {gi + 1} stopped: {e}", flush=True)
    finally:
        for w in workers.values():
            w.close()


def measure(gi: int, workers: dict[str, Worker], a, out: dict) -> None:
    """Warm-up image, then --rounds of (LO-step, HI-step) images per engine per size, order rotating."""
    names = list(workers)
    lo, hi = a.steps
    for size in a.sizes:
        for n in names:
            out["first_image_s"].setdefault(n, {})[size] = workers[n].ask(op="generate", size=size, steps=lo)["s"]
        for r in range(a.rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t_lo = workers[n].ask(op="generate", size=size, steps=lo)["s"]
                t_hi = workers[n].ask(op="generate", size=size, steps=hi)["s"]
                # per group: fastldm runs in every group and each ratio uses its own group's fastldm
                out["rounds"].setdefault(f"{n}@{gi}", {}).setdefault(size, []).append((t_hi - t_lo) / (hi - lo))
                print(f"{n} {size}² round {r}: {lo} steps {t_lo:.1f} s, {hi} steps {t_hi:.1f} s", flush=True)
        for n in names:
            if n.startswith("fastldm"):
                workers[n].ask(op="unet_output", size=size, out=str(a.logs / f"eps_{n}_{size}.npy"))
    for n in names:
        if a.profile and n in (REF, "diffusers-best"):
            out["profile"][n] = workers[n].ask(op="profile", size=a.sizes[-1])["table"]
        out["memory_mb"][n] = max(out["memory_mb"].get(n, {}), workers[n].ask(op="memory"),
                                  key=lambda m: m.get("VmHWM", 0))


def cold_start(name: str, a, out: dict) -> None:
    try:
        w = Worker(name, a, cold=True)
    except RuntimeError as e:
        out["failed"][f"{name} (cold)"] = str(e)
        return
    out["cold"][name] = {"s": time.perf_counter() - w.t0, **w.info}
    w.close()
    print(f"{name}: cold start {out['cold'][name]['s']:.1f} s (load {w.info['load_s']:.1f} s)", flush=True)


# ---- results -------------------------------------------------------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of A against the reference B, peak = B's range."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(float(b.max() - b.min()) ** 2 / mse)


def summarise(out: dict, a) -> None:
    """Per engine and size: median per-step and its ratio to fastldm of the same group (median over groups
    where fastldm ran more than once)."""
    for key, per in out["rounds"].items():
        n, group = key.split("@")
        for size, steps in per.items():
            ref = out["rounds"].get(f"{REF}@{group}", {}).get(size)
            cell = out["step_s"].setdefault(n, {}).setdefault(size, {"median": [], "vs_fastldm": []})
            cell["median"].append(statistics.median(steps))
            if ref:
                cell["vs_fastldm"].append(statistics.median(steps) / statistics.median(ref))
    for per in out["step_s"].values():
        for cell in per.values():
            cell.update({k: statistics.median(v) if v else None for k, v in cell.items()})
    for size in a.sizes:
        files = [a.logs / f"eps_{n}_{size}.npy" for n in ("fastldm-int8", "fastldm")]
        if all(f.exists() for f in files):
            out["psnr_int8_db"][size] = psnr(*(np.load(f) for f in files))


def floors(out: dict) -> dict:
    """{dtype: {size: seconds}}: the step's conv FLOPs / conv ceiling + its matmul FLOPs / matmul ceiling."""
    return {dt: {s: f["conv"] / c["conv3x3"] + f["matmul"] / c["matmul"] for s, f in out["flops"].items()}
            for dt, c in out["ceilings"].items()}


def print_table(out: dict, a) -> None:
    m = out["machine"]
    print(f"\n{m['cpu']} ({m['kind']}; flags: {' '.join(m['flags'])}; native bf16: {m['native_bf16']}), "
          f"{m['threads']} threads, torch {m['torch']}; load average {out['loadavg']}")
    for dt, c in out["ceilings"].items():
        fl = ", ".join(f"{s}² {t:.2f} s" for s, t in floors(out)[dt].items())
        print(f"ceilings {dt}: matmul {c['matmul']:.3f}, 3x3 conv {c['conv3x3']:.3f} TFLOP/s -> step floor {fl}")
    for s, f in out["flops"].items():
        print(f"one CFG step at {s}²: {f['conv'] + f['matmul']:.3f} TFLOP ({f['conv']:.3f} conv)")
    sizes, (cold_size, cold_steps) = a.sizes, a.cold_image.split(",")
    print("\n| engine | precision | " + " | ".join(f"per step {s}² (s) | ÷ fastldm" for s in sizes)
          + f" | fresh process to first {cold_steps}-step {cold_size}² image (s) | peak RSS (GB) |")
    print("|---|---|" + "---|---|" * len(sizes) + "---|---|")
    for n, per in out["step_s"].items():
        cells = [f"{per[s]['median']:.2f} | {per[s]['vs_fastldm']:.2f}" if s in per else "– | –" for s in sizes]
        cold = out["cold"].get(n, {}).get("s")
        rss = out["memory_mb"].get(n, {}).get("VmHWM")
        print(f"| {n} | {out['engines'][n]['dtype']} | " + " | ".join(cells)
              + f" | {f'{cold:.1f}' if cold else '–'} | {f'{rss / 1024:.1f}' if rss else '–'} |")
    for n, why in out["failed"].items():
        print(f"did not run: {n}: {why}")
    for s, p in out["psnr_int8_db"].items():
        print(f"UNet output PSNR fastldm-int8 vs fastldm at {s}²: {p:.1f} dB")
    for n, f in out["first_image_s"].items():
        print(f"first (warm-up) {a.steps[0]}-step image {n}: " + ", ".join(f"{s}² {t:.1f} s" for s, t in f.items()))
    for n, c in out["cold"].items():
        print(f"cold start {n}: {c['s']:.1f} s (load {c['load_s']:.1f} s, image {c['image_s']:.1f} s, "
              f"peak RSS {c['VmHWM'] / 1024:.1f} GB)")
    if out["made"]:
        print("made before timing: " + ", ".join(f"{k} {v:.0f} s" for k, v in out["made"].items()))
    for n, table in out["profile"].items():
        print(f"\nprofile {n}, one UNet call at {sizes[-1]}²:\n{table}")


def print_targets(out: dict, a) -> None:
    """The issue's targets as ratios of this run (speed-up = the peer's per-step time / the engine's)."""
    step = out["step_s"]
    native = "bfloat16" if out["machine"]["native_bf16"] else "float32"
    print(f"\ntargets ({out['machine']['kind']}):")
    for s in a.sizes:
        def speedup(n, peer, s=s):
            ok = n in step and peer in step and s in step[n] and s in step[peer]
            return f"{step[peer][s]['vs_fastldm'] / step[n][s]['vs_fastldm']:.2f}×" if ok else "–"
        floor = floors(out)[native][s]
        fl = f"{step[REF][s]['median'] / floor:.2f}× the {native} floor ({floor:.2f} s)" if REF in step else "–"
        print(f"  {s}²: {REF} {fl}; vs diffusers-best {speedup(REF, 'diffusers-best')}, "
              f"vs openvino {speedup(REF, 'openvino')}; fastldm-int8 vs diffusers-best "
              f"{speedup('fastldm-int8', 'diffusers-best')}, vs openvino {speedup('fastldm-int8', 'openvino')}")
    cold, mem = out["cold"], out["memory_mb"]
    if REF in cold and "openvino" in cold:
        print(f"  cold start {REF} {cold[REF]['s']:.1f} s vs openvino (IR load + first image) "
              f"{cold['openvino']['s']:.1f} s")
    if REF in mem and "diffusers-default" in mem:
        print(f"  peak RSS {REF} {mem[REF]['VmHWM'] / 1024:.1f} GB vs diffusers-default "
              f"{mem['diffusers-default']['VmHWM'] / 1024:.1f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default=GROUPS, help=f"';'-separated groups of ','-separated engines run "
                    f"together ({REF} joins each); names: {', '.join(ENGINES)}")
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", default="2,8", help="LO,HI: per step = (t(HI steps) - t(LO steps)) / (HI - LO)")
    ap.add_argument("--threads", type=int, default=2, help="threads in every engine")
    ap.add_argument("--cold", default=COLD, help="engines timed from a fresh process ('' for none)")
    ap.add_argument("--cold-image", default="512,20", help="SIZE,STEPS of the fresh process's first image")
    ap.add_argument("--profile", action="store_true", help=f"torch.profiler table of {REF} and diffusers-best")
    ap.add_argument("--models", type=Path, default=Path("/work/models"), help="weights (made if missing)")
    ap.add_argument("--openvino-python", type=Path, default=Path("/work/venvs/openvino/bin/python"))
    ap.add_argument("--sdcpp-python", type=Path, default=Path("/work/venvs/sdcpp/bin/python"))
    ap.add_argument("--logs", type=Path, default=Path("/tmp/cpu_peers"), help="workers' stderr and UNet outputs")
    ap.add_argument("--json", type=Path, help="default: benchmarks/results/cpu_peers_<cpu kind>.json")
    a = ap.parse_args()
    a.sizes, a.steps = ([int(s) for s in v.split(",")] for v in (a.sizes, a.steps))
    groups = [[REF] + [n for n in g.split(",") if n and n != REF] for g in a.engines.split(";")]
    cold = [n for n in a.cold.split(",") if n]
    unknown = {n for g in groups for n in g} - ENGINES.keys() | set(cold) - ENGINES.keys()
    if unknown:
        ap.error(f"unknown engines {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    a.logs.mkdir(parents=True, exist_ok=True)
    for stale in a.logs.glob("eps_*.npy"):  # UNet outputs of an earlier run must not enter this one's PSNR
        stale.unlink()
    torch.set_num_threads(a.threads)

    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "argv": sys.argv[1:], "machine": machine(a.threads),
                 "made": prepare(a.models, sorted({n for g in groups for n in g} | set(cold)), a.openvino_python,
                                 a.logs)}
    native = [torch.float32] + ([torch.bfloat16] if out["machine"]["native_bf16"] else [])
    out.update(ceilings=ceilings(native), flops=step_flops(a.sizes), engines={}, failed={}, rounds={},
               step_s={}, first_image_s={}, memory_mb={}, cold={}, psnr_int8_db={}, profile={},
               loadavg=[round(x, 2) for x in os.getloadavg()])
    for gi, group in enumerate(groups):
        run_group(gi, group, a, out)
    for n in cold:
        cold_start(n, a, out)
    out["loadavg"] += [round(x, 2) for x in os.getloadavg()]  # at the start and at the end
    summarise(out, a)
    print_table(out, a)
    print_targets(out, a)
    path = a.json or HERE / "results" / f"cpu_peers_{out['machine']['kind']}.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
