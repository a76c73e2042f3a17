"""detect_single_file: the config comes back from names and shapes alone.

- every tiny variant of test_keymaps, exported, is detected as the config it was built from (all fields
  shapes can tell; the rest come from the family preset and are reset before comparing);
- full-size layouts (shapes only, built from diffusers models on the meta device through our key map) are
  detected as exactly the presets, and diffusers' own `infer_diffusers_model_type` agrees on the family;
- prediction-type hints, and unknown / partial / unsupported key sets raise UnknownCheckpointError naming
  what was found.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastldm.config import CLIPConfig, ModelConfig, UNetConfig, VAEConfig
from fastldm.families import PRESETS
from fastldm.loading import UnknownCheckpointError, detect_single_file, ldm_to_ours
from .test_keymaps import VARIANTS, export, header

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

# Fields no tensor shape determines (detect takes them from the family preset).
NOT_INFERABLE = {
    UNetConfig: ("norm_num_groups", "norm_eps", "upcast_attention", "flip_sin_to_cos", "freq_shift", "sample_size"),
    VAEConfig: ("norm_num_groups", "scaling_factor", "shift_factor", "force_upcast", "sample_size"),
    CLIPConfig: ("layer_norm_eps", "eos_token_id", "pad_token_id"),
}


def _inferable(c):
    if c is None:
        return None
    defaults = type(c)()
    return dataclasses.replace(c, **{f: getattr(defaults, f) for f in NOT_INFERABLE[type(c)]})


def assert_detected(got: ModelConfig, want: ModelConfig) -> None:
    assert (got.family, got.clip_layer, got.prediction_type) == (want.family, want.clip_layer, want.prediction_type)
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _inferable(getattr(got, comp)) == _inferable(getattr(want, comp)), comp


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("detect")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_detects_the_built_config(name, folder):
    shapes, meta = header(export(name, folder))
    assert_detected(detect_single_file(shapes, meta), VARIANTS[name])


# ---- full-size layouts, shapes only --------------------------------------------------------------------------

def _src_shape(op, s: tuple[int, ...]) -> tuple[int, ...]:
    if op == "squeeze":
        return s + (1, 1)
    if op == "transpose":
        return s[::-1]
    if isinstance(op, tuple):  # ("qkv", i): q, k, v stacked on dim 0
        return (3 * s[0],) + s[1:]
    return s


def full_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a real single file of `config`: our shapes from diffusers / transformers models
    built on the meta device, renamed by our key map, plus what real files carry beside the weights."""
    with torch.device("meta"):
        mods = {"unet": diffusers.UNet2DConditionModel.from_config(config.unet.to_diffusers()),
                "vae": diffusers.AutoencoderKL.from_config(config.vae.to_diffusers())}
        for comp in ("text_encoder", "text_encoder_2"):
            c = getattr(config, comp)
            if c is not None:
                cls = transformers.CLIPTextModelWithProjection if c.projection_dim else transformers.CLIPTextModel
                mods[comp] = cls(transformers.CLIPTextConfig(**c.to_diffusers()))
    ours = {comp: {k: tuple(v.shape) for k, v in m.state_dict().items()} for comp, m in mods.items()}
    for comp in ("text_encoder", "text_encoder_2"):  # transformers 5 drops CLIPTextModel's text_model. level
        if comp in ours:
            ours[comp] = {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): s
                          for k, s in ours[comp].items()}
    shapes = {r.src: _src_shape(r.op, ours[comp][k]) for comp, t in ldm_to_ours(config).items()
              for k, r in t.items()}
    shapes |= {"alphas_cumprod": (1000,), "model_ema.num_updates": ()}
    if config.family == "sd2":  # OpenCLIP-H whole: the 24th block and the projection SD2 does not use
        p = "cond_stage_model.model."
        shapes |= {k.replace("resblocks.22.", "resblocks.23."): s for k, s in shapes.items() if "resblocks.22." in k}
        shapes[f"{p}text_projection"] = (1024, 1024)
    elif config.family == "sdxl":
        shapes["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = (1, 77)
    else:
        shapes["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, 77)
    return shapes


def _diffusers_type(shapes) -> str:
    return sfu.infer_diffusers_model_type({k: torch.empty(s, device="meta") for k, s in shapes.items()})


@pytest.mark.parametrize("preset,meta,diffusers_type", [
    ("sd1", {}, "v1"), ("sd2-v", {}, "v2"), ("sd2", {"modelspec.prediction_type": "epsilon"}, "v2"),
    ("sdxl", {}, "xl_base"), ("ldm3d", {}, "v1"), ("ldm3d-4c", {}, "v1")])
def test_full_size_layouts_are_the_presets(preset, meta, diffusers_type):
    shapes = full_shapes(PRESETS[preset])
    assert detect_single_file(shapes, meta) == PRESETS[preset]
    assert _diffusers_type(shapes) == diffusers_type
    # the keys diffusers itself detects families by are where we put them
    expect = {"v1": "v1", "v2": "v2", "xl_base": "xl_base"}[diffusers_type]
    assert sfu.CHECKPOINT_KEY_NAMES[expect] in shapes


@pytest.mark.parametrize("preset,diffusers_type", [("sd1", "inpainting"), ("sd2", "inpainting_v2"),
                                                   ("sdxl", "xl_inpaint")])
def test_full_size_inpainting(preset, diffusers_type):
    config = PRESETS[preset]
    config = config.replace(unet=dataclasses.replace(config.unet, in_channels=9))
    shapes = full_shapes(config)
    assert detect_single_file(shapes, {"modelspec.prediction_type": config.prediction_type}) == config
    assert _diffusers_type(shapes) == diffusers_type


# ---- prediction type ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd2_shapes():
    return full_shapes(PRESETS["sd2"])


@pytest.mark.parametrize("meta,extra,expected", [
    ({}, {}, "sd2-v"),                                            # SD2 default: the 768 v-models
    ({"global_step": 875000}, {}, "sd2"),                         # diffusers' rule (.ckpt)
    ({"global_step": "220000"}, {}, "sd2-v"),
    ({"modelspec.prediction_type": "epsilon"}, {}, "sd2"),
    ({"modelspec.architecture": "stable-diffusion-v2-512"}, {}, "sd2"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, {}, "sd2-v"),
    ({"modelspec.prediction_type": "epsilon"}, {"v_pred": (0,)}, "sd2-v"),  # marker tensor wins
])
def test_sd2_prediction_type(sd2_shapes, meta, extra, expected):
    assert detect_single_file(sd2_shapes | extra, meta) == PRESETS[expected]


def test_prediction_type_override(sd2_shapes):
    assert detect_single_file(sd2_shapes, {}, prediction_type="epsilon") == PRESETS["sd2"]
    with pytest.raises(ValueError, match="prediction_type must be"):
        detect_single_file(sd2_shapes, {}, prediction_type="sample")


def test_sdxl_vpred_markers():
    shapes = full_shapes(PRESETS["sdxl"])
    assert detect_single_file(shapes).prediction_type == "epsilon"
    got = detect_single_file(shapes | {"v_pred": (0,), "ztsnr": (0,)})
    assert got.prediction_type == "v_prediction" and got.scheduler["rescale_betas_zero_snr"] is True
    assert detect_single_file(shapes, {"ss_v_parameterization": "True"}).prediction_type == "v_prediction"


def test_vpred_export_round_trips(folder):
    """save_single_file records v-prediction; detection reads it back (sd2-v is exported that way)."""
    shapes, meta = header(export("sd2-v", folder))
    assert "v_pred" in shapes and meta["modelspec.prediction_type"] == "v"
    shapes, meta = header(export("sd2-base", folder))
    assert detect_single_file(shapes, meta).prediction_type == "epsilon"


# ---- what is not a supported checkpoint ---------------------------------------------------------------------

def _without(shapes, *prefixes):
    return {k: s for k, s in shapes.items() if not k.startswith(prefixes)}


@pytest.fixture(scope="module")
def sd1(folder):
    return header(export("sd1", folder))[0]


def test_unknown_key_sets(sd1):
    with pytest.raises(UnknownCheckpointError, match="no tensors"):
        detect_single_file({})
    with pytest.raises(UnknownCheckpointError, match="a LoRA"):
        detect_single_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320, 1, 1)})
    with pytest.raises(UnknownCheckpointError, match="diffusers-format"):
        detect_single_file({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)})
    with pytest.raises(UnknownCheckpointError, match=r"no VAE \(first_stage_model"):
        detect_single_file(_without(sd1, "first_stage_model."))
    with pytest.raises(UnknownCheckpointError, match="no known text encoder"):
        detect_single_file(_without(sd1, "cond_stage_model."))
    with pytest.raises(UnknownCheckpointError, match="SDXL refiner"):
        detect_single_file(sd1 | {"conditioner.embedders.0.model.text_projection": (1280, 1280)})
    with pytest.raises(UnknownCheckpointError, match="EDM"):
        detect_single_file(sd1 | {"edm_mean": (1, 4, 1, 1)})
    with pytest.raises(UnknownCheckpointError, match="class-conditioned"):
        detect_single_file(sd1 | {"model.diffusion_model.label_emb.weight": (1000, 128)})


def test_partial_and_inconsistent_unets(sd1):
    u = "model.diffusion_model."
    with pytest.raises(UnknownCheckpointError, match="incomplete UNet: tensor 'out.2.weight'"):
        detect_single_file(_without(sd1, f"{u}out.2."))
    # drop one up resnet of the last up level (output_blocks.11): 2 up vs 2 down
    with pytest.raises(UnknownCheckpointError, match="up_blocks.3 has 2 resnets but down_blocks.0 has 2; .*one more"):
        detect_single_file(_without(sd1, f"{u}output_blocks.11."))
    with pytest.raises(UnknownCheckpointError, match="unrecognised block .output_blocks.12"):
        detect_single_file(sd1 | {f"{u}output_blocks.12.0.in_layers.0.weight": (64,)})
    with pytest.raises(UnknownCheckpointError, match=r"lacks 2 tensor\(s\).*input_blocks\.1\.1\.norm"):
        detect_single_file(_without(sd1, f"{u}input_blocks.1.1.norm."))
    with pytest.raises(UnknownCheckpointError, match="no place for .*input_blocks.1.1.transformer_blocks.0.extra"):
        detect_single_file(sd1 | {f"{u}input_blocks.1.1.transformer_blocks.0.extra.weight": (32,)})
    with pytest.raises(UnknownCheckpointError, match="mid block without"):
        detect_single_file(_without(sd1, f"{u}middle_block.0."))
    with pytest.raises(UnknownCheckpointError, match="unsupported VAE: level 1"):
        detect_single_file(_without(sd1, "first_stage_model.decoder.up.1.block.1."))


def test_shapes_only():
    """Detection is a function of names and shapes: it works on a header with no tensors at all."""
    shapes = full_shapes(PRESETS["sdxl"])
    assert all(isinstance(s, tuple) for s in shapes.values())
    assert detect_single_file({k: list(s) for k, s in shapes.items()}) == PRESETS["sdxl"]


def test_layout_variants_detect_the_same(sd1):
    """`vae.` VAE prefix and pre-`text_model.` CLIP names (old transformers) are the same model."""
    renamed = {k.replace("first_stage_model.", "vae.").replace("transformer.text_model.", "transformer."): s
               for k, s in sd1.items()}
    assert detect_single_file(renamed) == detect_single_file(sd1)
