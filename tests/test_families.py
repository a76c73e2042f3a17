"""The family table (families.py): every row and variant generates, and survives both checkpoint formats —
written as a single file and as a diffusers folder, it is detected as the same row with the same config."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import fastldm
from fastldm.families import FAMILIES, PRESETS, family, family_of, variants_of
from fastldm.loading.export import save_single_file
from fastldm.loading.save import save_folder
from fastldm.testing import TINY_VARIANTS, random_pipeline, tiny_configs

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = [f.name for f in FAMILIES] + list(TINY_VARIANTS)


@pytest.fixture(scope="module")
def pipes():
    return {name: random_pipeline(cfg, seed=3) for name, cfg in tiny_configs().items()}


@pytest.mark.parametrize("name", NAMES)
def test_every_row_generates(pipes, name):
    pipe = pipes[name]
    r = pipe.generate("a red cube", steps=2, seed=0, sampler="LCM" if name == "lcm" else "Euler")
    assert r.images[0].size == (16, 16) and np.isfinite(r.raw).all()
    assert (r.depths is not None) == (pipe.family.vae_channels > 3)


@pytest.mark.parametrize("name", NAMES)
def test_single_file_round_trip(pipes, name, tmp_path):
    pipe = pipes[name]
    state = {k: getattr(pipe, k).state_dict() for k in ("text_encoder", "text_encoder_2", "unet", "vae")
             if getattr(pipe, k) is not None}
    path = save_single_file(state, pipe.config, tmp_path / "m.safetensors")
    loaded = fastldm.load(path, dtype="fp32")
    assert loaded.family == pipe.family and loaded.variants == pipe.variants
    same = lambda a, b: dataclasses.replace(a, sample_size=0) == dataclasses.replace(b, sample_size=0)  # noqa: E731
    assert same(loaded.config.unet, pipe.config.unet) and same(loaded.config.vae, pipe.config.vae)
    assert loaded.config.prediction_type == pipe.config.prediction_type
    for k, v in state["unet"].items():
        assert torch.equal(loaded.unet.state_dict()[k], v), k


@pytest.mark.parametrize("name", NAMES)
def test_folder_round_trip(pipes, name, tmp_path):
    pipe = pipes[name]
    modules = {k: getattr(pipe, k) for k in ("text_encoder", "text_encoder_2", "unet", "vae")
               if getattr(pipe, k) is not None}
    toks = {k: getattr(pipe, k) for k in ("tokenizer", "tokenizer_2") if getattr(pipe, k) is not None}
    loaded = fastldm.load(save_folder(pipe.config, modules, toks, tmp_path / "m"), dtype="fp32")
    assert loaded.family == pipe.family and loaded.variants == pipe.variants
    a = loaded.generate("a red cube", steps=2, seed=1, sampler="LCM" if name == "lcm" else "Euler")
    b = pipe.generate("a red cube", steps=2, seed=1, sampler="LCM" if name == "lcm" else "Euler")
    # The same weights and conventions give the same image; `load` puts the UNet and VAE in channels_last, whose
    # convolutions sum in another order (fp32: 5e-5 to 2e-3 observed on images in [0, 1]: these random tiny
    # networks amplify rounding). The end-to-end bound of the parity tests, 2/255; a wrong convention (pad id,
    # prediction type, conditioning) moves pixels by tenths.
    assert np.abs(a.raw - b.raw).max() <= 2 / 255


def test_full_size_presets_are_their_own_rows():
    for row in FAMILIES:
        assert family_of(row.preset) is row and PRESETS[row.name] is row.preset
        assert variants_of(row.preset) == ()
    with pytest.raises(KeyError, match="no model family 'sd3'"):
        family("sd3")


def test_sdxl_row_conditions_on_size_and_zeroes_an_empty_negative(pipes):
    cond, uncond = pipes["sdxl"].conditioning(["a cube"], "", 5.0, 24, 16)
    assert cond["time_ids"].tolist() == [[16.0, 24.0, 0.0, 0.0, 16.0, 24.0]]
    assert not uncond["encoder_hidden_states"].any() and torch.equal(uncond["time_ids"], cond["time_ids"])
