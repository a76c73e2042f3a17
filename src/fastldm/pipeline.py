"""The model bundle: text encoders, UNet, VAE, tokenizers and schedule, with the steps a run needs from them
(conditioning, image encode/decode) and the public `generate`.

A generation is request -> plan -> run: `plan` checks a GenerationRequest against this model (plan.py),
`generate` runs plans through the one batched loop (run.py). Every call into the models runs under this
pipeline's kernel selection (`kernels`, an ops.registry.Kernels), and the UNet through the executor its plan
names (`unet_runtime`), so pipelines with different settings can run side by side.

Memory: the pipeline owns its `memory` planner (runtime/memory_plan.py; `memory_plan` is the load-time plan)
and its `residency` (runtime/residency.py): every stage acquires the components it runs (`acquire`), which
loads staged ones from the checkpoint and releases the other staged ones; a request's plan carries the
per-request part (UNet rows per call, VAE tiling) to `decode` / `encode_pixels` and the run loop.

Noise is drawn on the CPU, one generator per image seeded `seed + i`, exactly as diffusers does with a list
of CPU generators, so the same seed, sampler and model give diffusers' image.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .config import ModelConfig
from .families import family_of, variants_of
from .ops.registry import Kernels, using
from .plan import Limits, Plan, resolve
from .request import GenerationRequest
from .run import GenerationResult, run
from .runtime.executors import UNetRuntime
from .runtime.memory_plan import MemoryPlan, MemoryPlanner
from .runtime.residency import Residency
from .runtime.step_predictor import StepPredictors
from .runtime.winograd_conv import winograd_levels
from .samplers import SamplerSpec, randn
from .schedules import NoiseSchedule
from .tokenizer import CLIPTokenizer, apply_weights

__all__ = ["Pipeline", "GenerationRequest", "GenerationResult", "Plan", "Limits"]


class Pipeline:
    """A loaded text-to-image model. `text_encoder`, `unet`, `vae` (and `text_encoder_2`) are plain modules."""

    def __init__(self, config: ModelConfig, modules: dict, tokenizers: dict[str, CLIPTokenizer], name: str = "",
                 source: Path | None = None, kernels: Kernels | None = None, *, memory: MemoryPlanner | None = None,
                 residency: Residency | None = None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        self.config, self.name, self.source = config, name, source
        # Read from the UNet unless given (a staged UNet may start without tensors, on the meta device).
        self._device = torch.device(device) if device is not None else modules["unet"].conv_in.weight.device
        self._dtype = dtype or modules["unet"].conv_in.weight.dtype
        self.text_encoder = modules["text_encoder"]
        self.text_encoder_2 = modules.get("text_encoder_2")
        self.unet, self.vae = modules["unet"], modules["vae"]
        self.tokenizer = tokenizers["tokenizer"]
        self.tokenizer_2 = tokenizers.get("tokenizer_2")
        self.schedule = NoiseSchedule.from_config(config.scheduler)
        self.family, self.variants = family_of(config), variants_of(config)
        self.kernels = kernels or Kernels()      # this pipeline's backend selection and kernel caches
        self.unet_runtime = UNetRuntime(self.unet)
        self.runtime_choice = None               # runtime.tuning.RuntimeChoice when load measured the CPU
        self.step_predictors = StepPredictors(source)
        self._memory = memory
        self.residency = residency or Residency({k: v for k, v in modules.items() if v is not None})

    @property
    def memory(self) -> MemoryPlanner:
        """This pipeline's memory planner (made on first use for a pipeline built in code: balanced, no budget)."""
        if self._memory is None:
            self._memory = MemoryPlanner(self.config, compute=self.dtype, device=self.device,
                                         attention=self.kernels.forced.get("attention"),
                                         winograd=0 if self.unet is None else winograd_levels(self.unet))
        return self._memory

    @property
    def memory_plan(self) -> MemoryPlan:
        """The plan made at load, for the model's default request (`fastldm info` prints it)."""
        return self.memory.plan

    def acquire(self, *components: str) -> None:
        """Make `components` resident for the stage about to run (staged ones are loaded, other staged ones
        released; runtime/residency.py)."""
        self.residency.acquire(*components)

    def kernels_active(self):
        """A context in which ops dispatch with this pipeline's kernel selection (ops.registry.using)."""
        return using(self.kernels)

    def use_cuda_graphs(self, on: bool = True) -> None:
        """Capture the UNet call (the whole guided batch) as a CUDA graph per input shape and replay it
        afterwards (runtime/cuda_graph.py); the UNet must be on CUDA. Requests with cache_interval > 1
        (DeepCache changes the call from step to step) run eagerly. `on=False` frees the graphs."""
        self.unet_runtime.use_cuda_graphs(on)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the models compute in (weights stored in 16 bits are widened to it)."""
        return self._dtype

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
        self.acquire("text_encoder", *(["text_encoder_2"] if self.text_encoder_2 is not None else []))
        with self.kernels_active():
            return self._encode_prompt(prompts, n_chunks or self._chunks(prompts))

    def _encode_prompt(self, prompts: list[str], n_chunks: int) -> dict[str, torch.Tensor]:
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

    @torch.no_grad()
    def encode_image(self, image: Image.Image, width: int, height: int,
                     generators: list[torch.Generator], memory: MemoryPlan | None = None) -> torch.Tensor:
        """PIL image -> UNet latents (B, C, h, w), sampled from the VAE posterior with each image's generator."""
        cin = self.config.vae.in_channels
        img = image.convert("RGB").resize((width, height), Image.LANCZOS)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]  # (1,3,H,W)
        if cin > 3:  # RGBD VAEs: no depth given -> a flat mid-depth channel(s)
            x = torch.cat([x, torch.zeros(1, cin - 3, height, width)], dim=1)
        return self.encode_pixels(x, generators, memory)

    @torch.no_grad()
    def encode_pixels(self, x: torch.Tensor, generators: list[torch.Generator],
                      memory: MemoryPlan | None = None) -> torch.Tensor:
        """Pixels (1, Cimg, H, W) in [-1, 1] -> UNet latents (B, C, h, w), one posterior sample per generator;
        tiled (runtime/tiled_vae.py, the same result) when the request's memory plan says so; in fp32 again if an
        fp16 encode overflowed (as `decode`)."""
        self.acquire("vae")
        with self.kernels_active():
            mean, logvar = self._encode(self.vae, x.to(self.device), memory)
            if mean.dtype == torch.float16 and not (torch.isfinite(mean).all() and torch.isfinite(logvar).all()):
                mean, logvar = (t.half() for t in self._encode(copy.deepcopy(self.vae).float(), x.to(self.device),
                                                              memory))
        lat = [mean + (0.5 * logvar).exp() * randn(mean.shape, g, mean.device, mean.dtype) for g in generators]
        return self.vae.to_unet_latents(torch.cat(lat))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, memory: MemoryPlan | None = None) -> np.ndarray:
        """UNet latents (B, C, h, w) -> images (B, H, W, Cimg) float32 in [0, 1]; tiled (runtime/tiled_vae.py,
        the same image) when the request's memory plan says so; in fp32 again if an fp16 decode overflowed."""
        self.acquire("vae")
        with self.kernels_active():
            x = self._decode(self.vae, latents, memory)
            if x.dtype == torch.float16 and not torch.isfinite(x).all():
                # The decoder overflowed fp16's range (an SD VAE can, on some images; families.vae_dtype says
                # which run in fp16): decode this image again in fp32, with a copy of the VAE that lives as long.
                x = self._decode(copy.deepcopy(self.vae).float(), latents.float(), memory)
        return (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    @staticmethod
    def _encode(vae, x: torch.Tensor, memory: MemoryPlan | None) -> tuple[torch.Tensor, torch.Tensor]:
        if memory is not None and memory.vae_tile is not None and x.shape[-1] % 8 == 0 and x.shape[-2] % 8 == 0:
            from .runtime.tiled_vae import tiled_encode

            return tiled_encode(vae, x, memory.vae_tile, memory.vae_tile_budget)
        return vae.encode(x)

    @staticmethod
    def _decode(vae, latents: torch.Tensor, memory: MemoryPlan | None) -> torch.Tensor:
        if memory is not None and memory.vae_tile is not None:
            from .runtime.tiled_vae import tiled_decode

            return tiled_decode(vae, vae.from_unet_latents(latents), memory.vae_tile, memory.vae_tile_budget)
        return vae.decode(vae.from_unet_latents(latents))

    def to_outputs(self, raw: np.ndarray) -> tuple[list[Image.Image], list[np.ndarray] | None]:
        """Decoded images (B, H, W, C) -> (RGB PIL images, uint16 depth maps or None), by the family's VAE."""
        images = [Image.fromarray((r[..., :3] * 255).round().astype(np.uint8)) for r in raw]
        depth = self.family.depth(raw)
        return images, None if depth is None else list(depth)

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
            if self.family.zero_empty_negative and negative_prompt == "":
                uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
            else:
                uncond = self.encode_prompt([negative_prompt] * n, n_chunks)
        shared = {}
        if self.family.time_ids:   # original size, crop offset, target size (SDXL §2.2)
            ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=self.device)
            shared["time_ids"] = ids.expand(n, 6)
        cond |= shared
        if uncond is not None:
            uncond |= shared
        return cond, uncond

    @torch.no_grad()
    def image_condition(self, width: int, height: int, generators: list[torch.Generator],
                        memory: MemoryPlan | None = None) -> dict[str, torch.Tensor]:
        """What an inpainting UNet takes besides the latents, when the whole image is to be made (txt2img,
        img2img): the mask (all 1: repaint) and the latents of the masked image (all masked: 0 in [-1, 1]),
        sampled with each image's generator after its noise, concatenated to the UNet's input
        (diffusers' StableDiffusionInpaintPipeline with a white mask; A1111's txt2img conditioning).
        -> {"c_concat": (n, 1 + C, h, w)}, or {} for other UNets."""
        if not any(v.image_channels for v in self.variants):
            return {}
        blank = torch.zeros(1, self.config.vae.in_channels, height, width)
        latents = self.encode_pixels(blank, generators, memory)                  # (n, C, h, w)
        return {"c_concat": torch.cat([torch.ones_like(latents[:, :1]), latents], dim=1)}  # (n, 1 + C, h, w)

    def plan(self, request: GenerationRequest, limits: Limits = Limits()) -> Plan:
        """Check `request` against this model and resolve it (plan.py); raises RequestError on a bad field."""
        return resolve(self, request, limits)

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
        return run(self, [self.plan(request)], [callback])[0]

    def generate_many(self, requests: list[GenerationRequest], limits: Limits = Limits()) -> list[GenerationResult]:
        """Run several requests as one batched run (run.py): requests whose UNet inputs share shapes share
        each UNet call; each leaves when its own steps are done. Results in order."""
        return run(self, [self.plan(r, limits) for r in requests])

    def auto_steps(self, prompt: str, spec: SamplerSpec) -> int:
        """The step count the model's step predictor (runtime/step_predictor.py, saved next to the model) gives
        `prompt` with sampler `spec`, within the sampler's sensible range."""
        predictor = self.step_predictors.get(spec)
        with self.kernels_active():
            return predictor.predict_steps(predictor.prompt_features(self, [prompt]))[0]

    def __repr__(self) -> str:
        return f"Pipeline({self.config.family}, {self.name or 'unnamed'}, {self.dtype}, {self.device})"
