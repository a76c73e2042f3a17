"""The one place that wires the flow: prompt -> text encoders -> sampler(denoiser) -> VAE -> RGB (+ depth).

Noise is drawn on the CPU, one generator per image seeded `seed + i`, exactly as diffusers does with a list
of CPU generators, so the same seed, sampler and model give diffusers' image.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import random
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image

from .runtime.deep_cache import DeepCache
from .runtime.early_stop import EarlyStop
from .runtime.step_predictor import load_step_predictor, prompt_features
from .config import ModelConfig
from .denoiser import Denoiser
from .runtime.cuda_graph import CUDAGraphUNet
from .samplers import SamplerSpec, randn, resolve_sampler, sample
from .schedules import NoiseSchedule
from .tokenizer import CLIPTokenizer, apply_weights


@dataclass
class GenerationRequest:
    """What to generate. Shared by the Python API, the CLI and the HTTP server."""
    prompt: str
    negative_prompt: str = ""
    steps: int | Literal["auto"] = 20     # "auto": the model's step predictor for this prompt and sampler
    sampler: str = "DPM++ 2M"
    scheduler: str | None = None          # sigma schedule: "karras", "exponential", "normal", ... (None: sampler's)
    guidance: float | None = None        # None: the model's default (config.default_guidance; 7.5 for SD)
    seed: int | None = None               # None: random; image i of a batch uses seed + i
    width: int | None = None              # None: the model's default size
    height: int | None = None
    n: int = 1
    init_image: Image.Image | None = None # img2img source, with `strength` in (0, 1]
    strength: float = 0.75
    early_stop: float | None = None       # stop when the x0 estimate changes by less than this (adaptive.EarlyStop)
    cache_interval: int = 1               # DeepCache: the full UNet every N calls, the shallow path between


@dataclass
class GenerationResult:
    images: list[Image.Image]
    depths: list[np.ndarray] | None       # uint16 (H, W) per image for RGBD models, else None
    seeds: list[int]
    steps: int                            # denoising steps actually run (early stop may cut them)
    request: GenerationRequest
    latents: torch.Tensor | None = None   # final UNet latents (B, C, h, w)
    raw: np.ndarray | None = field(default=None, repr=False)  # decoded images (B, H, W, C) float in [0, 1]


class Pipeline:
    """A loaded text-to-image model. `text_encoder`, `unet`, `vae` (and `text_encoder_2`) are plain modules."""

    def __init__(self, config: ModelConfig, modules: dict, tokenizers: dict[str, CLIPTokenizer], name: str = "",
                 source: Path | None = None):
        self.config, self.name, self.source = config, name, source
        self.text_encoder = modules["text_encoder"]
        self.text_encoder_2 = modules.get("text_encoder_2")
        self.unet, self.vae = modules["unet"], modules["vae"]
        self.tokenizer = tokenizers["tokenizer"]
        self.tokenizer_2 = tokenizers.get("tokenizer_2")
        self.schedule = NoiseSchedule.from_config(config.scheduler)
        self.graphed_unet = None  # a CUDAGraphUNet when use_cuda_graphs() is on

    def use_cuda_graphs(self, on: bool = True) -> None:
        """Capture the UNet call (the whole guided batch) as a CUDA graph per input shape and replay it
        afterwards (runtime/cuda_graph.py); the UNet must be on CUDA. Requests with cache_interval > 1
        (DeepCache changes the call from step to step) run eagerly. `on=False` frees the graphs."""
        self.graphed_unet = CUDAGraphUNet(self.unet) if on else None

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    # ---- text ---------------------------------------------------------------------------------------------

    def _encode_one(self, encoder, tok: CLIPTokenizer, prompt: str, n_chunks: int, layer: int):
        """One prompt -> hidden (1, 77 * n_chunks, C) with A1111 weights applied, pooled (1, P) of chunk 0."""
        ids, weights = tok.encode_weighted(prompt)  # (k, 77) each
        if ids.shape[0] < n_chunks:  # pad with empty chunks so every prompt of the batch has the same length
            empty_ids, empty_w = tok.encode_weighted("")
            reps = n_chunks - ids.shape[0]
            ids = torch.cat([ids, empty_ids.repeat(reps, 1)])
            weights = torch.cat([weights, empty_w.repeat(reps, 1)])
        enc = encoder(ids.to(self.device), layer=layer)
        hidden = enc.hidden  # (k, 77, C)
        if not bool((weights == 1).all()):  # A1111 restores the mean chunk by chunk
            hidden = apply_weights(hidden.float(), weights.to(self.device)).to(hidden.dtype)
        return hidden.reshape(1, -1, hidden.shape[-1]), enc.pooled[:1]  # (1, 77k, C)

    def _chunks(self, prompts: list[str]) -> int:
        toks = [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]
        return max(t.encode_weighted(p)[0].shape[0] for p in prompts for t in toks)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], n_chunks: int | None = None) -> dict[str, torch.Tensor]:
        """Prompts -> the UNet's conditioning: {"encoder_hidden_states": (B, 77k, Cctx)} and for SDXL also
        "text_embeds" (B, 1280) (pooled, projected text of the second encoder)."""
        n_chunks = n_chunks or self._chunks(prompts)
        c = self.config
        if self.text_encoder_2 is None:
            hs = [self._encode_one(self.text_encoder, self.tokenizer, p, n_chunks, c.clip_layer)[0] for p in prompts]
            return {"encoder_hidden_states": torch.cat(hs)}
        hidden, pooled = [], []
        for p in prompts:
            h1, _ = self._encode_one(self.text_encoder, self.tokenizer, p, n_chunks, c.clip_layer)
            h2, pool = self._encode_one(self.text_encoder_2, self.tokenizer_2 or self.tokenizer, p, n_chunks,
                                        c.clip_layer)
            hidden.append(torch.cat([h1, h2], dim=-1))  # (1, 77k, 768 + 1280)
            pooled.append(pool)
        return {"encoder_hidden_states": torch.cat(hidden), "text_embeds": torch.cat(pooled)}

    # ---- images -------------------------------------------------------------------------------------------

    def _check_size(self, width: int, height: int) -> None:
        f = math.lcm(8, self.config.vae_scale)
        if width % f or height % f or width < f or height < f:
            raise ValueError(f"size {width}x{height} is not valid: width and height must be multiples of {f} "
                             f"(e.g. {max(f, width // f * f)}x{max(f, height // f * f)})")

    @torch.no_grad()
    def encode_image(self, image: Image.Image, width: int, height: int,
                     generators: list[torch.Generator]) -> torch.Tensor:
        """PIL image -> UNet latents (B, C, h, w), sampled from the VAE posterior with each image's generator."""
        cin = self.config.vae.in_channels
        img = image.convert("RGB").resize((width, height), Image.LANCZOS)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]  # (1,3,H,W)
        if cin > 3:  # RGBD VAEs: no depth given -> a flat mid-depth channel(s)
            x = torch.cat([x, torch.zeros(1, cin - 3, height, width)], dim=1)
        mean, logvar = self.vae.encode(x.to(self.device))
        lat = [mean + (0.5 * logvar).exp() * randn(mean.shape, g, mean.device, mean.dtype) for g in generators]
        return self.vae.to_unet_latents(torch.cat(lat))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """UNet latents (B, C, h, w) -> images (B, H, W, Cimg) float32 in [0, 1]."""
        x = self.vae.decode(self.vae.from_unet_latents(latents))
        return (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    def _to_outputs(self, raw: np.ndarray) -> tuple[list[Image.Image], list[np.ndarray] | None]:
        images = [Image.fromarray((r[..., :3] * 255).round().astype(np.uint8)) for r in raw]
        if raw.shape[-1] == 4:  # LDM3D-4c: one depth channel
            depths = [(r[..., 3] * 65535.0).astype(np.uint16) for r in raw]
        elif raw.shape[-1] == 6:  # original LDM3D: 16-bit depth packed as G * 256 + B of an RGB-like image
            q = (raw[..., 3:] * 255).round().astype(np.uint16)
            depths = [qi[..., 1] * 256 + qi[..., 2] for qi in q]
        else:
            depths = None
        return images, depths

    # ---- generation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def conditioning(self, prompts: list[str], negative_prompt: str, guidance: float, width: int,
                     height: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """The denoiser's (cond, uncond) for a batch of prompts sharing one negative prompt; uncond is None
        when guidance is 1 (no CFG batch)."""
        n = len(prompts)
        n_chunks = self._chunks([*prompts, negative_prompt])
        cond = self.encode_prompt(prompts, n_chunks)
        uncond = None
        if guidance != 1.0:
            if self.text_encoder_2 is not None and negative_prompt == "":
                uncond = {k: torch.zeros_like(v) for k, v in cond.items()}  # SDXL force_zeros_for_empty_prompt
            else:
                uncond = self.encode_prompt([negative_prompt] * n, n_chunks)
        if self.text_encoder_2 is not None:
            ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=self.device)
            cond["time_ids"] = ids.expand(n, 6)
            if uncond is not None:
                uncond["time_ids"] = cond["time_ids"]
        return cond, uncond

    @torch.no_grad()
    def generate(self, request: GenerationRequest | str | None = None, *,
                 callback: Callable[[dict], bool | None] | None = None, **kw) -> GenerationResult:
        """Run one request. `callback(info)` is called after every step with {"i", "total", "sigma", "x",
        "denoised"}; returning True stops sampling early (the current clean estimate is decoded).
        `result.steps` is the number of steps run (after "auto", img2img strength and early stop)."""
        if isinstance(request, str):
            request = GenerationRequest(prompt=request, **kw)
        elif request is None:
            request = GenerationRequest(**kw)
        elif kw:
            raise TypeError("give either a GenerationRequest or keyword arguments, not both")
        if request.guidance is None:
            request = dataclasses.replace(request, guidance=self.config.default_guidance)
        r = request
        size = self.config.default_size
        width, height = r.width or size, r.height or size
        self._check_size(width, height)
        if r.steps != "auto" and not (isinstance(r.steps, int) and r.steps >= 1):
            raise ValueError(f"steps must be a positive integer or 'auto', got {r.steps!r}")
        if r.n < 1 or r.cache_interval < 1:
            raise ValueError(f"n and cache_interval must be at least 1 (got n={r.n}, "
                             f"cache_interval={r.cache_interval})")
        if r.init_image is not None and not 0.0 < r.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {r.strength}")
        spec = resolve_sampler(r.sampler, r.scheduler)
        early_stop = EarlyStop(r.early_stop) if r.early_stop is not None else None
        steps = self.auto_steps(r.prompt, spec) if r.steps == "auto" else r.steps
        seed = r.seed if r.seed is not None else random.randrange(2**32 - 1)
        seeds = [seed + i for i in range(r.n)]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]

        cond, uncond = self.conditioning([r.prompt] * r.n, r.negative_prompt, r.guidance, width, height)
        f, ch = self.config.vae_scale, self.config.unet.out_channels
        shape = (1, ch, height // f, width // f)
        init = None
        if r.init_image is not None:
            init = self.encode_image(r.init_image, width, height, gens)
        noise = torch.cat([randn(shape, g, self.device, torch.float32) for g in gens])
        cache = DeepCache(r.cache_interval) if r.cache_interval > 1 else None
        unet = functools.partial(self.unet, cache=cache) if cache is not None else self.graphed_unet or self.unet
        denoiser = Denoiser(unet, self.schedule, cond, uncond, r.guidance,
                            guidance_embedding_dim=self.config.unet.time_cond_proj_dim)
        steps_run = [0]

        def on_step(info: dict) -> bool:
            steps_run[0] = info["i"] + 1
            # Under DeepCache, a cached call's x0 estimate reuses the last full call's deep features, so it barely
            # moves: judge convergence only between full calls (a longer span, so a more cautious stop).
            fresh = cache is None or cache.last_full
            converged = early_stop(info) if early_stop is not None and fresh else False
            return bool(callback(info) if callback is not None else False) or converged

        latents = sample(denoiser, noise, spec, self.schedule, steps, generator=gens, callback=on_step,
                         init_latents=init, strength=r.strength if init is not None else 1.0)
        raw = self.decode(latents.to(self.dtype))
        images, depths = self._to_outputs(raw)
        return GenerationResult(images, depths, seeds, steps_run[0], r, latents, raw)

    def auto_steps(self, prompt: str, spec: SamplerSpec) -> int:
        """The step count the model's step predictor (runtime/step_predictor.py, saved next to the model) gives
        `prompt` with sampler `spec`, within the sampler's sensible range."""
        predictor = load_step_predictor(self.source, spec)
        return predictor.predict_steps(prompt_features(self, [prompt]))[0]

    def __repr__(self) -> str:
        return f"Pipeline({self.config.family}, {self.name or 'unnamed'}, {self.dtype}, {self.device})"
