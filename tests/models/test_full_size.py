"""Slow: the full SD 1.5 architecture (random weights) against diffusers at 512x512. Run with `-m slow`."""
from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from fastldm.families import PRESETS
from fastldm.models import AutoencoderKL, UNet2DConditionModel

pytestmark = pytest.mark.slow


def test_sd15_unet_and_vae_parity_at_512():
    from diffusers import AutoencoderKL as DVAE
    from diffusers import UNet2DConditionModel as DUNet

    cfg = PRESETS["sd1"]
    torch.manual_seed(0)
    d = DUNet(**cfg.unet.to_diffusers()).eval()
    ours = UNet2DConditionModel(cfg.unet).eval()
    ours.load_state_dict(d.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([999.0, 500.0])
    with torch.no_grad():
        assert rel_err(ours(x, t, ctx), d(x, t, ctx).sample) <= 1e-4
    del d, ours
    dv = DVAE(**{k: v for k, v in cfg.vae.to_diffusers().items() if not k.startswith("_")}).eval()
    vae = AutoencoderKL(cfg.vae).eval()
    vae.load_state_dict(dv.state_dict(), strict=True)
    z = torch.randn(1, 4, 64, 64, generator=g)
    with torch.no_grad():
        assert rel_err(vae.decode(z), dv.decode(z).sample) <= 1e-4
