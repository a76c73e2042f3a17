"""Frozen model configs (the full-size presets of each family are rows of families.py).

Field names follow diffusers' config.json where one exists, so a diffusers config maps onto these
dataclasses with `from_diffusers`. Everything the models need is here; nothing is read at run time.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def _tuple(v, n: int) -> tuple:
    """A per-level setting given either once (int) or per level (list) -> tuple of length n."""
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


FASTLDM_JSON = "fastldm.json"  # a diffusers folder's fastldm-only settings (diffusers ignores the file)

@dataclass(frozen=True)
class CLIPConfig:
    """CLIP text transformer (transformers' CLIPTextModel / CLIPTextModelWithProjection)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"          # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP)
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None       # set for CLIPTextModelWithProjection (SDXL's second encoder)
    eos_token_id: int = 49407               # pooled token = first eos; 2 (legacy configs) = argmax(input_ids)
    pad_token_id: int = 49407               # what the tokenizer pads with: 49407 (SD1, CLIP-L) or 0 (OpenCLIP)

    @classmethod
    def from_diffusers(cls, cfg: dict, projection: bool = False) -> "CLIPConfig":
        keys = {f.name for f in dataclasses.fields(cls)} - {"projection_dim", "pad_token_id"}
        kw = {k: cfg[k] for k in keys if k in cfg}
        if projection:
            kw["projection_dim"] = cfg.get("projection_dim", cfg.get("hidden_size", 768))
        return cls(**kw)

    def to_diffusers(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("pad_token_id",)}
        d["architectures"] = ["CLIPTextModelWithProjection" if self.projection_dim else "CLIPTextModel"]
        d["model_type"] = "clip_text_model"
        if self.projection_dim is None:
            d.pop("projection_dim")
        d["bos_token_id"], d["pad_token_id"] = 0, 1
        return d


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DCondition. Level i of the down path has `layers_per_block[i]` resnets (+ transformers when
    `cross_attn[i]`); the up path mirrors it with one extra resnet per level, as in diffusers.

    `attention_heads` is the number of heads per level (diffusers' misnamed `attention_head_dim`).
    """
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    cross_attn: tuple[bool, ...] = (True, True, True, False)
    attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    mid_block: bool = True
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    addition_time_embed_dim: int | None = None   # SDXL: 256 (six size/crop ids, each embedded)
    projection_class_embeddings_input_dim: int | None = None  # SDXL: pooled text dim + 6 * 256
    time_cond_proj_dim: int | None = None        # LCM-distilled UNets take a guidance embedding
    sample_size: int = 64

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "UNetConfig":
        down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        n = len(down)
        up = cfg.get("up_block_types")
        cross = tuple("CrossAttn" in t for t in down)
        if up is not None and tuple("CrossAttn" in t for t in reversed(up)) != cross:
            raise ValueError("unsupported UNet: up_block_types must mirror down_block_types")
        for k in ("class_embed_type", "encoder_hid_dim", "dual_cross_attention"):
            if cfg.get(k):
                raise ValueError(f"unsupported UNet config: {k}={cfg[k]!r}")
        add = cfg.get("addition_embed_type")
        if add not in (None, "text_time"):
            raise ValueError(f"unsupported UNet config: addition_embed_type={add!r}")
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid_type not in (None, "UNetMidBlock2DCrossAttn"):
            raise ValueError(f"unsupported UNet config: mid_block_type={mid_type!r}")
        return cls(
            in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
            block_out_channels=tuple(cfg.get("block_out_channels", cls.block_out_channels)),
            layers_per_block=_tuple(cfg.get("layers_per_block", 2), n), cross_attn=cross,
            attention_heads=_tuple(heads, n),
            transformer_layers_per_block=_tuple(cfg.get("transformer_layers_per_block", 1), n),
            cross_attention_dim=cfg.get("cross_attention_dim", 768),
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
            upcast_attention=bool(cfg.get("upcast_attention", False)), mid_block=mid_type is not None,
            norm_num_groups=cfg.get("norm_num_groups", 32), norm_eps=cfg.get("norm_eps", 1e-5),
            flip_sin_to_cos=cfg.get("flip_sin_to_cos", True), freq_shift=cfg.get("freq_shift", 0),
            addition_time_embed_dim=cfg.get("addition_time_embed_dim") if add else None,
            projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim") if add else None,
            time_cond_proj_dim=cfg.get("time_cond_proj_dim"), sample_size=cfg.get("sample_size", 64))

    def to_diffusers(self) -> dict:
        return {
            "_class_name": "UNet2DConditionModel", "in_channels": self.in_channels,
            "out_channels": self.out_channels, "block_out_channels": list(self.block_out_channels),
            "layers_per_block": list(self.layers_per_block),
            "down_block_types": ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in self.cross_attn],
            "up_block_types": ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(self.cross_attn)],
            "mid_block_type": "UNetMidBlock2DCrossAttn" if self.mid_block else None,
            "attention_head_dim": list(self.attention_heads),
            "transformer_layers_per_block": list(self.transformer_layers_per_block),
            "cross_attention_dim": self.cross_attention_dim,
            "use_linear_projection": self.use_linear_projection, "upcast_attention": self.upcast_attention,
            "norm_num_groups": self.norm_num_groups, "norm_eps": self.norm_eps,
            "flip_sin_to_cos": self.flip_sin_to_cos, "freq_shift": self.freq_shift,
            "addition_embed_type": "text_time" if self.addition_time_embed_dim else None,
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
            "time_cond_proj_dim": self.time_cond_proj_dim, "sample_size": self.sample_size,
            "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1,
            "mid_block_scale_factor": 1, "only_cross_attention": False, "resnet_time_scale_shift": "default",
        }


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL. `in_channels`/`out_channels` are 3 for RGB, 4 for LDM3D-4c (RGB + depth) and 6 for
    the original LDM3D (RGB + 16-bit depth packed into two 8-bit channels + one spare)."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "VAEConfig":
        keys = {f.name for f in dataclasses.fields(cls)}
        kw = {k: cfg[k] for k in keys if k in cfg}
        if "block_out_channels" in kw:
            kw["block_out_channels"] = tuple(kw["block_out_channels"])
        return cls(**kw)

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        return dataclasses.asdict(self) | {
            "_class_name": "AutoencoderKL", "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "act_fn": "silu"}


# The DDPM noise schedule every SD checkpoint was trained with (scheduler_config.json of SD 1.5/2.x/XL).
SD_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading", "clip_sample": False,
    "set_alpha_to_one": False,
}


@dataclass(frozen=True)
class ModelConfig:
    """A whole text-to-image model: which networks it has and how they are wired."""
    family: str                              # "sd1", "sd2", "sdxl", "ldm3d", "custom"
    text_encoder: CLIPConfig
    unet: UNetConfig
    vae: VAEConfig
    text_encoder_2: CLIPConfig | None = None
    clip_layer: int = -1                     # -1: last hidden state; -2: penultimate (SD2, SDXL)
    scheduler: dict = field(default_factory=lambda: dict(SD_SCHEDULER))
    default_size: int = 512
    default_guidance: float = 7.5            # CFG scale when a request gives none (a folder's fastldm.json)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.get("prediction_type", "epsilon")

    @property
    def rgbd(self) -> bool:
        return self.vae.out_channels in (4, 6)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
