"""Shared fixtures: tiny random models built in code (no downloads), diffusers/transformers as oracles."""
from __future__ import annotations

import os

# Triton decides at import time whether kernels are interpreted; CI has no GPU, so every Triton kernel is
# tested through the interpreter on the CPU. This must happen before anything imports fastldm.ops.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastldm.testing import randomize_, rel_err  # noqa: E402,F401  (re-exported for the test modules)

# diffusers-style UNet configs small enough for CPU tests, one per family feature we must cover.
UNET_CASES = {
    "sd1": dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=16,
                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=24,
                attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sdxl": dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=32,
                 attention_head_dim=(2, 4, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2, 3),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8),
    "inpaint": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
                    attention_head_dim=4, in_channels=9, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "bk-sdm-small": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
                         cross_attention_dim=16, attention_head_dim=4, mid_block_type=None,
                         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "lcm": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
                attention_head_dim=4, time_cond_proj_dim=12, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
}


def diffusers_unet(case: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    return randomize_(UNet2DConditionModel(**UNET_CASES[case]).eval(), seed)


def diffusers_vae(channels: int = 3, levels: int = 2, seed: int = 0):
    from diffusers import AutoencoderKL

    bo = (32, 64, 64)[:levels]
    return randomize_(AutoencoderKL(block_out_channels=bo, norm_num_groups=8, in_channels=channels,
                                    out_channels=channels, latent_channels=4,
                                    down_block_types=("DownEncoderBlock2D",) * levels,
                                    up_block_types=("UpDecoderBlock2D",) * levels).eval(), seed, std=0.08)


def hf_clip(hidden: int = 32, act: str = "quick_gelu", projection: bool = False, layers: int = 3, seed: int = 0,
            vocab: int = 1000):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=hidden * 2 + 5, num_hidden_layers=layers,
                         num_attention_heads=4, vocab_size=vocab, hidden_act=act, projection_dim=hidden // 2 + 4,
                         eos_token_id=2, bos_token_id=0, pad_token_id=1)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    torch.manual_seed(seed)
    return randomize_(cls(cfg).eval(), seed, std=0.1)


def clip_state_dict(hf_model) -> dict[str, torch.Tensor]:
    """transformers state dict -> our canonical names (`text_model.` prefix, no position_ids buffer)."""
    sd = hf_model.state_dict()
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in sd.items() if not k.endswith("position_ids")}


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tiny tensors, restored afterwards: they gain nothing from threads, and
    on a loaded 2-core machine OpenMP's thread hand-offs make each tiny UNet call many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """fastldm's on-disk caches (the measured CPU defaults, compiled graphs) in a folder of this test run, not
    the user's ~/.cache: tests neither read a stale choice nor leave files behind."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


def tiny_diffusers_pipeline(kind: str = "sd1", seed: int = 0):
    """A tiny random diffusers pipeline (SD1-, SDXL- or LDM3D-4c-shaped) whose text encoders take real CLIP ids."""
    import tempfile

    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionLDM3DPipeline, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from transformers import CLIPTokenizer as HFTokenizer

    from fastldm.tokenizer import CLIPTokenizer

    def text_encoder(hidden, cls, s):
        cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden + 5, num_hidden_layers=2,
                             num_attention_heads=4, vocab_size=49408, projection_dim=hidden, hidden_act="gelu"
                             if cls is CLIPTextModelWithProjection else "quick_gelu")
        torch.manual_seed(s)
        return randomize_(cls(cfg).eval(), s, std=0.1)

    tok_dir = tempfile.mkdtemp()
    CLIPTokenizer.bundled().save(tok_dir)
    tok = HFTokenizer.from_pretrained(tok_dir)
    channels = 4 if kind == "ldm3d" else 3
    vae = randomize_(AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=8, latent_channels=4,
                                   in_channels=channels, out_channels=channels,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2).eval(), seed + 1, std=0.05)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    if kind == "sdxl":
        unet_kw = UNET_CASES["sdxl"] | {"projection_class_embeddings_input_dim": 24 + 6 * 8, "sample_size": 8}
        unet = randomize_(UNet2DConditionModel(**unet_kw).eval(), seed, std=0.08)
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder(8, CLIPTextModel, seed + 2), tokenizer=tok,
            text_encoder_2=text_encoder(24, CLIPTextModelWithProjection, seed + 3), tokenizer_2=tok,
            unet=unet, scheduler=sched)
    unet = randomize_(UNet2DConditionModel(**(UNET_CASES["sd1"] | {"cross_attention_dim": 32, "sample_size": 8}))
                      .eval(), seed, std=0.08)
    parts = dict(vae=vae, text_encoder=text_encoder(32, CLIPTextModel, seed + 2), tokenizer=tok, unet=unet,
                 scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if kind == "ldm3d":
        return StableDiffusionLDM3DPipeline(**parts | {"image_encoder": None})
    return StableDiffusionPipeline(**parts)
