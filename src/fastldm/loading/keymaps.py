"""Single-file checkpoint key names <-> ours, as data.

A single-file checkpoint (CompVis `ldm`, Stability `sgm`, A1111/ComfyUI) stores every network under one
prefix per component; ours are diffusers' / transformers' names. One rename table per source format, each
built in a loop from the ModelConfig (DESIGN rule 5):

  UNet      `model.diffusion_model.`   openaimodel.py: input_blocks.N.{0 resnet, 1 transformer, 0.op down},
                                       middle_block.{0,1,2}, output_blocks.N.{0, 1, 1|2.conv up}, out.{0,2}
  VAE       `first_stage_model.`       ldm autoencoder: encoder.down.i.block.j, mid.{block_1, attn_1, block_2},
                                       decoder.up.i indexed by resolution like encoder.down.i (diffusers'
                                       up_blocks run in execution order: reversed)
  CLIP      `cond_stage_model.transformer.` (SD1), `conditioner.embedders.0.transformer.` (SDXL):
                                       transformers' CLIPTextModel names behind a prefix
  OpenCLIP  `cond_stage_model.model.` (SD2), `conditioner.embedders.1.model.` (SDXL): open_clip's
                                       TextTransformer, q/k/v stacked in `attn.in_proj_weight`

`ldm_to_ours` gives, per component, {our key: Rename(source key, op)}; `apply_op` turns the source tensor
into ours. Export (`export.py`) inverts the same tables, so the two directions cannot drift apart.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Union

import torch

from ..config import CLIPConfig, ModelConfig, UNetConfig, VAEConfig
from ..errors import UnknownCheckpointError
from ..families import FAMILIES, family_of, text_layout

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")

# Source tensors no model reads, by design:
IGNORED_NAMES = frozenset({
    # ldm DDPM schedule buffers (ddpm.py register_schedule): recomputed from the scheduler config
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "denoiser.sigmas",  # ldm's per-step loss weights; sgm's discretized sigmas
    "v_pred", "ztsnr",            # empty marker tensors (ComfyUI convention), read by detect as hints
})
IGNORED_PREFIXES = ("model_ema.",         # the EMA copy, flat names; `model.diffusion_model.*` is what we load
                    "embedding_manager.")  # textual-inversion training leftovers
IGNORED_SUFFIXES = (".position_ids",      # transformers' CLIP buffer (arange(77)), rebuilt by the model
                    ".logit_scale")       # CLIP's contrastive temperature, unused for text encoding

Op = Union[None, str, tuple]  # None | "squeeze" | "transpose" | ("qkv", i)


@dataclass(frozen=True)
class Rename:
    """Our tensor = apply_op(op, checkpoint[src])."""
    src: str
    op: Op = None


def apply_op(op: Op, t: torch.Tensor) -> torch.Tensor:
    """Turn a source tensor into ours. Ops:
    "squeeze"    1x1 conv -> linear: (O, I, 1, 1) -> (O, I)  (a tensor already (O, I) passes through)
    "transpose"  OpenCLIP `text_projection` (width, proj), used as x @ P -> nn.Linear weight (proj, width)
    ("qkv", i)   slice i of OpenCLIP `in_proj_weight` (3*D, D) / `in_proj_bias` (3*D,), q|k|v stacked on dim 0
    """
    if op is None:
        return t
    if op == "squeeze":
        return t.flatten(1)  # (O, I, 1, 1) -> (O, I)
    if op == "transpose":
        return t.t().contiguous()  # (width, proj) -> (proj, width)
    if isinstance(op, tuple) and op[0] == "qkv":
        return t.chunk(3, dim=0)[op[1]]  # (3*D, ...) -> (D, ...)
    raise ValueError(f"unknown key-map op {op!r}")


# ---- tables ---------------------------------------------------------------------------------------------

def _wb(t: dict, ours: str, src: str, op: Op = None, bias: bool = True) -> None:
    t[f"{ours}.weight"] = Rename(f"{src}.weight", op)
    if bias:
        t[f"{ours}.bias"] = Rename(f"{src}.bias")


_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": ("norm", None), "to_q": ("q", "squeeze"), "to_k": ("k", "squeeze"),
             "to_v": ("v", "squeeze"), "to_out.0": ("proj_out", "squeeze")}
# A SpatialTransformer's sub-modules have the same names on both sides.
_BLOCK_WB = ("norm1", "norm2", "norm3", "attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_BLOCK_W = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v")


def _resnet(t: dict, names: dict, ours: str, src: str, shortcut: bool) -> None:
    for o, s in names.items():
        if o != "conv_shortcut" or shortcut:
            _wb(t, f"{ours}.{o}", f"{src}.{s}")


def _transformer(t: dict, ours: str, src: str, depth: int) -> None:
    for name in ("norm", "proj_in", "proj_out"):
        _wb(t, f"{ours}.{name}", f"{src}.{name}")
    for k in range(depth):
        for name in _BLOCK_WB:
            _wb(t, f"{ours}.transformer_blocks.{k}.{name}", f"{src}.transformer_blocks.{k}.{name}")
        for name in _BLOCK_W:
            _wb(t, f"{ours}.transformer_blocks.{k}.{name}", f"{src}.transformer_blocks.{k}.{name}", bias=False)


def unet_table(c: UNetConfig, p: str = UNET_PREFIX) -> dict[str, Rename]:
    """openaimodel.py numbering: input_blocks.0 is conv_in; then per level its resnets (+ transformers), then
    one downsampler (not after the last level). output_blocks run the levels in reverse, one resnet more
    each, with the upsampler inside the level's last block (slot 1, or 2 behind a transformer)."""
    t: dict[str, Rename] = {}
    ch, L = c.block_out_channels, len(c.block_out_channels)
    _wb(t, "conv_in", f"{p}input_blocks.0.0")
    _wb(t, "time_embedding.linear_1", f"{p}time_embed.0")
    _wb(t, "time_embedding.linear_2", f"{p}time_embed.2")
    if c.time_cond_proj_dim:  # LCM; ldm has no name for it, so single files keep diffusers' (no bias)
        _wb(t, "time_embedding.cond_proj", f"{p}time_embedding.cond_proj", bias=False)
    if c.addition_time_embed_dim:
        _wb(t, "add_embedding.linear_1", f"{p}label_emb.0.0")
        _wb(t, "add_embedding.linear_2", f"{p}label_emb.0.2")
    n, cin = 1, ch[0]
    for i in range(L):
        for j in range(c.layers_per_block[i]):
            _resnet(t, _UNET_RESNET, f"down_blocks.{i}.resnets.{j}", f"{p}input_blocks.{n}.0", cin != ch[i])
            if c.cross_attn[i]:
                _transformer(t, f"down_blocks.{i}.attentions.{j}", f"{p}input_blocks.{n}.1",
                             c.transformer_layers_per_block[i])
            cin, n = ch[i], n + 1
        if i < L - 1:
            _wb(t, f"down_blocks.{i}.downsamplers.0.conv", f"{p}input_blocks.{n}.0.op")
            n += 1
    if c.mid_block:
        _resnet(t, _UNET_RESNET, "mid_block.resnets.0", f"{p}middle_block.0", False)
        _transformer(t, "mid_block.attentions.0", f"{p}middle_block.1", c.transformer_layers_per_block[-1])
        _resnet(t, _UNET_RESNET, "mid_block.resnets.1", f"{p}middle_block.2", False)
    n = 0
    for i in range(L):
        level = L - 1 - i
        for j in range(c.layers_per_block[level] + 1):
            # input = previous output ++ skip, always wider than the output: every up resnet has a shortcut
            _resnet(t, _UNET_RESNET, f"up_blocks.{i}.resnets.{j}", f"{p}output_blocks.{n}.0", True)
            if c.cross_attn[level]:
                _transformer(t, f"up_blocks.{i}.attentions.{j}", f"{p}output_blocks.{n}.1",
                             c.transformer_layers_per_block[level])
            n += 1
        if i < L - 1:
            slot = 2 if c.cross_attn[level] else 1
            _wb(t, f"up_blocks.{i}.upsamplers.0.conv", f"{p}output_blocks.{n - 1}.{slot}.conv")
    _wb(t, "conv_norm_out", f"{p}out.0")
    _wb(t, "conv_out", f"{p}out.2")
    return t


def vae_table(c: VAEConfig, p: str = VAE_PREFIXES[0]) -> dict[str, Rename]:
    """ldm's decoder.up.i is resolution level i, so diffusers' up_blocks.i is ldm's up.{L-1-i}; its mid
    attention is 1x1 convs where diffusers has linears ("squeeze")."""
    t: dict[str, Rename] = {}
    ch, L, n = c.block_out_channels, len(c.block_out_channels), c.layers_per_block
    for part in ("encoder", "decoder"):
        _wb(t, f"{part}.conv_in", f"{p}{part}.conv_in")
        _resnet(t, _VAE_RESNET, f"{part}.mid_block.resnets.0", f"{p}{part}.mid.block_1", False)
        if c.mid_block_add_attention:
            for o, (s, op) in _VAE_ATTN.items():
                _wb(t, f"{part}.mid_block.attentions.0.{o}", f"{p}{part}.mid.attn_1.{s}", op)
        _resnet(t, _VAE_RESNET, f"{part}.mid_block.resnets.1", f"{p}{part}.mid.block_2", False)
        _wb(t, f"{part}.conv_norm_out", f"{p}{part}.norm_out")
        _wb(t, f"{part}.conv_out", f"{p}{part}.conv_out")
    cin = ch[0]
    for i in range(L):
        for j in range(n):
            _resnet(t, _VAE_RESNET, f"encoder.down_blocks.{i}.resnets.{j}", f"{p}encoder.down.{i}.block.{j}",
                    cin != ch[i])
            cin = ch[i]
        if i < L - 1:
            _wb(t, f"encoder.down_blocks.{i}.downsamplers.0.conv", f"{p}encoder.down.{i}.downsample.conv")
    cin = ch[-1]
    for i in range(L):
        level = L - 1 - i
        for j in range(n + 1):
            _resnet(t, _VAE_RESNET, f"decoder.up_blocks.{i}.resnets.{j}", f"{p}decoder.up.{level}.block.{j}",
                    cin != ch[level])
            cin = ch[level]
        if i < L - 1:
            _wb(t, f"decoder.up_blocks.{i}.upsamplers.0.conv", f"{p}decoder.up.{level}.upsample.conv")
    _wb(t, "quant_conv", f"{p}quant_conv")
    _wb(t, "post_quant_conv", f"{p}post_quant_conv")
    return t


_CLIP_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")


def clip_table(c: CLIPConfig, p: str) -> dict[str, Rename]:
    """transformers' names behind prefix `p` (which ends in `text_model.`, or not in pre-4.x files)."""
    names = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
             "final_layer_norm.weight", "final_layer_norm.bias"]
    names += [f"encoder.layers.{i}.{m}.{w}" for i in range(c.num_hidden_layers) for m in _CLIP_LAYER
              for w in ("weight", "bias")]
    return {f"text_model.{k}": Rename(p + k) for k in names}


_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def openclip_table(c: CLIPConfig, p: str) -> dict[str, Rename]:
    """open_clip TextTransformer under prefix `p`; only the first `c.num_hidden_layers` resblocks are read."""
    t = {"text_model.embeddings.token_embedding.weight": Rename(f"{p}token_embedding.weight"),
         "text_model.embeddings.position_embedding.weight": Rename(f"{p}positional_embedding")}
    for i in range(c.num_hidden_layers):
        ours, src = f"text_model.encoder.layers.{i}", f"{p}transformer.resblocks.{i}"
        for k, name in enumerate("qkv"):
            t[f"{ours}.self_attn.{name}_proj.weight"] = Rename(f"{src}.attn.in_proj_weight", ("qkv", k))
            t[f"{ours}.self_attn.{name}_proj.bias"] = Rename(f"{src}.attn.in_proj_bias", ("qkv", k))
        for o, s in _OPENCLIP_LAYER.items():
            _wb(t, f"{ours}.{o}", f"{src}.{s}")
    _wb(t, "text_model.final_layer_norm", f"{p}ln_final")
    if c.projection_dim:
        t["text_projection.weight"] = Rename(f"{p}text_projection", "transpose")
    return t


# ---- the whole checkpoint -----------------------------------------------------------------------------------

def _clip_prefix(prefix: str, keys: set[str] | None) -> str:
    """Files saved with transformers < 4.x lack the `text_model.` level (A1111 renames them the same way)."""
    if keys is not None and f"{prefix}embeddings.token_embedding.weight" in keys:
        return prefix
    return prefix + "text_model."


def ldm_to_ours(config: ModelConfig, keys: Iterable[str] | None = None) -> dict[str, dict[str, Rename]]:
    """{component: {our key: Rename(source key, op)}} for a single-file checkpoint of `config`'s family.

    `keys` (the file's tensor names) picks between prefix variants (`first_stage_model.` / `vae.`, old CLIP
    names) and is checked: a needed tensor that is missing raises UnknownCheckpointError. Without `keys`,
    the canonical layout (what `save_single_file` writes)."""
    try:
        layout = text_layout(config.family)
    except KeyError:
        raise ValueError(f"no single-file layout for family {config.family!r}; known: "
                         f"{', '.join(dict.fromkeys(f.stack for f in FAMILIES))}") from None
    keyset = None if keys is None else set(keys)
    vae_p = next((p for p in VAE_PREFIXES if keyset is not None and f"{p}decoder.conv_in.weight" in keyset),
                 VAE_PREFIXES[0])
    maps = {"unet": unet_table(config.unet), "vae": vae_table(config.vae, vae_p)}
    for comp, (fmt, prefix) in layout.items():
        sub = getattr(config, comp)
        maps[comp] = (clip_table(sub, _clip_prefix(prefix, keyset)) if fmt == "clip"
                      else openclip_table(sub, prefix))
    if keyset is not None:
        missing = sorted({r.src for t in maps.values() for r in t.values()} - keyset)
        if missing:
            raise UnknownCheckpointError(
                f"checkpoint lacks {len(missing)} tensor(s) a {config.family} model with this config needs "
                f"(e.g. {', '.join(missing[:3])}); the file is incomplete or of another architecture")
    return maps


def is_ignored(key: str, config: ModelConfig) -> bool:
    """True for source tensors no model reads, by design (the documented lists above)."""
    return (key in IGNORED_NAMES or key.startswith(IGNORED_PREFIXES + family_of(config).ignored_prefixes(config))
            or key.endswith(IGNORED_SUFFIXES))


def unused_keys(config: ModelConfig, keys: Iterable[str],
                maps: dict[str, dict[str, Rename]] | None = None) -> list[str]:
    """Source keys that the key map neither reads nor ignores by design: worth a warning."""
    maps = ldm_to_ours(config, keys) if maps is None else maps
    used = {r.src for t in maps.values() for r in t.values()}
    return sorted(k for k in keys if k not in used and not is_ignored(k, config))


# ---- diffusers-folder helpers -------------------------------------------------------------------------------

_OLD_VAE_ATTN = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def modernize_vae_keys(keys: Iterable[str]) -> list[str]:
    """Old diffusers VAE folders (< 0.14) name the mid attention query/key/value/proj_attn (already
    linear); our names, in the order given, are to_q/to_k/to_v/to_out.0. Other keys pass through."""
    out = []
    for k in keys:
        m = _OLD_VAE_ATTN.match(k)
        out.append(f"{m[1]}{_NEW_VAE_ATTN[m[2]]}.{m[3]}" if m else k)
    return out


def canonical_clip_keys(keys: Iterable[str]) -> list[str]:
    """transformers >= 5 flattened CLIPTextModel (no `text_model.` level); our names, in the order given,
    always have it. `text_projection.*` stays at the top, as in CLIPTextModelWithProjection."""
    return [k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}" for k in keys]
