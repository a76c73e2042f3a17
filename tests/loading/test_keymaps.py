"""Single-file key maps: our export -> diffusers' own LDM converters reproduce the original weights exactly,
and our import (ldm_to_ours + apply_op) does too. Tiny random models built in code with diffusers /
transformers, one per layout variant (SD1 conv projection, SD2 OpenCLIP + linear projection, SDXL with
text_time embedding and deeper transformers, inpainting, LCM, BK-SDM without mid block, mixed per-level
depths, LDM3D 4/6-channel VAEs). Comparisons are exact (torch.equal): renaming, slicing, transposing and
reshaping never change a value.

The builders here are shared with test_detect.py.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fastldm.config import CLIPConfig, ModelConfig, SD_SCHEDULER, UNetConfig, VAEConfig
from fastldm.families import PRESETS
from fastldm.loading import (Rename, UnknownCheckpointError, apply_op, canonical_clip_keys, ldm_to_ours,
                             modernize_vae_keys, save_single_file, unused_keys)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

# ---- tiny configs (heads follow detect's rule, so detection can be compared field by field) ---------------

_CLIP_L = CLIPConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                     num_attention_heads=1, eos_token_id=2)
# 23 layers: diffusers' SD2 converter hard-codes dropping OpenCLIP block 23, as in the real 24-block file.
_OPENCLIP_H = CLIPConfig(vocab_size=1000, hidden_size=64, intermediate_size=48, num_hidden_layers=23,
                         num_attention_heads=1, hidden_act="gelu", eos_token_id=2, pad_token_id=0)
_BIGG = CLIPConfig(vocab_size=1000, hidden_size=128, intermediate_size=40, num_hidden_layers=2,
                   num_attention_heads=2, hidden_act="gelu", projection_dim=16, eos_token_id=2, pad_token_id=0)
_UNET1 = UNetConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=(2, 2, 2, 2),
                    cross_attn=(True, True, True, False), attention_heads=(8, 8, 8, 8),
                    transformer_layers_per_block=(1, 1, 1, 1), cross_attention_dim=32, norm_num_groups=8,
                    sample_size=8)
_UNET2 = UNetConfig(block_out_channels=(32, 64, 128), layers_per_block=(2, 2, 2), cross_attn=(True, True, False),
                    attention_heads=(1, 1, 2), transformer_layers_per_block=(1, 1, 1), cross_attention_dim=64,
                    use_linear_projection=True, norm_num_groups=8, sample_size=8)
_UNETXL = UNetConfig(block_out_channels=(32, 64, 128), layers_per_block=(2, 2, 2), cross_attn=(False, True, True),
                     attention_heads=(1, 1, 2), transformer_layers_per_block=(1, 2, 3), cross_attention_dim=160,
                     use_linear_projection=True, addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8, sample_size=8)
_VAE2 = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
_VAE3 = VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, scaling_factor=0.13025)
_V = SD_SCHEDULER | {"prediction_type": "v_prediction"}

VARIANTS: dict[str, ModelConfig] = {
    "sd1": ModelConfig("sd1", _CLIP_L, _UNET1, _VAE2),
    "sd1-inpaint": ModelConfig("sd1", _CLIP_L, dataclasses.replace(_UNET1, in_channels=9), _VAE2),
    "sd1-lcm": ModelConfig("sd1", _CLIP_L, dataclasses.replace(_UNET1, time_cond_proj_dim=16), _VAE2),
    "bk-sdm-small": ModelConfig("sd1", _CLIP_L, dataclasses.replace(_UNET1, layers_per_block=(1,) * 4,
                                                                     mid_block=False), _VAE2),
    "mixed-depth": ModelConfig("sd1", _CLIP_L, dataclasses.replace(_UNET1, layers_per_block=(2, 1, 3, 1)), _VAE2),
    "sd2-v": ModelConfig("sd2", _OPENCLIP_H, _UNET2, _VAE2, scheduler=_V, default_size=768),
    "sd2-base": ModelConfig("sd2", _OPENCLIP_H, dataclasses.replace(_UNET2, in_channels=9), _VAE2),
    "sdxl": ModelConfig("sdxl", _CLIP_L, _UNETXL, _VAE3, text_encoder_2=_BIGG, clip_layer=-2, default_size=1024),
    "ldm3d": ModelConfig("ldm3d", _CLIP_L, _UNET1, dataclasses.replace(_VAE2, in_channels=6, out_channels=6)),
    "ldm3d-4c": ModelConfig("ldm3d", _CLIP_L, _UNET1, dataclasses.replace(
        _VAE2, in_channels=4, out_channels=4, mid_block_add_attention=False)),
}
# diffusers' LDM UNet converter takes one int layers_per_block, so uneven levels have no oracle.
NO_UNET_ORACLE = {"mixed-depth"}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct random values everywhere (default init has many all-ones / all-zeros tensors of equal shape,
    which would hide a swapped mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def _clip_model(c: CLIPConfig, seed: int):
    cfg = transformers.CLIPTextConfig(**c.to_diffusers())
    cls = transformers.CLIPTextModelWithProjection if c.projection_dim else transformers.CLIPTextModel
    return _randomize(cls(cfg), seed)


@functools.lru_cache(maxsize=None)
def build(name: str) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]], dict]:
    """(config, our state dicts, the diffusers/transformers modules) of a variant."""
    config = VARIANTS[name]
    mods = {"unet": _randomize(diffusers.UNet2DConditionModel.from_config(config.unet.to_diffusers()), 1),
            "vae": _randomize(diffusers.AutoencoderKL.from_config(config.vae.to_diffusers()), 2),
            "text_encoder": _clip_model(config.text_encoder, 3)}
    if config.text_encoder_2 is not None:
        mods["text_encoder_2"] = _clip_model(config.text_encoder_2, 4)
    sds = {}
    for comp, m in mods.items():
        sd = m.state_dict()
        if comp.startswith("text_encoder"):
            sd = dict(zip(canonical_clip_keys(sd), sd.values()))
        sds[comp] = sd
    return config, sds, mods


def export(name: str, folder: Path) -> Path:
    path = folder / f"{name}.safetensors"
    if not path.exists():
        config, sds, _ = build(name)
        save_single_file(sds, config, path)
    return path


def header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict]:
    """Shapes and metadata only: what a loader passes to detect_single_file."""
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), (what, sorted(got.keys() ^ want.keys())[:5])
    bad = [k for k in want if got[k].shape != want[k].shape or not torch.equal(got[k], want[k])]
    assert not bad, (what, bad[:5])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("single_file")


# ---- export -> diffusers' converters (the oracle) ----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_export_matches_diffusers_converters(name, folder):
    config, sds, mods = build(name)
    ckpt = load_file(export(name, folder))
    if name not in NO_UNET_ORACLE:
        cfg = config.unet.to_diffusers() | {"layers_per_block": config.unet.layers_per_block[0]}
        want = {k: v for k, v in sds["unet"].items() if not k.startswith("time_embedding.cond_proj")}
        _assert_same(sfu.convert_ldm_unet_checkpoint(ckpt, cfg), want, "unet")
    _assert_same(sfu.convert_ldm_vae_checkpoint(ckpt, config.vae.to_diffusers()), sds["vae"], "vae")
    if config.family == "sd2":
        te = sfu.convert_open_clip_checkpoint(mods["text_encoder"], ckpt, prefix="cond_stage_model.model.")
    else:
        te = sfu.convert_ldm_clip_checkpoint({k: v for k, v in ckpt.items() if "embedders.1" not in k})
    _assert_same(te, sds["text_encoder"], "text_encoder")
    if config.family == "sdxl":
        te2 = sfu.convert_open_clip_checkpoint(mods["text_encoder_2"], ckpt, prefix="conditioner.embedders.1.model.")
        _assert_same(te2, sds["text_encoder_2"], "text_encoder_2")


@pytest.mark.parametrize("preset,names", [
    ("sd1", ["input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight", "input_blocks.9.0.op.weight",
             "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
             "output_blocks.11.0.skip_connection.weight", "middle_block.1.proj_in.weight"]),
    ("sdxl", ["input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight", "output_blocks.2.2.conv.weight",
              "output_blocks.5.2.conv.weight", "label_emb.0.0.weight",
              "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"]),
])
def test_real_checkpoint_names(preset, names):
    """Names other tools detect real files by (diffusers' oracle accepts an upsampler in either slot, so the
    slot is pinned here): SD1 up level 0 has no transformer, so its upsampler sits in slot 1."""
    srcs = {r.src for r in ldm_to_ours(PRESETS[preset])["unet"].values()}
    assert {f"model.diffusion_model.{n}" for n in names} <= srcs
    assert not any(".1.conv." in s for s in srcs if s.startswith("model.diffusion_model.output_blocks.5."))


def test_lcm_cond_proj_keeps_its_diffusers_name(folder):
    """ldm has no name for LCM's guidance projection; single files carry diffusers' (sd.cpp lists it)."""
    _, sds, _ = build("sd1-lcm")
    ckpt = load_file(export("sd1-lcm", folder))
    assert torch.equal(ckpt["model.diffusion_model.time_embedding.cond_proj.weight"],
                       sds["unet"]["time_embedding.cond_proj.weight"])


# ---- our import --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_import_reproduces_state_dicts(name, folder):
    config, sds, _ = build(name)
    ckpt = load_file(export(name, folder))
    maps = ldm_to_ours(config, ckpt.keys())
    assert maps.keys() == sds.keys()
    for comp, table in maps.items():
        _assert_same({k: apply_op(r.op, ckpt[r.src]) for k, r in table.items()}, sds[comp], comp)
    assert unused_keys(config, ckpt.keys(), maps) == []


def test_sd2_file_carries_an_identity_24th_block(folder):
    """SD2 files hold OpenCLIP's extra block; ours is exactly the identity, and the import skips it."""
    config, _, _ = build("sd2-v")
    ckpt = load_file(export("sd2-v", folder))
    b = "cond_stage_model.model.transformer.resblocks.23"
    assert not ckpt[f"{b}.attn.out_proj.weight"].any() and not ckpt[f"{b}.mlp.c_proj.bias"].any()
    assert torch.equal(ckpt["cond_stage_model.model.text_projection"], torch.eye(64))
    srcs = {r.src for r in ldm_to_ours(config, ckpt.keys())["text_encoder"].values()}
    assert not any(s.startswith(b) for s in srcs)


def test_import_accepts_layout_variants(folder):
    """`vae.` instead of `first_stage_model.`, pre-`text_model.` CLIP names, EMA copies and ldm buffers."""
    config, sds, _ = build("sd1")
    ckpt = load_file(export("sd1", folder))
    renamed = {k.replace("first_stage_model.", "vae.").replace("transformer.text_model.", "transformer."): v
               for k, v in ckpt.items()}
    renamed |= {"model_ema.decay": torch.tensor(0.9999), "alphas_cumprod": torch.ones(1000),
                "cond_stage_model.transformer.embeddings.position_ids": torch.arange(77)[None]}
    maps = ldm_to_ours(config, renamed.keys())
    for comp, table in maps.items():
        _assert_same({k: apply_op(r.op, renamed[r.src]) for k, r in table.items()}, sds[comp], comp)
    assert unused_keys(config, list(renamed) + ["first_stage_model.loss.w"]) == ["first_stage_model.loss.w"]


def test_missing_tensor_is_named(folder):
    config, _, _ = build("sdxl")
    keys = set(header(export("sdxl", folder))[0]) - {"model.diffusion_model.label_emb.0.2.bias"}
    with pytest.raises(UnknownCheckpointError, match=r"lacks 1 tensor.*label_emb\.0\.2\.bias"):
        ldm_to_ours(config, keys)


def test_export_rejects_mismatched_state_dicts(folder):
    config, sds, _ = build("sd1")
    with pytest.raises(ValueError, match="needs state dicts"):
        save_single_file({k: v for k, v in sds.items() if k != "vae"}, config, folder / "x.safetensors")
    broken = dict(sds, unet={k: v for k, v in sds["unet"].items() if k != "conv_in.bias"})
    with pytest.raises(ValueError, match="unet state dict does not match its config: 1 missing .conv_in.bias"):
        save_single_file(broken, config, folder / "x.safetensors")
    assert not list(folder.glob("*x.safetensors*"))  # nothing half-written


def test_export_dtype_and_metadata(folder):
    config, sds, _ = build("sd1")
    path = save_single_file(sds, config, folder / "half.safetensors", dtype=torch.float16,
                            metadata={"modelspec.title": "tiny", "global_step": 5})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "modelspec.prediction_type": "epsilon",
                                "modelspec.title": "tiny", "global_step": "5"}
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    assert not list(folder.glob(".half*"))  # the temporary file was renamed away


def test_apply_op():
    w = torch.arange(24.0).view(6, 4)
    assert torch.equal(apply_op(("qkv", 1), w), w[2:4])
    assert torch.equal(apply_op("transpose", w), w.T)
    assert torch.equal(apply_op("squeeze", w[:, :, None, None]), w)
    assert torch.equal(apply_op("squeeze", w), w)  # already linear
    assert apply_op(None, w) is w
    with pytest.raises(ValueError, match="unknown key-map op"):
        apply_op("flip", w)
    assert Rename("a") == Rename("a", None)


def test_modernize_vae_keys():
    _, sds, _ = build("sd1")
    new = list(sds["vae"])
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = []
    for k in new:
        for n, o in old_names.items():
            k = k.replace(f".attentions.0.{n}.", f".attentions.0.{o}.")
        old.append(k)
    assert old != new and modernize_vae_keys(old) == new


def test_canonical_clip_keys():
    keys = ["embeddings.token_embedding.weight", "text_model.final_layer_norm.bias", "text_projection.weight"]
    assert canonical_clip_keys(keys) == ["text_model.embeddings.token_embedding.weight",
                                         "text_model.final_layer_norm.bias", "text_projection.weight"]


def test_unknown_family_has_no_layout():
    with pytest.raises(ValueError, match="no single-file layout for family 'custom'"):
        ldm_to_ours(VARIANTS["sd1"].replace(family="custom"))
