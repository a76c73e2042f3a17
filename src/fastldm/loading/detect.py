"""Which model a single-file checkpoint holds, and its whole config, from tensor names and shapes only.

No tensor data is read (DESIGN rule 5; sd.cpp `detect_from_weights` does the same). Detection ends in a row
of families.py; what shapes cannot tell comes from that row (its preset, head rule, prediction convention):

- family: the text-encoder layout. `cond_stage_model.transformer.*` (OpenAI CLIP, transformers names) ->
  sd1, or ldm3d when the VAE has 4 or 6 image channels (RGB + depth); `cond_stage_model.model.*`
  (OpenCLIP) -> sd2; `conditioner.embedders.{0 CLIP-L, 1 OpenCLIP-bigG}` -> sdxl. Inpainting (9-channel
  UNet input) and LCM (`time_embedding.cond_proj`) are variants of any family, read from the UNet.
- attention heads: shapes hold only heads * head_dim. OpenAI-CLIP families (sd1, ldm3d) use 8 heads at
  every level; OpenCLIP families (sd2, sdxl) use head dim 64, so heads = channels // 64 (at least 1).
  CLIP text encoders: heads = width // 64 (CLIP-L 12, OpenCLIP-H 16, bigG 20).
- activation: OpenAI CLIP quick_gelu, OpenCLIP gelu. SD2 drops OpenCLIP-H's last block (24 -> 23 layers,
  the "penultimate" output with the final norm); SDXL keeps all and reads hidden_states[-2].
- prediction type, first rule that applies: the caller's `prediction_type`; a `v_pred` marker tensor
  (ComfyUI); metadata `modelspec.prediction_type` ("v"/"v_prediction"/"velocity" or "epsilon");
  metadata `modelspec.architecture` ending in "-v" (v) or "stable-diffusion-v2-512" (epsilon); kohya's
  `ss_v_parameterization`; for SD2 only, `global_step` == 875000 -> epsilon (diffusers' rule; only .ckpt
  files carry it, pass it in `metadata`). Otherwise SD2 is v_prediction at 768 px (the 2.0-v/2.1 models,
  as in diffusers), everything else epsilon. SD2 epsilon means the 512-base preset (no attention upcast).
  A `ztsnr` marker adds `rescale_betas_zero_snr: True` to the scheduler.
- never from shapes: norm groups/eps, VAE scaling factor, upcast_attention, tokenizer ids, sample sizes.
"""
from __future__ import annotations

import dataclasses
import re

from ..config import CLIPConfig, ModelConfig, UNetConfig, VAEConfig
from ..errors import SettingError
from ..families import DETECT_ORDER, FAMILIES, Family, family_of, stack_default, text_layout
from .keymaps import (UNET_PREFIX, VAE_PREFIXES, UnknownCheckpointError, is_ignored,
                      ldm_to_ours)

Shapes = dict[str, tuple[int, ...]]
_V = {"v", "v_prediction", "v-prediction", "velocity"}
_EPS = {"epsilon", "eps"}


def _sub(shapes: Shapes, prefix: str) -> Shapes:
    n = len(prefix)
    return {k[n:]: tuple(s) for k, s in shapes.items() if k.startswith(prefix)}


def _has(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _count(s: Shapes, pattern: str) -> int:
    """How many consecutive i from 0 have `pattern.format(i)` in s."""
    i = 0
    while pattern.format(i) in s:
        i += 1
    return i


def _need(s: Shapes, where: str, *keys: str) -> None:
    missing = [k for k in keys if k not in s]
    if missing:
        raise UnknownCheckpointError(f"incomplete {where}: tensor {missing[0]!r} is missing; the checkpoint "
                                     f"is truncated or of another architecture")


def _heads64(width: int) -> int:
    return max(1, width // 64)


# ---- UNet -------------------------------------------------------------------------------------------------

def _block(s: Shapes, b: str) -> tuple[int, int]:
    """(resnet output channels, transformer depth or 0) of input/output block `b`: resnet in slot 0,
    SpatialTransformer in slot 1."""
    return s[f"{b}.0.in_layers.2.weight"][0], _count(s, b + ".1.transformer_blocks.{}.attn1.to_q.weight")


def _no_stray(s: Shapes, prefix: str) -> None:
    stray = next((k for k in s if k.startswith(prefix)), None)
    if stray:
        raise UnknownCheckpointError(f"unsupported UNet: unrecognised block {stray!r}")


def _down_levels(s: Shapes) -> list[list[tuple[int, int]]]:
    """input_blocks.1, 2, ...: a level's blocks, then one holding only its downsampler (`0.op`)."""
    levels, n = [[]], 1
    while True:
        if f"input_blocks.{n}.0.op.weight" in s:
            levels.append([])
        elif f"input_blocks.{n}.0.in_layers.2.weight" in s:
            levels[-1].append(_block(s, f"input_blocks.{n}"))
        else:
            break
        n += 1
    _no_stray(s, f"input_blocks.{n}.")
    return levels


def _up_levels(s: Shapes) -> list[list[tuple[int, int]]]:
    """output_blocks.0, 1, ...: a level's blocks, the last also holding its upsampler (slot 1, or 2 behind a
    transformer)."""
    levels, n = [[]], 0
    while f"output_blocks.{n}.0.in_layers.2.weight" in s:
        levels[-1].append(_block(s, f"output_blocks.{n}"))
        if f"output_blocks.{n}.1.conv.weight" in s or f"output_blocks.{n}.2.conv.weight" in s:
            levels.append([])
        n += 1
    _no_stray(s, f"output_blocks.{n}.")
    return levels


def _unet_config(s: Shapes, base: UNetConfig, row: Family, pooled_dim: int | None) -> UNetConfig:
    _need(s, "UNet", "input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight")
    c0, in_ch = s["input_blocks.0.0.weight"][:2]
    if s["time_embed.0.weight"] != (4 * c0, c0):
        raise UnknownCheckpointError(f"unsupported UNet: time embedding {s['time_embed.0.weight']} is not "
                                     f"4 x {c0} channels wide")
    if _has(s, "label_emb.") and (not row.time_ids or "label_emb.0.0.weight" not in s):
        raise UnknownCheckpointError("unsupported UNet: class-conditioned (label_emb; an upscaler or unCLIP "
                                     "model); fastldm runs text-to-image SD1/SD2/SDXL/LDM3D")
    down, up = _down_levels(s), _up_levels(s)
    L = len(down)
    if any(not lv for lv in down) or len(up) != L:
        raise UnknownCheckpointError(f"unsupported UNet: {L} down levels but {len(up)} up levels")
    for i, lv in enumerate(down):
        if len(set(lv)) != 1:
            raise UnknownCheckpointError(f"unsupported UNet: down_blocks.{i} mixes widths or transformer depths "
                                         f"{lv} (channels, depth)")
        mirror = up[L - 1 - i]
        if len(mirror) != len(lv) + 1:
            raise UnknownCheckpointError(
                f"unsupported UNet: up_blocks.{L - 1 - i} has {len(mirror)} resnets but down_blocks.{i} has "
                f"{len(lv)}; fastldm (like diffusers) needs exactly one more on the way up")
        if set(mirror) != set(lv):
            raise UnknownCheckpointError(f"unsupported UNet: up_blocks.{L - 1 - i} {mirror} does not mirror "
                                         f"down_blocks.{i} {lv} (channels, transformer depth)")
    ch, attn_depth = zip(*(lv[0] for lv in down))
    depth = [d or 1 for d in attn_depth]  # levels without attention: 1, as diffusers' default
    mid = "middle_block.0.in_layers.2.weight" in s
    if mid:
        _need(s, "UNet mid block", "middle_block.1.proj_in.weight", "middle_block.2.in_layers.2.weight")
        mid_depth = _count(s, "middle_block.1.transformer_blocks.{}.attn1.to_q.weight")
        if attn_depth[-1] not in (0, mid_depth):
            raise UnknownCheckpointError(f"unsupported UNet: mid block has {mid_depth} transformer layers, the "
                                         f"last level {attn_depth[-1]}")
        depth[-1] = mid_depth  # the mid block uses the last level's setting
    elif _has(s, "middle_block."):
        raise UnknownCheckpointError("unsupported UNet: mid block without the resnet-transformer-resnet layout")
    attn = next((k[:-len(".proj_in.weight")] for k in s if k.endswith(".proj_in.weight")), None)
    if attn is None:
        raise UnknownCheckpointError("unsupported UNet: no cross-attention anywhere")
    _need(s, "UNet", f"{attn}.transformer_blocks.0.attn2.to_k.weight")
    add_dim = proj_dim = None
    if row.time_ids:
        _need(s, "SDXL UNet", "label_emb.0.0.weight")
        proj_dim = s["label_emb.0.0.weight"][1]
        add_dim, rest = divmod(proj_dim - (pooled_dim or 0), 6)
        if rest or add_dim <= 0:
            raise UnknownCheckpointError(f"unsupported SDXL UNet: add embedding takes {proj_dim} inputs, not the "
                                         f"pooled text ({pooled_dim}) + 6 time ids of equal width")
    cond = s.get("time_embedding.cond_proj.weight")
    return dataclasses.replace(
        base, in_channels=in_ch, out_channels=s["out.2.weight"][0], block_out_channels=ch,
        layers_per_block=tuple(len(lv) for lv in down), cross_attn=tuple(d > 0 for d in attn_depth),
        attention_heads=row.unet_heads(ch),
        transformer_layers_per_block=tuple(depth),
        cross_attention_dim=s[f"{attn}.transformer_blocks.0.attn2.to_k.weight"][1],
        use_linear_projection=len(s[f"{attn}.proj_in.weight"]) == 2, mid_block=mid,
        addition_time_embed_dim=add_dim, projection_class_embeddings_input_dim=proj_dim,
        time_cond_proj_dim=cond[1] if cond else None)


# ---- VAE ---------------------------------------------------------------------------------------------------

def _vae_config(s: Shapes, base: VAEConfig) -> VAEConfig:
    _need(s, "VAE", "encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight")
    L = _count(s, "encoder.down.{}.block.0.conv1.weight")
    n = _count(s, "encoder.down.0.block.{}.conv1.weight")
    ch = tuple(s[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(L))
    for i in range(L):
        if (_count(s, f"encoder.down.{i}.block.{{}}.conv1.weight") != n
                or _count(s, f"decoder.up.{i}.block.{{}}.conv1.weight") != n + 1
                or s.get(f"decoder.up.{i}.block.0.conv1.weight", (0,))[0] != ch[i]):
            raise UnknownCheckpointError(f"unsupported VAE: level {i} is not {n} encoder / {n + 1} decoder "
                                         f"resnets of {ch[i]} channels")
    in_ch, out_ch = s["encoder.conv_in.weight"][1], s["decoder.conv_out.weight"][0]
    if in_ch != out_ch or in_ch not in (3, 4, 6):
        raise UnknownCheckpointError(f"unsupported VAE: {in_ch} input / {out_ch} output channels (expected 3 "
                                     f"for RGB, or 4 or 6 for LDM3D's RGB + depth)")
    return dataclasses.replace(base, in_channels=in_ch, out_channels=out_ch,
                               latent_channels=s["decoder.conv_in.weight"][1], block_out_channels=ch,
                               layers_per_block=n, mid_block_add_attention="encoder.mid.attn_1.q.weight" in s)


# ---- text encoders -----------------------------------------------------------------------------------------

def _clip_config(s: Shapes, base: CLIPConfig) -> CLIPConfig:
    """transformers names (prefix stripped, with or without `text_model.`)."""
    s = _sub(s, "text_model.") or s
    _need(s, "CLIP text encoder", "embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
          "encoder.layers.0.mlp.fc1.weight")
    vocab, width = s["embeddings.token_embedding.weight"]
    return dataclasses.replace(
        base, vocab_size=vocab, hidden_size=width, intermediate_size=s["encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=_count(s, "encoder.layers.{}.mlp.fc1.weight"), num_attention_heads=_heads64(width),
        max_position_embeddings=s["embeddings.position_embedding.weight"][0], hidden_act="quick_gelu",
        projection_dim=None)


def _openclip_config(s: Shapes, base: CLIPConfig, drop_last: int, projection: bool) -> CLIPConfig:
    _need(s, "OpenCLIP text encoder", "token_embedding.weight", "positional_embedding",
          "transformer.resblocks.0.mlp.c_fc.weight", *(["text_projection"] if projection else []))
    vocab, width = s["token_embedding.weight"]
    blocks = _count(s, "transformer.resblocks.{}.mlp.c_fc.weight")
    return dataclasses.replace(
        base, vocab_size=vocab, hidden_size=width, intermediate_size=s["transformer.resblocks.0.mlp.c_fc.weight"][0],
        num_hidden_layers=blocks - drop_last, num_attention_heads=_heads64(width),
        max_position_embeddings=s["positional_embedding"][0], hidden_act="gelu",
        projection_dim=s["text_projection"][1] if projection else None)


# ---- the whole checkpoint ----------------------------------------------------------------------------------

def _prediction_type(stack: str, shapes: Shapes, meta: dict, override: str | None) -> str:
    """The rules in the module docstring, in order; the last two are the family's (families.py)."""
    if override is not None:
        if override not in ("epsilon", "v_prediction"):
            raise SettingError(f"prediction_type must be 'epsilon' or 'v_prediction', not {override!r}")
        return override
    if "v_pred" in shapes:
        return "v_prediction"
    hint = str(meta.get("modelspec.prediction_type", "")).lower()
    if hint in _V | _EPS:
        return "v_prediction" if hint in _V else "epsilon"
    arch = str(meta.get("modelspec.architecture", "")).split("/")[0]
    if arch.endswith("-v"):
        return "v_prediction"
    if arch == "stable-diffusion-v2-512":
        return "epsilon"
    if str(meta.get("ss_v_parameterization", "")).lower() == "true":
        return "v_prediction"
    hints = (f.prediction_hint(meta) for f in FAMILIES if f.stack == stack and f.prediction_hint is not None)
    return next((h for h in hints if h is not None), stack_default(stack).prediction)


def _not_a_checkpoint(shapes: Shapes) -> UnknownCheckpointError:
    keys = sorted(shapes)
    if any(k.startswith("lora_") or ".lora_" in k or "lora_down" in k for k in keys):
        what = "a LoRA, not a checkpoint; load a base model and apply the LoRA to it"
    elif _has(shapes, "down_blocks.") or _has(shapes, "unet.") or _has(shapes, "encoder.down."):
        what = "diffusers-format or single-component weights; load the diffusers folder instead"
    else:
        what = "no known layout; give an SD1/SD2/SDXL/LDM3D checkpoint"
    found = f"{len(keys)} tensors, e.g. {', '.join(keys[:2])}" if keys else "no tensors"
    return UnknownCheckpointError(f"not a single-file Stable Diffusion checkpoint ({found}): {what}")


def _family(shapes: Shapes) -> str:
    if not _has(shapes, UNET_PREFIX):
        raise _not_a_checkpoint(shapes)
    if any(k.startswith(("edm_mean", "edm_std", "edm_vpred.")) for k in shapes):
        raise UnknownCheckpointError("unsupported checkpoint: EDM-parameterized SDXL (Playground v2.5 / "
                                     "edm_vpred markers); fastldm runs DDPM-trained models")
    if _has(shapes, "conditioner.embedders.0.model."):
        raise UnknownCheckpointError("unsupported checkpoint: SDXL refiner (OpenCLIP-bigG only, no CLIP-L); "
                                     "give an SDXL base checkpoint")
    for stack in DETECT_ORDER:
        if all(_has(shapes, p) for _, p in text_layout(stack).values()):
            return stack
    found = sorted({m[0] for k in shapes if (m := re.match(r"(cond_stage_model|conditioner)\.\w+\.\w+", k))})
    raise UnknownCheckpointError(
        f"checkpoint has a UNet but no known text encoder (found {', '.join(found) or 'none'}; expected "
        f"cond_stage_model.transformer.*, cond_stage_model.model.* or conditioner.embedders.0/1.*)")


def detect_single_file(shapes: dict[str, tuple[int, ...]], metadata: dict | None = None,
                       prediction_type: str | None = None) -> ModelConfig:
    """The ModelConfig of a single-file checkpoint from {tensor name: shape} and its metadata (safetensors
    `__metadata__`, or {"global_step": n} from a .ckpt). `prediction_type` overrides the guess (and picks
    SD2's 512/768 preset). Raises UnknownCheckpointError, naming what was found, for anything else."""
    shapes = {k: tuple(v) for k, v in shapes.items()}
    meta = metadata or {}
    layout_stack = _family(shapes)
    vae_p = next((p for p in VAE_PREFIXES if f"{p}decoder.conv_in.weight" in shapes), None)
    if vae_p is None:
        raise UnknownCheckpointError(f"checkpoint has a UNet and a {layout_stack} text encoder but no VAE "
                                     f"(first_stage_model.*); pick a full checkpoint, not a UNet-only one")
    vae_s = _sub(shapes, vae_p)
    row, pred = _row(layout_stack, vae_s, shapes, meta, prediction_type)
    preset = row.preset
    te = {}
    for comp, (fmt, prefix) in row.text_layout.items():
        base = getattr(preset, comp)
        te[comp] = (_clip_config(_sub(shapes, prefix), base) if fmt == "clip" else
                    _openclip_config(_sub(shapes, prefix), base, row.drop_text_layers, base.projection_dim is not None))
    te2 = te.get("text_encoder_2")
    unet = _unet_config(_sub(shapes, UNET_PREFIX), preset.unet, row, te2 and te2.projection_dim)
    scheduler = preset.scheduler | {"prediction_type": pred}
    if "ztsnr" in shapes:
        scheduler["rescale_betas_zero_snr"] = True
    config = dataclasses.replace(preset, text_encoder=te["text_encoder"], text_encoder_2=te2, unet=unet,
                                 vae=_vae_config(vae_s, preset.vae), scheduler=scheduler)
    _check_covered(config, shapes, vae_p)
    return config


def _row(layout_stack: str, vae_s: Shapes, shapes: Shapes, meta: dict, override: str | None
         ) -> tuple[Family, str]:
    """(The family row, the prediction type): among the rows sharing the text layout found, the one with the
    VAE's image channels (sd1 / ldm3d-4c / ldm3d), then the checkpoint's prediction type (sd2 / sd2-v), else
    its stack's default."""
    layout = text_layout(layout_stack)
    channels = vae_s.get("encoder.conv_in.weight", (0, 3))[1]
    rows = [f for f in FAMILIES if f.text_layout == layout and f.vae_channels == channels]
    if not rows:
        raise UnknownCheckpointError(f"unsupported VAE: {channels} image channels with a {layout_stack} text encoder "
                                     f"(expected 3 for RGB, or 4 or 6 for LDM3D's RGB + depth)")
    pred = _prediction_type(rows[0].stack, shapes, meta, override)
    return next((f for f in rows if f.prediction == pred), stack_default(rows[0].stack, channels)), pred


def _check_covered(config: ModelConfig, shapes: Shapes, vae_p: str) -> None:
    """Every tensor under a component's prefix must be read by the key map (or ignored by design);
    otherwise the inferred config does not describe the network in the file."""
    maps = ldm_to_ours(config, shapes)
    used = {r.src for t in maps.values() for r in t.values()}
    prefixes = (UNET_PREFIX, vae_p) + tuple(p for _, p in family_of(config).text_layout.values())
    extra = sorted(k for k in shapes if k.startswith(prefixes) and k not in used and not is_ignored(k, config))
    if extra:
        raise UnknownCheckpointError(
            f"unsupported {config.family} checkpoint: {len(extra)} tensor(s) the detected architecture has no "
            f"place for (e.g. {', '.join(extra[:3])})")
