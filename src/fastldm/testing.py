"""What tests and benchmarks share: random-weight models built in code (tiny ones for every family, full-size
SD 1.5 / SDXL for speed and memory), the measures they compare with (relative error, PSNR, median time), and
`fastldm serve` in a subprocess (`ServerProcess`).

No model is downloaded: weights are seeded noise, which is all correctness against a reference and speed need
(speed does not depend on weight values). Two initialisations:
- `randomize_`: every parameter N(0, std²) (norm scales 1 + noise), so no path hides behind zero or identity
  init — for parity tests on tiny models;
- `fan_in_init_`: matrices N(0, 1/fan_in), unit norm scales, zero biases, so activations stay O(1) through a
  full-size network (no fp16 overflow), as with trained weights — for benchmarks.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import CLIPConfig, ModelConfig, UNetConfig, VAEConfig
from .families import FAMILIES, PRESETS, family
from .ops.autotune import rel_err  # noqa: F401  (tests and benchmarks import it from here)

# Norm groups stay the families' 32 (single files cannot say otherwise: detection takes them from the preset).
_TINY_UNET = UNetConfig(block_out_channels=(32, 64), layers_per_block=(1, 1), cross_attn=(True, True),
                        attention_heads=(2, 4), transformer_layers_per_block=(1, 1), cross_attention_dim=32,
                        sample_size=8)
_TINY_VAE = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, sample_size=16)
_TINY_CLIP = CLIPConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY_VARIANTS = ("inpainting", "lcm", "pruned")


def tiny_config(name: str) -> ModelConfig:
    """A tiny config of family row `name` (families.FAMILIES), or of a UNet variant on SD1 ("inpainting",
    "lcm", "pruned"): 2 UNet levels of 32/64 channels, a 2-level VAE (8× smaller latents than pixels: 2×),
    2-layer text encoders with the real CLIP vocabulary, and the family's conventions (text stack, heads rule,
    prediction type, VAE channels, SDXL's added conditioning)."""
    if name in TINY_VARIANTS:
        base = tiny_config("sd1")
        unet = {"inpainting": dataclasses.replace(base.unet, in_channels=9),
                "lcm": dataclasses.replace(base.unet, time_cond_proj_dim=16),
                "pruned": dataclasses.replace(base.unet, mid_block=False)}[name]
        return base.replace(unet=unet)
    row = family(name)
    p = row.preset
    te = dataclasses.replace(_TINY_CLIP, hidden_act=p.text_encoder.hidden_act, pad_token_id=p.text_encoder.pad_token_id)
    te2 = None
    unet = dataclasses.replace(_TINY_UNET, attention_heads=row.unet_heads(_TINY_UNET.block_out_channels),
                               use_linear_projection=p.unet.use_linear_projection,
                               upcast_attention=p.unet.upcast_attention)
    if p.text_encoder_2 is not None:
        te2 = dataclasses.replace(te, hidden_size=48, projection_dim=48, hidden_act=p.text_encoder_2.hidden_act,
                                  pad_token_id=p.text_encoder_2.pad_token_id)
        unet = dataclasses.replace(unet, cross_attention_dim=32 + 48, addition_time_embed_dim=8,
                                   projection_class_embeddings_input_dim=48 + 6 * 8)
    vae = dataclasses.replace(_TINY_VAE, in_channels=row.vae_channels, out_channels=row.vae_channels,
                              scaling_factor=p.vae.scaling_factor)
    return dataclasses.replace(p, text_encoder=te, text_encoder_2=te2, unet=unet, vae=vae, default_size=16)


def tiny_configs() -> dict[str, ModelConfig]:
    """Every family row and variant -> its tiny config."""
    return {name: tiny_config(name) for name in [f.name for f in FAMILIES] + list(TINY_VARIANTS)}


def randomize_(module: nn.Module, seed: int, std: float = 0.15) -> nn.Module:
    """Overwrite every parameter with seeded noise, so no path is hidden by zero/identity init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module


def fan_in_init_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Matrices N(0, 1/fan_in), norm scales 1, other vectors 0: O(1) activations at any depth."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    return module


def random_module(component: str, config, *, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                  init: Callable[[nn.Module, int], nn.Module] = fan_in_init_) -> nn.Module:
    """One component ("text_encoder", "unet", "vae") built from `config` with seeded random weights, allocated
    straight in `dtype` on `device` (a full-size UNet is never materialised twice)."""
    from .loading.load import _MODELS

    with torch.device("meta"):
        module = _MODELS[component](config)
    module = module.to(dtype).to_empty(device=device)
    return init(module, seed).eval().requires_grad_(False)


def random_modules(config: ModelConfig, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                   init: Callable[[nn.Module, int], nn.Module] = fan_in_init_) -> dict[str, nn.Module]:
    """Every component of `config` with random weights (component i seeded seed + i)."""
    parts = {"text_encoder": config.text_encoder, "text_encoder_2": config.text_encoder_2, "unet": config.unet,
             "vae": config.vae}
    return {name: random_module(name, sub, dtype=dtype, seed=seed + i, init=init)
            for i, (name, sub) in enumerate(parts.items()) if sub is not None}


def random_pipeline(config: ModelConfig | str, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                    init: Callable[[nn.Module, int], nn.Module] = randomize_):
    """A Pipeline with random weights: `config` a ModelConfig, a family row name (full size: PRESETS) or
    "tiny:<name>" (tiny_config). Tokenizers are the bundled CLIP vocabulary with the config's pad ids."""
    from .pipeline import Pipeline
    from .tokenizer import CLIPTokenizer

    if isinstance(config, str):
        config = tiny_config(config[5:]) if config.startswith("tiny:") else PRESETS[config]
    toks = {"tokenizer": CLIPTokenizer.bundled(pad_id=config.text_encoder.pad_token_id)}
    if config.text_encoder_2 is not None:
        toks["tokenizer_2"] = CLIPTokenizer.bundled(pad_id=config.text_encoder_2.pad_token_id)
    return Pipeline(config, random_modules(config, dtype=dtype, seed=seed, init=init), toks, name="random")


def save_random_folder(config: ModelConfig | str, path: str | Path, *, dtype: torch.dtype = torch.float16,
                       seed: int = 0) -> Path:
    """A random-weight model saved as a diffusers folder (model_index.json, configs, safetensors in `dtype`,
    tokenizers, scheduler) that fastldm, diffusers and optimum-intel's exporter all load."""
    from .loading.save import save_folder

    pipe = random_pipeline(config, dtype=dtype, seed=seed, init=fan_in_init_)
    modules = {k: getattr(pipe, k) for k in ("text_encoder", "text_encoder_2", "unet", "vae")
               if getattr(pipe, k) is not None}
    toks = {k: getattr(pipe, k) for k in ("tokenizer", "tokenizer_2") if getattr(pipe, k) is not None}
    return save_folder(pipe.config, modules, toks, path)


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of images a, b in [0, peak] (tensors or arrays)."""
    mse = float(((torch.as_tensor(a).double() - torch.as_tensor(b).double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak ** 2 / mse)).item()


def median_ms(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in milliseconds after `warmup` untimed calls (CPU; synchronise CUDA work
    inside `fn` if there is any)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m fastldm.cli serve ARGS` on a free loopback port, its output in `log`, running this process's
    fastldm (its source folder goes first on the child's PYTHONPATH). `wait_ready()` polls /healthz; `stop()`
    sends Ctrl-C (SIGINT) and waits, killing it only if it does not end."""

    def __init__(self, *args: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        src = str(Path(__file__).resolve().parent.parent)
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "fastldm.cli", "serve", "--port", str(self.port),
                                          *args], stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_mb(self) -> float:
        """The server process's resident set now (MiB)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def server_process(log: Path, *args: str, timeout: float = 180.0):
    """A ready `ServerProcess` for the `with` block, stopped after it."""
    server = ServerProcess(*args, log=log)
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.stop()
