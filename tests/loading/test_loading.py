"""fastldm.load on diffusers folders and single files: same weights as diffusers, strict, clear errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastldm
from conftest import rel_err, tiny_diffusers_pipeline
from fastldm.loading import save_single_file
from fastldm.loading.safetensors_io import CheckpointError


def _saved(kind: str, tmp_path_factory):
    """A tiny diffusers pipeline of `kind` and the folder it was saved to."""
    pipe = tiny_diffusers_pipeline(kind)
    path = tmp_path_factory.mktemp(kind) / "model"
    pipe.save_pretrained(path)
    return pipe, path


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _saved("sd1", tmp_path_factory)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return _saved("sdxl", tmp_path_factory)


def _same_outputs(ref_pipe, ours, sdxl=False):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([5.0, 900.0])
    with torch.no_grad():
        ref_h = ref_pipe.text_encoder(ids, output_hidden_states=True)
        enc = ours.text_encoder(ids, layer=ours.config.clip_layer)
        want = ref_h.hidden_states[-2] if sdxl else ref_h.last_hidden_state
        assert rel_err(enc.hidden, want) <= 1e-4
        ctx = torch.randn(2, 7, ref_pipe.unet.config.cross_attention_dim, generator=g)
        extra = {}
        if sdxl:
            extra = {"text_embeds": torch.randn(2, 24, generator=g), "time_ids": torch.tensor([[64.0] * 2 + [0] * 2 + [64] * 2] * 2)}
        ref = ref_pipe.unet(x, t, ctx, added_cond_kwargs=extra or None).sample
        assert rel_err(ours.unet(x, t, ctx, **extra), ref) <= 1e-4
        z = torch.randn(1, 4, 4, 4, generator=g)
        assert rel_err(ours.vae.decode(z), ref_pipe.vae.decode(z).sample) <= 1e-4


def test_diffusers_folder_sd1(sd1):
    pipe, path = sd1
    ours = fastldm.load(path, dtype="fp32")
    assert ours.config.family == "sd1" and ours.dtype == torch.float32
    _same_outputs(pipe, ours)


def test_diffusers_folder_sdxl(sdxl):
    pipe, path = sdxl
    ours = fastldm.load(path, dtype="fp32")
    assert ours.config.family == "sdxl" and ours.text_encoder_2 is not None and ours.config.clip_layer == -2
    _same_outputs(pipe, ours, sdxl=True)
    ids = torch.randint(0, 49408, (1, 77))
    with torch.no_grad():
        ref = pipe.text_encoder_2(ids)
        assert rel_err(ours.text_encoder_2(ids).pooled, ref.text_embeds) <= 1e-4


def test_fp16_variant_and_dtype(sd1, tmp_path):
    pipe, _ = sd1
    path = tmp_path / "fp16"
    pipe.save_pretrained(path, variant="fp16")
    ours = fastldm.load(path, variant="fp16", dtype="bf16")
    assert ours.dtype == torch.bfloat16 and ours.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    ours16 = fastldm.load(path, dtype="fp32")  # only the fp16 variant exists: it is found and converted
    assert ours16.dtype == torch.float32


def test_sharded_folder(sd1, tmp_path):
    pipe, _ = sd1
    path = tmp_path / "sharded"
    pipe.save_pretrained(path, max_shard_size="200KB")
    assert list((path / "unet").glob("*.index.json"))
    _same_outputs(pipe, fastldm.load(path, dtype="fp32"))


def _state_dicts(ours):
    return {k: m.state_dict() for k, m in (("text_encoder", ours.text_encoder), ("unet", ours.unet),
                                           ("vae", ours.vae))}


@pytest.mark.parametrize("fixture", ["sd1", "sdxl"])
def test_single_file_from_our_exporter_loads_identically(fixture, request, tmp_path):
    pipe, path = request.getfixturevalue(fixture)
    folder = fastldm.load(path, dtype="fp32")
    sds = _state_dicts(folder)
    if folder.text_encoder_2 is not None:
        sds["text_encoder_2"] = folder.text_encoder_2.state_dict()
    f = save_single_file(sds, folder.config, tmp_path / "model.safetensors")
    single = fastldm.load(f, dtype="fp32")
    assert single.config.family == folder.config.family
    for name, sd in sds.items():
        other = getattr(single, name).state_dict()
        assert sd.keys() == other.keys() and all(torch.equal(sd[k], other[k]) for k in sd)


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file"):
        fastldm.load("/nonexistent/model.safetensors")


def test_folder_without_index(tmp_path):
    with pytest.raises(CheckpointError, match="model_index.json"):
        fastldm.load(tmp_path)


def test_unknown_family(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"some.random.weight": torch.zeros(3, 3)}, str(p))
    with pytest.raises(ValueError) as e:
        fastldm.load(p)
    assert "\n" not in str(e.value)


def _exported(sd1, tmp_path):
    ours = fastldm.load(sd1[1])
    return save_single_file(_state_dicts(ours), ours.config, tmp_path / "m.safetensors")


def test_missing_key_named(sd1, tmp_path):
    f = _exported(sd1, tmp_path)
    sd = load_file(str(f))
    del sd["model.diffusion_model.out.2.weight"]
    save_file(sd, str(f))
    with pytest.raises(ValueError, match="out.2.weight"):
        fastldm.load(f, dtype="fp32")


def test_folder_missing_and_unexpected_keys(sd1, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(sd1[1], path)
    w = path / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(w))
    sd["extra.weight"] = sd.pop("conv_out.weight")
    save_file(sd, str(w))
    with pytest.raises(CheckpointError) as e:
        fastldm.load(path, dtype="fp32")
    msg = str(e.value)
    assert "1 missing (conv_out.weight)" in msg and "1 unexpected (extra.weight)" in msg and "\n" not in msg


def test_folder_shape_mismatch(sd1, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(sd1[1], path)
    cfg = json.loads((path / "unet" / "config.json").read_text())
    cfg["out_channels"] = 3
    (path / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"conv_out.weight has shape \[4, 32, 3, 3\], the config expects"):
        fastldm.load(path, dtype="fp32")


def test_pickle_folder_refused_then_allowed(sd1, tmp_path):
    pipe, _ = sd1
    path = tmp_path / "bin"
    pipe.save_pretrained(path, safe_serialization=False)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        fastldm.load(path, dtype="fp32")
    _same_outputs(pipe, fastldm.load(path, allow_pickle=True, dtype="fp32"))


def test_info_command(sd1, tmp_path):
    from click.testing import CliRunner

    from fastldm.cli import main

    f = _exported(sd1, tmp_path)
    for target in (sd1[1], f):
        out = CliRunner().invoke(main, ["info", str(target)])
        assert out.exit_code == 0, out.output
        assert "family:          sd1" in out.output and "prediction type: epsilon" in out.output
        assert "unet" in out.output and "M parameters" in out.output
    bad = CliRunner().invoke(main, ["info", str(tmp_path / "nope.safetensors")])
    assert bad.exit_code != 0 and "no such file" in bad.output
