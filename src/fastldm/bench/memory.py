"""`fastldm bench memory`: where a text-to-image run's bytes go, stage by stage, beside diffusers.

Each (engine, stage) runs in a fresh process (`python -m fastldm.bench.memory ...`), so no stage inherits
another's heap. The process imports its engine's pipeline code, reads its resident set (the post-import
baseline), loads the
model from the same diffusers folder, does what the stage needs first (denoise: encode the prompt), resets
its peak resident set (`/proc/self/clear_refs` ← 5), and runs the stage under `MemoryTrace`:

    load      build the pipeline from the folder (its peak is since the process started)
    text      encode the prompt and the empty negative prompt (guided)
    denoise   `steps` guided steps (UNet batch 2) with the engine's own loop
    decode    VAE-decode random latents of the image's size
    generate  the whole run in one process: load, then one generation (encode, `steps` guided steps,
              decode) through the engine's own pipeline; its peak is since the process started. This is the
              row a memory budget is judged by: a plan's stages share one process, and peak RSS does not
              depend on the step count (every step allocates and frees the same tensors), so a few steps
              stand for 20.

Per stage: peak RSS (`VmHWM` − baseline), what the stage added to the RSS it started from, `RssAnon` and
`RssFile` at the sampled peak (a thread reads /proc/self/status every 2 ms; file-backed pages are the
memory-mapped weights), Weight MB (unique parameter and buffer storages of the pipeline's modules), Tensor MB
(the trace's peak of storages born in the stage) and its live-set lower bound (fastldm.runtime.memory_trace).

Engines: fastldm (its defaults), fastldm with the tiled VAE decode (runtime/tiled_vae.py; decode only),
fastldm with memory settings (`fastldm:budget=2.1GB`, `fastldm:memory=low`, `...,quant=int8`: the options of
`fastldm.load`; its row also shows the planner's predicted peak), diffusers' StableDiffusionPipeline as
loaded, and diffusers with its memory options (`pipe.enable_attention_slicing()`, `pipe.vae.enable_slicing()`,
`pipe.vae.enable_tiling()`). MB are 2^20 bytes.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

STAGES = ("load", "text", "denoise", "decode", "generate")
SETTINGS = ("memory", "budget", "quant")   # of a "fastldm:KEY=VALUE,..." engine
ENGINES = {
    "fastldm": "fastldm (defaults)",
    "fastldm-tiled": "fastldm, tiled VAE (tile 32)",
    "diffusers": "diffusers (default)",
    "diffusers-lowmem": "diffusers + attention slicing + VAE slicing + VAE tiling",
}
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
MB = 2**20


@dataclass
class StageResult:
    engine: str
    stage: str
    peak_rss_mb: float | None = None     # VmHWM during the stage − post-import baseline
    added_mb: float | None = None        # VmHWM during the stage − RSS when it started
    anon_mb: float | None = None         # RssAnon − baseline's, at the sampled peak
    file_mb: float | None = None         # RssFile − baseline's, at the sampled peak
    weight_mb: float | None = None
    tensor_mb: float | None = None       # MemoryTrace peak of storages born in the stage
    bound_mb: float | None = None        # its live-set lower bound
    seconds: float | None = None
    na: str | None = None
    predicted_mb: float | None = None    # the memory plan's predicted peak (fastldm with memory settings)


def engine_settings(engine: str) -> dict[str, str]:
    """"fastldm:budget=2.1GB,quant=int8" -> {"budget": "2.1GB", "quant": "int8"}; {} for a plain engine."""
    name, _, spec = engine.partition(":")
    if name not in ENGINES or (spec and name != "fastldm"):
        raise ValueError(f"unknown engine {engine!r}; use some of {', '.join(ENGINES)} or fastldm:KEY=VALUE,... "
                         f"with keys {', '.join(SETTINGS)}")
    out = {}
    for part in filter(None, spec.split(",")):
        key, eq, value = part.partition("=")
        if key not in SETTINGS or not eq:
            raise ValueError(f"bad engine setting {part!r} in {engine!r}; use {', '.join(SETTINGS)}")
        out[key] = value
    return out


def label(engine: str) -> str:
    settings = engine_settings(engine)
    if not settings:
        return ENGINES[engine]
    names = {"memory": "--memory", "budget": "--memory-budget", "quant": "--quant"}
    return "fastldm " + " ".join(f"{names[k]} {v}" for k, v in settings.items())


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class _Sampler:
    """Reads status() every `interval` s in a thread; keeps the sample with the largest VmRSS."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, status()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(self.interval):
            s = status()
            if s["VmRSS"] > self.peak["VmRSS"]:
                self.peak = s

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _engine(engine: str, folder: str, dtype, width: int, height: int, steps: int):
    """Load `engine`'s pipeline; returns ({stage: (prepare, run)}, modules): run(prepare()) is the stage."""
    import torch

    h, w = height, width
    settings = engine_settings(engine)
    if engine.startswith("fastldm"):
        import fastldm
        from fastldm.denoiser import Denoiser
        from fastldm.runtime.tiled_vae import tiled_decode
        from fastldm.samplers import resolve_sampler, sample

        pipe = fastldm.load(folder, dtype=dtype, memory=settings.get("memory"), memory_budget=settings.get("budget"),
                            quant=settings.get("quant"))

        def denoise(cond):
            noise = torch.randn(1, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(0))
            return sample(Denoiser(pipe.unet, pipe.schedule, *cond, GUIDANCE), noise, resolve_sampler("Euler"),
                          pipe.schedule, steps)

        def encode():
            return pipe.conditioning([PROMPT], "", GUIDANCE, w, h)

        def decode(z):
            if engine == "fastldm-tiled":
                return tiled_decode(pipe.vae, pipe.vae.from_unet_latents(z), tile=32)
            return pipe.decode(z, pipe.plan(fastldm.GenerationRequest(PROMPT, width=w, height=h)).memory)

        def generate():
            return pipe.generate(PROMPT, steps=steps, guidance=GUIDANCE, width=w, height=h, seed=0)
        modules = [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.unet, pipe.vae) if m is not None]
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype or torch.float32,
                                                       safety_checker=None, requires_safety_checker=False)
        if engine == "diffusers-lowmem":
            pipe.enable_attention_slicing()
            pipe.vae.enable_slicing()  # the pipeline's enable_vae_slicing/_tiling until diffusers 0.40
            pipe.vae.enable_tiling()

        def encode():
            return pipe.encode_prompt(PROMPT, "cpu", 1, True, "")

        def denoise(cond):
            return pipe(prompt_embeds=cond[0], negative_prompt_embeds=cond[1], height=h, width=w,
                        num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="latent").images

        def decode(z):
            return pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample

        def generate():
            return pipe(PROMPT, height=h, width=w, num_inference_steps=steps, guidance_scale=GUIDANCE,
                        generator=torch.Generator().manual_seed(0)).images
        modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]

    def latents():
        return torch.randn(1, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(0))
    stages = {"text": (lambda: None, lambda _: encode()), "denoise": (encode, denoise), "decode": (latents, decode),
              "generate": (lambda: None, lambda _: generate())}
    return stages, modules, pipe


def child(engine: str, stage: str, folder: str, width: int, height: int, dtype: str | None, steps: int) -> dict:
    """One stage in this (fresh) process; returns a StageResult as a dict."""
    import torch

    from ..api import parse_dtype
    from ..runtime.memory_trace import MemoryTrace
    from ..runtime.weight_storage import stored_bytes

    # The baseline is taken after importing each engine's pipeline code (for both, that imports torch._dynamo:
    # ~150 MB of RSS), so a row counts what the run itself adds.
    if engine.startswith("diffusers"):
        from diffusers import StableDiffusionPipeline  # noqa: F401
    else:
        import fastldm.api  # noqa: F401
        import fastldm.ops  # noqa: F401
    base = status()
    t0 = time.perf_counter()
    with torch.inference_mode():
        with _Sampler() as sampler:
            stages, modules, pipe = _engine(engine, folder, parse_dtype(dtype), width, height, steps)
        r = StageResult(engine, stage, weight_mb=stored_bytes(*modules) / MB)
        if engine_settings(engine):
            from ..request import GenerationRequest

            plan = pipe.plan(GenerationRequest(PROMPT, width=width, height=height, guidance=GUIDANCE)).memory
            r.predicted_mb = dict(plan.peaks).get(stage, plan.peak) / MB
        if stage == "generate":  # the whole run: its peak is since the process started, load included
            t0 = time.perf_counter()
            with _Sampler() as sampler:
                out = stages[stage][1](None)
            r.seconds = time.perf_counter() - t0
            r.peak_rss_mb = r.added_mb = (status()["VmHWM"] - base["VmRSS"]) / MB
            r.anon_mb = (sampler.peak["RssAnon"] - base["RssAnon"]) / MB
            r.file_mb = (sampler.peak["RssFile"] - base["RssFile"]) / MB
            r.weight_mb = stored_bytes(*modules) / MB   # what stays resident after the run
            return asdict(r)
        if stage == "load":
            r.seconds = time.perf_counter() - t0
            r.peak_rss_mb = r.added_mb = (status()["VmHWM"] - base["VmRSS"]) / MB
            r.anon_mb = (sampler.peak["RssAnon"] - base["RssAnon"]) / MB
            r.file_mb = (sampler.peak["RssFile"] - base["RssFile"]) / MB
            return asdict(r)
        prepare, run = stages[stage]
        arg = prepare()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = status()
        t0 = time.perf_counter()
        with _Sampler() as sampler, MemoryTrace() as trace:
            out = run(arg)
        r.seconds = time.perf_counter() - t0
        peak = status()["VmHWM"]
        del out
    report = trace.report()
    r.peak_rss_mb, r.added_mb = (peak - base["VmRSS"]) / MB, (peak - before["VmRSS"]) / MB
    r.anon_mb = (sampler.peak["RssAnon"] - base["RssAnon"]) / MB
    r.file_mb = (sampler.peak["RssFile"] - base["RssFile"]) / MB
    r.tensor_mb, r.bound_mb = report.peak_bytes / MB, report.lower_bound_bytes / MB
    return asdict(r)


def bench_memory(folder: str, width: int = 512, height: int = 512, dtype: str | None = None, steps: int = 2,
                 engines: tuple[str, ...] = tuple(ENGINES), stages: tuple[str, ...] = STAGES) -> dict:
    """Every (stage, engine) in its own process, engines alternating within a stage; {"meta", "rows"}."""
    for e in engines:
        engine_settings(e)
    rows = []
    for stage in stages:
        for engine in engines:
            if engine == "fastldm-tiled" and stage != "decode":
                continue  # the same as fastldm before the decode
            if engine_settings(engine) and stage in ("load", "text", "denoise", "decode"):
                continue  # a plan's stages share one process: judged by the generate row
            cmd = [sys.executable, "-m", "fastldm.bench.memory", engine, stage, str(folder), str(width), str(height),
                   dtype or "", str(steps)]
            p = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if p.returncode:
                tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append(asdict(StageResult(engine, stage, na=f"failed: {tail}")))
            else:
                rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    import torch

    from ..runtime.device import cpu_info

    cpu = cpu_info()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{cpu.name}, {cpu.cpus} CPUs, native bf16: {cpu.bf16}",
            "torch": torch.__version__, "model": str(folder), "size": f"{width}x{height}",
            "dtype": dtype or "engine default", "steps": steps, "guidance": GUIDANCE, "threads": torch.get_num_threads(),
            "loadavg": os.getloadavg()}
    try:
        import diffusers
        meta["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return {"meta": meta, "rows": rows}


def markdown(result: dict) -> str:
    m = result["meta"]
    head = (f"{m['model']} at {m['size']}, {m['dtype']}, {m['steps']} guided steps (CFG {m['guidance']}), torch "
            f"{m['torch']}; each stage in a fresh process; MB = 2^20 bytes, RSS above the post-import baseline")
    cols = ["stage", "engine", "peak RSS", "+ stage", "RssAnon", "RssFile", "Weight MB", "Tensor MB",
            "lower bound", "predicted", "s"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * 9]

    def cell(v):
        return "" if v is None else f"{v:.0f}" if abs(v) >= 10 else f"{v:.1f}"
    for r in result["rows"]:
        if r["na"]:
            lines.append(f"| {r['stage']} | {label(r['engine'])} | n/a ({r['na']}) |" + " |" * 8)
            continue
        vals = [r.get(k) for k in ("peak_rss_mb", "added_mb", "anon_mb", "file_mb", "weight_mb", "tensor_mb",
                                   "bound_mb", "predicted_mb", "seconds")]
        lines.append(f"| {r['stage']} | {label(r['engine'])} | " + " | ".join(cell(v) for v in vals) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    engine, stage, folder, width, height, dtype, steps = sys.argv[1:8]
    print(json.dumps(child(engine, stage, folder, int(width), int(height), dtype or None, int(steps))))
