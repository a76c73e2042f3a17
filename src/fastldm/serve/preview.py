"""Live previews: the x0 estimate of a running job (UNet latents) -> a small RGB image, without the VAE.

A latent cell of Stable Diffusion's VAE decodes to roughly an affine function of its channels over the f x f
pixels it covers; A1111 ("Approx cheap", modules/sd_vae_approx.py) and ComfyUI (latent_formats.py,
latent_rgb_factors) preview with a fixed 4 x 3 matrix per family. Instead of a table per family we fit that map
once per loaded model from its own VAE decoder, so every family, the embedded RGBD model's own autoencoder and
random-weight test models get one: CELLS x CELLS latents drawn from N(0, 1) (UNet latents are scaled to unit
variance) are decoded, each cell is paired with the mean colour of the f x f pixels it decodes to, and least
squares gives W ((C + 1), 3) with rgb ≈ [z, 1] · W. On the embedded model the projection of a finished run's
latents is within 3 to 6 (of 255) of its decoded image pooled to the latent grid, mean absolute error over 3
prompts. (Fitting to the *encoder* of flat colour blocks did far worse, 16 to 85: the decoder is what the
preview stands in for.) Cost: one VAE decode of a 16·f-pixel square at load; a preview is then one
(h·w, C+1) x (C+1, 3) product.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

CELLS = 16          # the calibration latents are CELLS x CELLS
PREVIEW_SIDE = 256  # longest side of a preview image, in pixels


class LatentPreview:
    """Affine latent -> RGB projection fitted to a pipeline's VAE (see the module docstring)."""

    def __init__(self, weight: np.ndarray):
        self.weight = weight                                        # (C + 1, 3)

    @classmethod
    def fit(cls, pipe, seed: int = 0) -> "LatentPreview":
        f, c = pipe.config.vae_scale, pipe.config.unet.out_channels
        z = torch.randn((1, c, CELLS, CELLS), generator=torch.Generator().manual_seed(seed))   # (1, C, h, w)
        rgb = pipe.decode(z.to(pipe.device, pipe.dtype))[0, ..., :3]                            # (H, W, 3)
        cells = rgb.reshape(CELLS, f, CELLS, f, 3).mean(axis=(1, 3)).reshape(-1, 3)          # (h·w, 3)
        feats = np.concatenate([z[0].numpy().reshape(c, -1).T, np.ones((CELLS * CELLS, 1))], 1)  # (h·w, C + 1)
        weight, *_ = np.linalg.lstsq(feats, cells, rcond=None)
        return cls(weight.astype(np.float32))

    def rgb(self, latents: torch.Tensor) -> np.ndarray:
        """One image's latents (C, h, w) -> (h, w, 3) uint8."""
        z = latents.detach().float().cpu().numpy().transpose(1, 2, 0)               # (h, w, C)
        rgb = z @ self.weight[:-1] + self.weight[-1]                                # (h, w, 3)
        return (rgb.clip(0, 1) * 255).round().astype(np.uint8)


def preview_image(rgb: np.ndarray, width: int, height: int) -> Image.Image:
    """A projected preview (h, w, 3) scaled up towards the image's aspect, at most PREVIEW_SIDE pixels."""
    scale = min(1.0, PREVIEW_SIDE / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return Image.fromarray(rgb).resize(size, Image.BILINEAR)
