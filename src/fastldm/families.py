"""Model families: one row each, holding everything that differs between them (stable-diffusion.cpp keeps
one `SDVersion` the same way). Detection (loading/detect.py for single files, loading/load.py for diffusers
folders) returns a row; loading, key maps, export, `fastldm info` and the pipeline read it. Adding a family
is one row here plus its tests.

A base family fixes the text stack, the VAE and the conventions; variants (inpainting, LCM, pruned) are
properties of the UNet that any base family can have, read from the UNet config.

    row        text encoders (single-file layout)            heads      prediction  size  extras
    sd1        CLIP-L (cond_stage_model.transformer)         8          epsilon     512
    sd2        OpenCLIP-H (cond_stage_model.model), -1 block  ch // 64   epsilon     512
    sd2-v      as sd2, attention upcast                      ch // 64   v           768
    sdxl       CLIP-L + OpenCLIP-bigG (conditioner)          ch // 64   epsilon     1024  time ids, zero empty neg.
    ldm3d-4c   as sd1; VAE RGB + depth                       8          epsilon     512   depth = channel 3
    ldm3d      as sd1; VAE RGB + 16-bit depth in 2 channels  8          epsilon     512   depth = G·256 + B
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping

from .config import SD_SCHEDULER, CLIPConfig, ModelConfig, UNetConfig, VAEConfig

if TYPE_CHECKING:
    import torch

CLIP_PAD, OPENCLIP_PAD = 49407, 0   # what each tokenizer pads with: <|endoftext|> (OpenAI CLIP) or "!" (OpenCLIP)

CLIP_L = CLIPConfig()
OPENCLIP_H = CLIPConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                        hidden_act="gelu", pad_token_id=OPENCLIP_PAD)
OPENCLIP_BIGG = CLIPConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           hidden_act="gelu", projection_dim=1280, pad_token_id=OPENCLIP_PAD)
_SD2_UNET = UNetConfig(attention_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
_SDXL_UNET = UNetConfig(block_out_channels=(320, 640, 1280), layers_per_block=(2, 2, 2),
                        cross_attn=(False, True, True), attention_heads=(5, 10, 20),
                        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
                        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128)

# Where single-file checkpoints keep the text encoders: component -> (format, key prefix).
_CLIP_LAYOUT = MappingProxyType({"text_encoder": ("clip", "cond_stage_model.transformer.")})
_OPENCLIP_LAYOUT = MappingProxyType({"text_encoder": ("openclip", "cond_stage_model.model.")})
_SDXL_LAYOUT = MappingProxyType({"text_encoder": ("clip", "conditioner.embedders.0.transformer."),
                                 "text_encoder_2": ("openclip", "conditioner.embedders.1.model.")})


@dataclass(frozen=True)
class Family:
    name: str
    stack: str                      # ModelConfig.family: the text stack rows share ("sd1", "sd2", "sdxl", "ldm3d")
    preset: ModelConfig             # the full-size config; detection replaces what shapes tell
    text_layout: Mapping[str, tuple[str, str]]
    heads: int | None               # attention heads at every UNet level; None: channels // 64 (OpenCLIP models)
    prediction: str                 # what a checkpoint that does not say is trained for
    vae_channels: int = 3           # image channels of the VAE (RGB, RGB + depth, RGB + packed 16-bit depth)
    drop_text_layers: int = 0       # final text-encoder blocks the checkpoint holds but the model skips (SD2)
    time_ids: bool = False          # SDXL's size/crop conditioning as UNet inputs
    zero_empty_negative: bool = False  # an empty negative prompt is a zero embedding (SDXL force_zeros_for_empty_prompt)
    pipeline_class: str = "StableDiffusionPipeline"   # diffusers' pipeline for folders we write
    vae_upcast: bool = False        # an fp16 pipeline decodes in fp32 if the VAE says force_upcast (see vae_dtype)
    stack_default: bool = True      # the row of its stack that a checkpoint saying nothing else is
    prediction_hint: Callable[[Mapping], str | None] | None = None   # a prediction type from checkpoint metadata

    def unet_heads(self, channels: tuple[int, ...]) -> tuple[int, ...]:
        """Heads per UNet level (shapes hold only heads · head_dim)."""
        return tuple(self.heads or max(1, c // 64) for c in channels)

    def ignored_prefixes(self, config: ModelConfig) -> tuple[str, ...]:
        """Single-file tensors under this family's prefixes that no model reads, by design: SD2 keeps 23 of
        OpenCLIP-H's 24 blocks ("penultimate" layer, diffusers' SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) and no
        projection."""
        if not self.drop_text_layers:
            return ()
        p = self.text_layout["text_encoder"][1]
        return (f"{p}transformer.resblocks.{config.text_encoder.num_hidden_layers}.", f"{p}text_projection")

    def depth(self, raw):
        """Decoded images (B, H, W, C) float in [0, 1] -> uint16 depth maps (B, H, W), or None for RGB models."""
        import numpy as np

        if self.vae_channels == 4:      # LDM3D-4c: one depth channel
            return (raw[..., 3] * 65535.0).astype(np.uint16)
        if self.vae_channels == 6:      # original LDM3D: 16-bit depth packed as G * 256 + B of an RGB-like image
            q = (raw[..., 3:] * 255).round().astype(np.uint16)
            return q[..., 1] * 256 + q[..., 2]
        return None


_SD1 = ModelConfig("sd1", CLIP_L, UNetConfig(), VAEConfig())
_SD2 = ModelConfig("sd2", OPENCLIP_H, _SD2_UNET, VAEConfig())
FAMILIES: tuple[Family, ...] = (
    Family("sd1", "sd1", _SD1, _CLIP_LAYOUT, 8, "epsilon"),
    # SD 2.0-base and 2.1-base; a checkpoint that does not say is 2.0-v/2.1 (768, v), as diffusers assumes. Only
    # .ckpt files carry `global_step`; 875000 is 2.0-base's (diffusers' rule).
    Family("sd2", "sd2", _SD2, _OPENCLIP_LAYOUT, None, "epsilon", drop_text_layers=1, stack_default=False,
           prediction_hint=lambda meta: "epsilon" if str(meta.get("global_step", "")) == "875000" else None),
    Family("sd2-v", "sd2", dataclasses.replace(
        _SD2, unet=dataclasses.replace(_SD2_UNET, upcast_attention=True, sample_size=96),
        scheduler=SD_SCHEDULER | {"prediction_type": "v_prediction"}, default_size=768),
        _OPENCLIP_LAYOUT, None, "v_prediction", drop_text_layers=1),
    Family("sdxl", "sdxl", ModelConfig("sdxl", CLIP_L, _SDXL_UNET, VAEConfig(scaling_factor=0.13025, sample_size=1024),
                                       text_encoder_2=OPENCLIP_BIGG, clip_layer=-2, default_size=1024),
           _SDXL_LAYOUT, None, "epsilon", time_ids=True, zero_empty_negative=True,
           pipeline_class="StableDiffusionXLPipeline", vae_upcast=True),
    Family("ldm3d-4c", "ldm3d", dataclasses.replace(_SD1, family="ldm3d", vae=VAEConfig(in_channels=4, out_channels=4)),
           _CLIP_LAYOUT, 8, "epsilon", vae_channels=4, pipeline_class="StableDiffusionLDM3DPipeline"),
    Family("ldm3d", "ldm3d", dataclasses.replace(_SD1, family="ldm3d", vae=VAEConfig(in_channels=6, out_channels=6)),
           _CLIP_LAYOUT, 8, "epsilon", vae_channels=6, pipeline_class="StableDiffusionLDM3DPipeline"),
)
PRESETS: Mapping[str, ModelConfig] = MappingProxyType({f.name: f.preset for f in FAMILIES})
DETECT_ORDER = ("sdxl", "sd2", "sd1")   # single-file text layouts, most specific first (SDXL also holds CLIP-L)


def family(name: str) -> Family:
    """The row called `name`."""
    for f in FAMILIES:
        if f.name == name:
            return f
    raise KeyError(f"no model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def family_of(config: ModelConfig) -> Family:
    """The row a config belongs to: its text stack, and within it the prediction type (sd2 / sd2-v) or the
    VAE's image channels (ldm3d-4c / ldm3d). Custom configs get the row of their stack."""
    rows = [f for f in FAMILIES if f.stack == config.family] or [family("sd1")]
    for f in rows:
        if f.vae_channels == config.vae.out_channels and f.prediction == config.prediction_type:
            return f
    return next((f for f in rows if f.vae_channels == config.vae.out_channels), rows[0])


def vae_dtype(config: ModelConfig, compute: torch.dtype) -> torch.dtype:
    """The dtype a pipeline computing in `compute` runs its VAE in: fp32 where the VAE's config says
    `force_upcast` and the family's row upcasts (SDXL: its VAE overflows fp16, and diffusers' SDXL pipeline
    upcasts it too), else `compute`. diffusers' SD 1.x/2.x and LDM3D pipelines decode in fp16 whatever the flag
    says (their VAE configs predate it and take its default, True); fastldm does the same, and decodes again in
    fp32 an image whose fp16 decode overflowed (Pipeline.decode)."""
    import torch  # here, not at the top: this table is read by commands that never load a model

    if compute == torch.float16 and config.vae.force_upcast and family_of(config).vae_upcast:
        return torch.float32
    return compute


def text_layout(stack: str) -> Mapping[str, tuple[str, str]]:
    """The single-file text-encoder layout of a text stack."""
    return stack_default(stack).text_layout


def stack_default(stack: str, vae_channels: int = 3) -> Family:
    """The row of a text stack that a checkpoint which says nothing more is (sd2 -> sd2-v, as diffusers)."""
    rows = [f for f in FAMILIES if f.stack == stack]
    if not rows:
        raise KeyError(f"no model family with text stack {stack!r}; known: {', '.join(DETECT_ORDER)}, ldm3d")
    return next((f for f in rows if f.stack_default and f.vae_channels == vae_channels),
                next((f for f in rows if f.stack_default), rows[0]))


@dataclass(frozen=True)
class Variant:
    """A property of the UNet any base family can have."""
    name: str
    matches: Callable[[UNetConfig], bool]
    description: str
    image_channels: int = 0         # extra UNet input channels: the mask and the masked image's latents


VARIANTS: tuple[Variant, ...] = (
    Variant("inpainting", lambda u: u.in_channels == 2 * u.out_channels + 1,
            "UNet input = latents + mask + masked-image latents (txt2img and img2img use a full mask)",
            image_channels=5),
    Variant("lcm", lambda u: u.time_cond_proj_dim is not None,
            "latent consistency distilled: guidance enters as an embedding, no CFG batch; use the LCM sampler, 2-8 "
            "steps"),
    Variant("pruned", lambda u: not u.mid_block,
            "architecturally compressed, no mid block (BK-SDM, small/tiny SD): widths and depths read from the "
            "weights"),
)


def variants_of(config: ModelConfig) -> tuple[Variant, ...]:
    return tuple(v for v in VARIANTS if v.matches(config.unet))
