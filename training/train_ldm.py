"""Train the embedded model's text encoder and UNet jointly, from scratch, on ShapesWorld latents.

Latent diffusion (Rombach et al. 2022) with DDPM's ε-prediction objective (Ho et al. 2020, Alg. 1) on
SD's scaled-linear schedule, weighted by Min-SNR-γ (Hang et al. 2023, γ = 5: w = min(SNR, γ) / SNR),
10% of captions replaced by "" so that one network serves classifier-free guidance (Ho & Salimans 2022),
AdamW with linear warm-up and cosine decay over the wall-clock budget, and an EMA of the weights
(decay min(0.999, (1 + n) / (10 + n))). The frozen autoencoder from train_vae.py encodes freshly
rendered scenes on the fly (posterior sample, times its scaling_factor). Only training-split captions
(is_held_out False) are rendered. `--init` starts from an earlier run's weights: after the autoencoder
is retrained, the text encoder and the UNet's layout and wording carry over and only the latent
space is new. Rerunning resumes from the latest checkpoint; the end writes
`ldm.pt` (EMA weights) and `samples.png`.

    python training/train_ldm.py --vae runs/vae/vae.pt --out runs/ldm --minutes 30
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import TEXT, UNET, Checkpoints, load_vae, rgbd_batch, save_grid, to_uint8

from fastldm.config import SD_SCHEDULER
from fastldm.models.clip import CLIPTextModel
from fastldm.models.unet import UNet2DConditionModel
from fastldm.models.vae import AutoencoderKL
from fastldm.tokenizer import CLIPTokenizer


def alphas_cumprod() -> torch.Tensor:
    """ᾱ_t of SD's "scaled_linear" DDPM schedule, t = 0..999."""
    s = SD_SCHEDULER
    betas = torch.linspace(s["beta_start"] ** 0.5, s["beta_end"] ** 0.5, s["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class Denoiser(torch.nn.Module):
    """Text encoder + UNet as one module, so that one optimiser and one EMA cover both."""

    def __init__(self):
        super().__init__()
        self.text_encoder = CLIPTextModel(TEXT)
        self.unet = UNet2DConditionModel(UNET)

    def forward(self, z: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.unet(z, t, self.text_encoder(ids).hidden)


@torch.no_grad()
def ddim_sample(model: Denoiser, tok: CLIPTokenizer, vae: AutoencoderKL, captions: list[str], steps: int = 20,
                guidance: float = 5.0, seed: int = 0) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with η = 0) with CFG, "leading" spacing as SD's
    scheduler config; for checks during training. Returns images (n, 4, 64, 64) in [-1, 1]."""
    ac = alphas_cumprod()
    n = len(captions)
    ctx = model.text_encoder(tok(captions + [""] * n)).hidden          # (2n, 77, C)
    z = torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    ts = list(range(0, 1000, 1000 // steps))[::-1]
    ts = [t + 1 for t in ts]                                            # steps_offset = 1
    for i, t in enumerate(ts):
        eps_c, eps_u = model.unet(torch.cat([z, z]), torch.full((2 * n,), t), ctx).chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        a, a_prev = ac[t], (ac[ts[i + 1]] if i + 1 < len(ts) else ac[0])
        x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
        z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return vae.decode(vae.from_unet_latents(z)).clamp(-1, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True, help="vae.pt from train_vae.py")
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=30.0, help="training wall-clock budget (over all resumes)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--drop", type=float, default=0.1, help="caption dropout (for classifier-free guidance)")
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="ldm.pt of an earlier run to start from (e.g. after retraining the autoencoder)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    ck = Checkpoints(a.out)
    vae, v = load_vae(a.vae)
    vae.requires_grad_(False)
    tok = CLIPTokenizer.bundled(pad_id=49407)
    model = Denoiser()
    if a.init:
        w = torch.load(a.init, weights_only=True)
        model.text_encoder.load_state_dict(w["text_encoder"])
        model.unet.load_state_dict(w["unet"])
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    step, elapsed, rng = 0, 0.0, np.random.default_rng(a.seed)
    if (s := ck.load()) is not None:
        model.load_state_dict(s["model"])
        ema.load_state_dict(s["ema"])
        opt.load_state_dict(s["opt"])
        step, elapsed, rng = s["step"], s["elapsed"], s["rng"]
        torch.set_rng_state(s["torch_rng"])
    ac = alphas_cumprod()
    snr = ac / (1 - ac)
    weight = snr.clamp(max=a.snr_gamma) / snr                          # Min-SNR-γ for ε-prediction
    budget, t0, e0 = a.minutes * 60, time.time(), elapsed
    state = lambda: {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                     "step": step, "elapsed": elapsed, "rng": rng, "torch_rng": torch.get_rng_state()}
    losses = []
    while elapsed < budget:
        frac = elapsed / budget
        lr = a.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        captions, x = rgbd_batch(rng, a.batch)
        captions = ["" if rng.random() < a.drop else c for c in captions]
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            mean, logvar = vae.encode(x)
        z0 = vae.to_unet_latents(mean.float() + torch.randn_like(mean, dtype=torch.float32)
                                 * (0.5 * logvar.float()).exp())       # (B, 4, 16, 16)
        t = torch.randint(0, 1000, (a.batch,))
        noise = torch.randn_like(z0)
        zt = ac[t].sqrt()[:, None, None, None] * z0 + (1 - ac[t]).sqrt()[:, None, None, None] * noise
        eps = model(zt, t, tok(captions))
        loss = (weight[t] * F.mse_loss(eps, noise, reduction="none").mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        elapsed = e0 + time.time() - t0
        losses.append(loss.item())
        if step % 25 == 0:
            ck.log(step=step, elapsed_s=round(elapsed, 1), lr=lr, loss=float(np.mean(losses)))
            losses = []
        ck.maybe_save(state)
    ck.maybe_save(state, force=True)
    torch.save({"text_encoder": ema.text_encoder.state_dict(), "unet": ema.unet.state_dict(),
                "scaling_factor": v["scaling_factor"], "step": step}, ck.out / "ldm.pt")
    captions = ["a red sphere on the left", "a blue cube on the right", "a large yellow pyramid in the center",
                "a green sphere left of a purple cube", "a white cube in front of a orange sphere",
                "a black pyramid above a red cube on a blue background"]
    save_grid(ck.out / "samples.png", [to_uint8(ddim_sample(ema, tok, vae, captions))])


if __name__ == "__main__":
    main()
