"""Our CLIP, UNet and VAE against transformers/diffusers on the same weights and fresh random inputs.

Tolerances: fp32 max relative error <= 1e-4 (the two implementations order float ops differently; the
observed error is ~1e-6). bf16: our error against the fp32 reference must be within 2x of the reference
implementation's own bf16 error (the flash-attn rule, DESIGN rule 6).
"""
from __future__ import annotations

import pytest
import torch

from conftest import UNET_CASES, clip_state_dict, diffusers_unet, diffusers_vae, hf_clip, rel_err
from fastldm.config import CLIPConfig, UNetConfig, VAEConfig
from fastldm.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel


def ours_unet(d):
    m = UNet2DConditionModel(UNetConfig.from_diffusers(dict(d.config))).eval()
    m.load_state_dict(d.state_dict(), strict=True)
    return m


def unet_inputs(case: str, h: int, w: int, g: torch.Generator, batch: int = 2):
    kw = UNET_CASES[case]
    x = torch.randn(batch, kw.get("in_channels", 4), h, w, generator=g)
    t = torch.rand(batch, generator=g) * 999
    ctx = torch.randn(batch, 7, kw["cross_attention_dim"], generator=g)
    extra = {}
    if kw.get("addition_embed_type"):
        extra = dict(text_embeds=torch.randn(batch, 16, generator=g),
                     time_ids=torch.tensor([[64.0, 48.0, 0.0, 0.0, 64.0, 48.0]]).repeat(batch, 1))
    if kw.get("time_cond_proj_dim"):
        extra = dict(timestep_cond=torch.randn(batch, kw["time_cond_proj_dim"], generator=g))
    return x, t, ctx, extra


def diffusers_call(d, x, t, ctx, extra):
    kw = dict(extra)
    added = {k: kw.pop(k) for k in ("text_embeds", "time_ids") if k in kw}
    return d(x, t, ctx, added_cond_kwargs=added or None, **kw).sample


@pytest.mark.parametrize("case", list(UNET_CASES))
@pytest.mark.parametrize("hw", [(8, 8), (12, 20), (9, 7)])  # 9x7: not a multiple of 2^levels
def test_unet_fp32_matches_diffusers(case, hw, rng):
    d = diffusers_unet(case)
    m = ours_unet(d)
    x, t, ctx, extra = unet_inputs(case, *hw, rng)
    with torch.no_grad():
        ref = diffusers_call(d, x, t, ctx, extra)
        out = m(x, t, ctx, **extra)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("case", ["sd1", "sdxl"])
def test_unet_bf16_within_2x_of_diffusers_bf16(case, rng):
    d = diffusers_unet(case)
    m = ours_unet(d)
    x, t, ctx, extra = unet_inputs(case, 8, 8, rng)
    with torch.no_grad():
        ref = diffusers_call(d, x, t, ctx, extra)
        d16, m16 = d.to(torch.bfloat16), m.to(torch.bfloat16)
        lowp = {k: v.bfloat16() for k, v in extra.items()}
        ref16 = diffusers_call(d16, x.bfloat16(), t, ctx.bfloat16(), lowp)
        out16 = m16(x.bfloat16(), t, ctx.bfloat16(), **lowp)
    assert out16.dtype == torch.bfloat16
    assert (out16.float() - ref).abs().max() <= 2 * (ref16.float() - ref).abs().max() + 1e-6


def test_unet_channels_last_same_result(rng):
    m = ours_unet(diffusers_unet("sd1"))
    x, t, ctx, _ = unet_inputs("sd1", 8, 12, rng)
    with torch.no_grad():
        ref = m(x, t, ctx)
        out = m.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, ctx)
    assert rel_err(out, ref) <= 1e-5


def test_unet_sdxl_requires_added_conditioning(rng):
    m = ours_unet(diffusers_unet("sdxl"))
    x, t, ctx, _ = unet_inputs("sdxl", 8, 8, rng)
    with pytest.raises(ValueError, match="text_embeds and time_ids"):
        m(x, t, ctx)


@pytest.mark.parametrize("channels", [3, 4, 6])  # RGB, LDM3D-4c (RGB + depth), LDM3D (RGB + packed depth)
@pytest.mark.parametrize("levels", [2, 3])
def test_vae_matches_diffusers(channels, levels, rng):
    d = diffusers_vae(channels, levels)
    m = AutoencoderKL(VAEConfig.from_diffusers(dict(d.config))).eval()
    m.load_state_dict(d.state_dict(), strict=True)
    x = torch.rand(2, channels, 24, 16, generator=rng) * 2 - 1
    z = torch.randn(2, 4, 5, 3, generator=rng)
    with torch.no_grad():
        dist = d.encode(x).latent_dist
        mean, logvar = m.encode(x)
        ref_img, img = d.decode(z).sample, m.decode(z)
    assert rel_err(mean, dist.mean) <= 1e-4 and rel_err(logvar, dist.logvar) <= 1e-4
    assert img.shape == ref_img.shape and rel_err(img, ref_img) <= 1e-4


def test_vae_scaling_roundtrip():
    c = VAEConfig(block_out_channels=(32, 64), norm_num_groups=8, scaling_factor=0.5, shift_factor=0.1)
    m = AutoencoderKL(c)
    z = torch.randn(1, 4, 3, 3)
    assert torch.allclose(m.to_unet_latents(z), (z - 0.1) * 0.5)
    assert torch.allclose(m.from_unet_latents(m.to_unet_latents(z)), z, atol=1e-6)


@pytest.mark.parametrize("act,projection,layer", [("quick_gelu", False, -1),  # SD1 / SDXL encoder 1
                                                  ("gelu", False, -1),        # SD2 (OpenCLIP ViT-H)
                                                  ("gelu", True, -2)])        # SDXL encoder 2 (bigG)
def test_clip_matches_transformers(act, projection, layer, rng):
    h = hf_clip(act=act, projection=projection)
    m = CLIPTextModel(CLIPConfig.from_diffusers(h.config.to_dict(), projection=projection)).eval()
    m.load_state_dict(clip_state_dict(h), strict=True)
    ids = torch.randint(3, 990, (2, 77), generator=rng)
    ids[0, 9], ids[1, 30] = 999, 999  # the EOS position (argmax rule of legacy configs)
    with torch.no_grad():
        ref = h(ids, output_hidden_states=True)
        enc = m(ids, layer=layer)
    want = ref.last_hidden_state if layer == -1 else ref.hidden_states[layer]
    assert rel_err(enc.hidden, want) <= 1e-4
    assert rel_err(enc.pooled, ref.text_embeds if projection else ref.pooler_output) <= 1e-4


def test_clip_bf16_within_2x(rng):
    h = hf_clip(act="gelu")
    m = CLIPTextModel(CLIPConfig.from_diffusers(h.config.to_dict())).eval()
    m.load_state_dict(clip_state_dict(h), strict=True)
    ids = torch.randint(3, 999, (2, 77), generator=rng)
    with torch.no_grad():
        ref = h(ids).last_hidden_state
        ref16 = h.to(torch.bfloat16)(ids).last_hidden_state
        out16 = m.to(torch.bfloat16)(ids).hidden
    assert (out16.float() - ref).abs().max() <= 2 * (ref16.float() - ref).abs().max() + 1e-6
