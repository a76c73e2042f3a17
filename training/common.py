"""What the training scripts share: the embedded model's architecture, ShapesWorld batches as tensors,
checkpoints that survive being killed, and a loss log.

The architecture is the LDM3D-4c one (Stable Diffusion's networks with an RGB + depth first stage,
Stan et al. 2023, arXiv 2305.10853) shrunk to 64 x 64 images: a 3-level KL autoencoder (f = 4, 16 x 16
x 4 latents), a 2-layer CLIP text transformer over the real CLIP BPE ids, and a 3-level UNet with
cross-attention on its 16 x 16 and 8 x 8 levels.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapesworld import render_batch

from fastldm.config import SD_SCHEDULER, CLIPConfig, ModelConfig, UNetConfig, VAEConfig

VAE = VAEConfig(in_channels=4, out_channels=4, latent_channels=4, block_out_channels=(32, 64, 128),
                layers_per_block=1, norm_num_groups=8, force_upcast=False, sample_size=64)
TEXT = CLIPConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
UNET = UNetConfig(block_out_channels=(32, 64, 64), layers_per_block=(1, 1, 1), cross_attn=(True, True, False),
                  attention_heads=(1, 2, 2), cross_attention_dim=TEXT.hidden_size, norm_num_groups=8,
                  sample_size=16)


def vae_config(block_out_channels=VAE.block_out_channels, scaling_factor: float = 1.0) -> VAEConfig:
    """VAE with other widths (the first autoencoder was (32, 64, 64)) and/or its latent scale."""
    return VAEConfig(**{**VAE.__dict__, "block_out_channels": tuple(block_out_channels),
                        "scaling_factor": scaling_factor})


def load_vae(path: str | Path):
    """vae.pt from train_vae.py -> (AutoencoderKL in eval mode with its scaling_factor, the checkpoint dict)."""
    from fastldm.models.vae import AutoencoderKL
    v = torch.load(path, weights_only=False)
    vae = AutoencoderKL(vae_config(v["block_out_channels"], v["scaling_factor"]))
    vae.load_state_dict(v["model"])
    return vae.eval(), v


def model_config(vae: VAEConfig) -> ModelConfig:
    """The shipped model's config around a trained autoencoder's config (widths and latent scale)."""
    return ModelConfig("ldm3d", TEXT, UNET, vae, scheduler=dict(SD_SCHEDULER), default_size=64)


def rgbd_batch(rng: np.random.Generator, n: int, split: str = "train") -> tuple[list[str], torch.Tensor]:
    """n fresh ShapesWorld scenes -> captions, images (n, 4, 64, 64) in [-1, 1]: RGB, then depth (1 = near)."""
    captions, rgb, depth = render_batch(rng, n, split=split)
    x = np.concatenate([rgb.astype(np.float32) / 127.5 - 1.0, depth[..., None] * 2.0 - 1.0], -1)  # (n, 64, 64, 4)
    return captions, torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # (n, 4, 64, 64)


def to_uint8(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 4, H, W) in [-1, 1] -> rgb (n, H, W, 3) uint8, depth (n, H, W) float32 in [0, 1]."""
    x = ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()  # (n, H, W, 4)
    return np.rint(x[..., :3] * 255).astype(np.uint8), x[..., 3]


def save_grid(path: Path, rows: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Rows of (rgb (n, H, W, 3) uint8, depth (n, H, W)) -> one PNG: each row's RGB tiles over its depth tiles."""
    from PIL import Image
    lines = []
    for rgb, depth in rows:
        d = np.repeat(np.rint(depth * 255).astype(np.uint8)[..., None], 3, -1)
        lines += [np.concatenate(list(rgb), 1), np.concatenate(list(d), 1)]
    Image.fromarray(np.concatenate(lines, 0)).save(path)


class Checkpoints:
    """`state.pt` in the run folder, written atomically every `every_s` seconds; `log.txt` beside it."""

    def __init__(self, out: str | Path, every_s: float = 120.0):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path, self.every_s, self.last = self.out / "state.pt", every_s, time.time()

    def load(self) -> dict | None:
        return torch.load(self.path, weights_only=False) if self.path.exists() else None

    def maybe_save(self, state_fn, force: bool = False) -> None:
        if force or time.time() - self.last >= self.every_s:
            tmp = self.path.with_suffix(".tmp")
            torch.save(state_fn(), tmp)
            os.replace(tmp, self.path)
            self.last = time.time()

    def log(self, **row) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        with open(self.out / "log.txt", "a") as f:
            f.write(line + "\n")
