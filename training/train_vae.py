"""Train the embedded model's RGB-D autoencoder (the KL first stage of Rombach et al. 2022, §3, with
LDM3D-4c's 4-channel RGB + depth input and output) on freshly rendered ShapesWorld scenes.

Loss: L1 + L2 reconstruction of all four channels + 1e-6 KL to N(0, I) (LDM's KL weight); no
perceptual or adversarial terms: the scenes are flat-shaded and 64 px. Object pixels (depth above the
background plane, grown by one pixel to take in their rims) weigh `--object-weight` times a background
pixel: objects cover ~5-15 % of a scene, and an unweighted loss let the first autoencoder turn small
objects' hues and silhouettes to mush (its reconstructions of held-out renders scored colour 72 %,
shape 30 % with the evaluator) while the background was already near perfect. Trained for a wall-clock budget;
rerunning resumes from the latest checkpoint. At the end it writes `vae.pt` (weights + the latent
`scaling_factor` = 1 / std of the latents, as SD's 0.18215 was chosen) and `recon.png` (rows: inputs,
reconstructions; each RGB above its depth).

    python training/train_vae.py --out runs/vae --minutes 12

`--init runs/vae/vae.pt --decoder-only` fine-tunes the decoder alone (encoder frozen, so the latent
space and its scaling_factor stay what the UNet is trained on; as SD's ft-MSE VAE decoder was), which can
run while train_ldm.py trains on the first VAE's latents:

    python training/train_vae.py --init runs/vae/vae.pt --decoder-only --out runs/vae_dec --minutes 12
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import VAE, Checkpoints, load_vae, rgbd_batch, save_grid, to_uint8, vae_config

from fastldm.models.vae import AutoencoderKL
from fastldm.tools.shapes.evaluate import evaluate, score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=7.0, help="training wall-clock budget (over all resumes)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl", type=float, default=1e-6)
    p.add_argument("--object-weight", type=float, default=10.0, help="loss weight of object pixels (1 = off)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blocks", default=",".join(map(str, VAE.block_out_channels)),
                   help="block widths, comma-separated (the first autoencoder: 32,64,64); --init's are kept")
    p.add_argument("--init", help="vae.pt to start from")
    p.add_argument("--decoder-only", action="store_true", help="train the decoder only (needs --init)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    ck = Checkpoints(a.out)
    if a.init:
        vae = load_vae(a.init)[0].train()
    else:
        vae = AutoencoderKL(vae_config(int(c) for c in a.blocks.split(",")))
    if a.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    step, elapsed, rng = 0, 0.0, np.random.default_rng(a.seed)
    if (s := ck.load()) is not None:
        vae.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])
        step, elapsed, rng = s["step"], s["elapsed"], s["rng"]
        torch.set_rng_state(s["torch_rng"])
    budget, t0, e0 = a.minutes * 60, time.time(), elapsed
    state = lambda: {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                     "elapsed": elapsed, "rng": rng, "torch_rng": torch.get_rng_state()}
    while elapsed < budget:
        frac = elapsed / budget
        lr = a.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        _, x = rgbd_batch(rng, a.batch)
        with torch.autocast("cpu", torch.bfloat16), torch.set_grad_enabled(not a.decoder_only):
            mean, logvar = vae.encode(x)
        with torch.autocast("cpu", torch.bfloat16):
            z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
            y = vae.decode(z).float()
        w = object_weights(x, a.object_weight)                          # (B, 1, 64, 64), mean 1
        rec = (w * ((y - x).abs() + (y - x) ** 2)).mean()
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).sum((1, 2, 3)).mean()
        loss = rec + a.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed = e0 + time.time() - t0
        if step % 20 == 0:
            ck.log(step=step, elapsed_s=round(elapsed, 1), lr=lr, rec=rec.item(), kl=kl.item())
        ck.maybe_save(state)
    ck.maybe_save(state, force=True)
    finish(vae, ck, a.seed)


def object_weights(x: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Images (B, 4, H, W) in [-1, 1] (depth last, background -1) -> per-pixel loss weights (B, 1, H, W)
    with mean 1: object_weight on objects and their one-pixel rim, 1 elsewhere."""
    obj = (x[:, 3:] > -1 + 1e-3).float()                              # (B, 1, H, W)
    obj = F.max_pool2d(obj, 3, stride=1, padding=1)                    # + the rim
    w = 1 + (object_weight - 1) * obj
    return w / w.mean((1, 2, 3), keepdim=True)


@torch.no_grad()
def finish(vae: AutoencoderKL, ck: Checkpoints, seed: int) -> None:
    """Latent scale, held-out reconstruction error and evaluator scores, the PNG grid, and vae.pt."""
    vae.eval()
    rng = np.random.default_rng(seed + 1)
    zs, errs, results = [], [], []
    for _ in range(4):
        captions, x = rgbd_batch(rng, 64, split="heldout")
        mean, _ = vae.encode(x)
        y = vae.decode(mean).clamp(-1, 1)
        zs.append(mean)
        errs.append((y - x).abs().mean((0, 2, 3)))   # (4,) mean |error| per channel, in [-1, 1] units
        rgb, depth = to_uint8(y)
        results += [evaluate(c, rgb[i], depth[i]) for i, c in enumerate(captions)]
    std = torch.cat(zs).std().item()
    err = torch.stack(errs).mean(0) / 2               # in [0, 1] units (x 255 = grey levels for RGB)
    scores = {k: round(100 * v, 1) for k, v in score(results).items()}  # the ceiling for the LDM's images
    ck.log(final=True, latent_std=std, scaling_factor=1 / std, mae_rgb_255=(err[:3].mean() * 255).item(),
           mae_depth=err[3].item(), heldout_recon_scores=scores)
    save_grid(ck.out / "recon.png", [to_uint8(x[:8]), to_uint8(y[:8])])
    torch.save({"model": vae.state_dict(), "scaling_factor": 1 / std,
                "block_out_channels": vae.config.block_out_channels}, ck.out / "vae.pt")


if __name__ == "__main__":
    main()
