"""One engine of benchmarks/cpu_peers.py in its own process, driven by JSON lines on stdin.

    PYTHON benchmarks/peer_workers.py ENGINE --models DIR --threads N [--cold SIZE,STEPS]

PYTHON is whichever interpreter has the engine installed (the system one for fastldm and diffusers, a
virtualenv's for OpenVINO and stable-diffusion.cpp), so this file imports only the standard library at
the top and each engine's packages inside its class. Every engine makes the same image: PROMPT, SEED,
Euler (the engine's own), guidance 7.5 (classifier-free: UNet batch 2), SIZE², from the same random
SD 1.5 weights (benchmarks/peer_models.py writes them in each engine's format).

Replies are one JSON line per command on the process's original stdout; the engines' own prints are sent
to stderr (fd 1 is pointed there) so that a library's log line can never break the protocol.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROMPT, SEED, GUIDANCE = "a photo of a cat", 1, 7.5


def memory() -> dict:
    """Peak and current resident set (MB) of this process from /proc/self/status: VmHWM is the peak;
    RssAnon is heap (weights copied or converted, activations), RssFile mapped file pages (mmap'd weights)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024  # kB -> MB
    return fields


class Torch:
    """Shared by the engines that run in torch (fastldm, diffusers, and OpenVINO's diffusers-based pipeline,
    whose scheduler and latents are torch tensors)."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch

    def unet_inputs(self, size: int, dtype):
        """(x, t, context) of one CFG UNet call at SIZE²: batch 2, 77-token context (the int8 check, the profile)."""
        torch = self.torch
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(dtype)
        return x, torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768, generator=g).to(dtype)


class FastLDM(Torch):
    def __init__(self, models: Path, threads: int, quant: str | None = None):
        super().__init__(threads)
        import fastldm
        from fastldm.runtime.device import configure_process

        configure_process(threads)  # what the CLI does: threads, allocator, compile cache
        self.pipe = fastldm.load(models / "sd15-fp16", quant=quant)
        dtype = str(self.pipe.dtype).removeprefix("torch.")
        self.info = {"dtype": f"{quant} UNet, {dtype} rest" if quant else dtype, "version": fastldm.__version__}

    def generate(self, size: int, steps: int) -> None:
        self.pipe.generate(PROMPT, steps=steps, sampler="Euler", seed=SEED, width=size, height=size,
                           guidance=GUIDANCE)

    def unet_call(self, size: int):
        x, t, ctx = self.unet_inputs(size, self.pipe.dtype)
        return lambda: self.pipe.unet(x, t, ctx)


class DiffusersLike(Torch):
    """A diffusers StableDiffusionPipeline (or OpenVINO's subclass of it) with the Euler scheduler."""

    def use_euler(self, pipe) -> None:
        from diffusers import EulerDiscreteScheduler

        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe

    def generate(self, size: int, steps: int) -> None:
        self.pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, width=size, height=size,
                  generator=self.torch.Generator().manual_seed(SEED), output_type="np")


class Diffusers(DiffusersLike):
    def __init__(self, models: Path, threads: int, best: bool = False):
        """best: bf16 where the CPU has native bf16 dot products (else fp32), channels_last UNet and VAE,
        torch.compile(unet) with inductor freezing; static shapes, so each size compiles at its warm-up."""
        super().__init__(threads)
        import diffusers

        from fastldm.runtime.device import cpu_info

        torch = self.torch
        dtype = torch.bfloat16 if best and cpu_info().bf16 else torch.float32
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            models / "sd15-fp16", torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
        if best:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet, dynamic=False, options={"freezing": True})
        self.use_euler(pipe)
        self.info = {"dtype": str(dtype).removeprefix("torch."), "version": diffusers.__version__}

    def unet_call(self, size: int):
        x, t, ctx = self.unet_inputs(size, self.pipe.unet.dtype)
        return lambda: self.pipe.unet(x, t, encoder_hidden_states=ctx)


class OpenVINO(DiffusersLike):
    def __init__(self, models: Path, threads: int, weights: str = "fp16"):
        """The IR that `optimum-cli export openvino --weight-format WEIGHTS` wrote; dynamic shapes (its
        default), compiled for this CPU at load with OpenVINO's default inference precision."""
        super().__init__(threads)
        import openvino
        from optimum.intel import OVStableDiffusionPipeline

        pipe = OVStableDiffusionPipeline.from_pretrained(models / f"sd15-ov-{weights}",
                                                         ov_config={"INFERENCE_NUM_THREADS": str(threads)})
        self.use_euler(pipe)
        self.info = {"dtype": pipe.unet.request.get_property("INFERENCE_PRECISION_HINT").to_string(),
                     "version": openvino.__version__}


class SDCpp:
    def __init__(self, models: Path, threads: int, wtype: str = "f16"):
        """stable-diffusion.cpp's Python bindings on the single-file checkpoint; WTYPE converts the weights at
        load (f16 as stored, q8_0 quantized)."""
        from importlib.metadata import version

        from stable_diffusion_cpp import StableDiffusion

        self.sd = StableDiffusion(model_path=str(models / "sd15-fp16.safetensors"), wtype=wtype,
                                  n_threads=threads, verbose=False)
        self.info = {"dtype": wtype, "version": version("stable-diffusion-cpp-python")}

    def generate(self, size: int, steps: int) -> None:
        self.sd.generate_image(prompt=PROMPT, width=size, height=size, sample_steps=steps, cfg_scale=GUIDANCE,
                               sample_method="euler", seed=SEED)


# name: (class, its keyword arguments, its interpreter: "system" (the driver's), "openvino" or "sdcpp"
# (cpu_peers.py --openvino-python / --sdcpp-python))
ENGINES = {
    "fastldm": (FastLDM, {}, "system"),
    "fastldm-int8": (FastLDM, {"quant": "int8"}, "system"),
    "diffusers-default": (Diffusers, {}, "system"),
    "diffusers-best": (Diffusers, {"best": True}, "system"),
    "openvino": (OpenVINO, {}, "openvino"),
    "openvino-int8": (OpenVINO, {"weights": "int8"}, "openvino"),
    "sdcpp-f16": (SDCpp, {}, "sdcpp"),
    "sdcpp-q8_0": (SDCpp, {"wtype": "q8_0"}, "sdcpp"),
}


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def serve(engine, reply) -> None:
    """Ops: generate (size, steps) -> seconds; unet_output (size, out): save one UNet call's output as .npy;
    profile (size): torch.profiler's top ops of one UNet call; memory; quit."""
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "generate":
            reply({"s": timed(engine.generate, cmd["size"], cmd["steps"])})
        elif cmd["op"] == "unet_output":
            import numpy as np

            with engine.torch.no_grad():
                np.save(cmd["out"], engine.unet_call(cmd["size"])().float().numpy())
            reply({})
        elif cmd["op"] == "profile":
            from torch.profiler import profile

            call = engine.unet_call(cmd["size"])
            with engine.torch.no_grad():
                call()  # a compiled UNet recompiles for this direct call: keep that out of the profile
                with profile() as prof:
                    call()
            reply({"table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                                      max_name_column_width=50)})
        elif cmd["op"] == "memory":
            reply(memory())
        else:
            return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=ENGINES)
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--cold", metavar="SIZE,STEPS", help="load, make one image, report, exit")
    a = ap.parse_args()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def reply(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    cls, kwargs, _ = ENGINES[a.engine]
    t0 = time.perf_counter()
    engine = cls(a.models, a.threads, **kwargs)
    loaded = {"load_s": time.perf_counter() - t0, **engine.info}
    if a.cold:
        size, steps = (int(v) for v in a.cold.split(","))
        reply({**loaded, "image_s": timed(engine.generate, size, steps), **memory()})
    else:
        reply(loaded)
        serve(engine, reply)


if __name__ == "__main__":
    main()
