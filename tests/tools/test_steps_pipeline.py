"""Dynamic execution through the pipeline, the API and the CLI on one tiny random RGBD model (built with
fastldm's own classes, saved as a diffusers folder): early stop and DeepCache report the steps they ran, CFG
batching works with the cache, labels come from batched renders equal to `generate`'s images, and a predictor
trained on them drives `steps="auto"` — whose actual steps land in the PNG's "Steps:"."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import fastldm
from conftest import randomize_
from fastldm.runtime.early_stop import DEFAULT_THRESHOLD
from fastldm.tools.steps.labels import STEP_GRID, LabelTable, build_label_table, quality_labels, render, shapes_judge
from fastldm.runtime.step_predictor import load_predictor_file, predictor_path
from fastldm.tools.steps.train import train_from_table
from fastldm.cli import main
from fastldm.config import CLIPConfig, ModelConfig, UNetConfig, VAEConfig
from fastldm.images import parse_infotext
from fastldm.loading.save import save_folder
from fastldm.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from fastldm.tokenizer import CLIPTokenizer

PROMPTS = ["a red cube", "a large blue sphere on the left", "a green pyramid above a red cube",
           "a white sphere on a black background"]
SMALL_GRID = (2, 3, 5)      # a short label grid keeps the renders cheap; the default grid is STEP_GRID


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    text = CLIPConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    unet = UNetConfig(block_out_channels=(32, 64), layers_per_block=(1, 1), cross_attn=(True, False),
                      attention_heads=(1, 2), cross_attention_dim=32, norm_num_groups=8, sample_size=8)
    vae = VAEConfig(in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
                    norm_num_groups=8, force_upcast=False, sample_size=16)
    config = ModelConfig("ldm3d", text, unet, vae, default_size=16)
    modules = {"text_encoder": randomize_(CLIPTextModel(text), 1, std=0.1),
               "unet": randomize_(UNet2DConditionModel(unet), 2, std=0.08),
               "vae": randomize_(AutoencoderKL(vae), 3, std=0.05)}
    return save_folder(config, modules, {"tokenizer": CLIPTokenizer.bundled()},
                       tmp_path_factory.mktemp("adaptive") / "tiny-rgbd")


@pytest.fixture(scope="module")
def pipe(folder):
    return fastldm.load(folder)


def test_early_stop_reports_steps_run(pipe):
    kw = dict(steps=6, sampler="DPM++ 2M", seed=3)
    assert pipe.generate("a cube", early_stop=1e9, **kw).steps == 2      # δ_0 = inf, then anything converges
    full = pipe.generate("a cube", early_stop=0.0, **kw)
    assert full.steps == 6 and torch.equal(full.latents, pipe.generate("a cube", **kw).latents)


def test_early_stop_under_deep_cache_judges_full_calls_only(pipe):
    """Cached calls reuse the deep features, so their x0 estimates barely move; the stop is judged between full
    calls (steps 0, 3, 6, ... at interval 3): with any threshold, the first chance is after step 3."""
    kw = dict(steps=9, sampler="DPM++ 2M", seed=3, cache_interval=3)
    assert pipe.generate("a cube", early_stop=1e9, **kw).steps == 4
    assert pipe.generate("a cube", early_stop=0.0, **kw).steps == 9


def test_cache_interval_with_cfg_batch(pipe):
    deep = []
    handle = pipe.unet.mid_block.register_forward_hook(lambda m, a, o: deep.append(a[0].shape[0]))
    try:
        cached = pipe.generate("a red cube", steps=6, seed=1, guidance=7.5, cache_interval=3, n=2)
    finally:
        handle.remove()
    plain = pipe.generate("a red cube", steps=6, seed=1, guidance=7.5, n=2)
    assert deep == [4, 4]                             # UNet calls 0 and 3 of 6, each on [uncond; cond] x 2 images
    assert cached.steps == 6 and torch.isfinite(cached.latents).all()
    assert not torch.equal(cached.latents, plain.latents)
    assert torch.equal(pipe.generate("a red cube", steps=6, seed=1, guidance=7.5, n=2, cache_interval=1).latents,
                       plain.latents)


def test_batched_render_is_generate(pipe):
    # Labels are made from batched renders; they must be the images `generate(prompt, seed=s)` gives.
    # The same ops on a batch of 2 vs 1: GEMM blocking may differ in the last bits. 1e-5 with direct
    # convolutions; 5e-5 where the machine's tuning runs the full-resolution convolutions as Winograd, whose
    # GEMMs work on transformed values several times the activations' size (1.3e-5 measured on an AVX-512
    # EPYC). Either is far below an 8-bit level (3.9e-3).
    winograd = pipe.runtime_choice is not None and pipe.runtime_choice.winograd == "faster"
    raw = render(pipe, PROMPTS[:2], [7, 8], 3, "Euler", guidance=5.0)
    for i, p in enumerate(PROMPTS[:2]):
        ref = pipe.generate(p, steps=3, sampler="Euler", guidance=5.0, seed=7 + i).raw[0]
        assert np.abs(raw[i] - ref).max() <= (5e-5 if winograd else 1e-5)


def test_label_table_and_resume(pipe, tmp_path):
    table = build_label_table(pipe, PROMPTS[:3], "DPM++ 2M", guidance=5.0, steps=SMALL_GRID, batch=2,
                              judge=shapes_judge)
    sims = np.asarray(table.ssim)
    assert sims.shape == (3, 3) and np.allclose(sims[:, -1], 1.0)   # the reference against itself
    assert table.seeds == [0, 1, 2] and np.asarray(table.passed).shape == (3, 3)
    assert set(table.labels("ssim", 0.0)) == {2} and set(table.labels("ssim", 1.0 + 1e-9)) == {5}
    assert table.kind == "quality" and table.labels().tolist() == quality_labels(table.passed, SMALL_GRID).tolist()
    partial = build_label_table(pipe, PROMPTS[:2], "DPM++ 2M", guidance=5.0, steps=SMALL_GRID, batch=2)
    resumed = build_label_table(pipe, PROMPTS[:3], "DPM++ 2M", guidance=5.0, steps=SMALL_GRID, batch=2,
                                table=partial)
    assert np.allclose(resumed.ssim, table.ssim, atol=1e-5)
    with pytest.raises(ValueError, match="other prompts"):
        build_label_table(pipe, PROMPTS[1:], "DPM++ 2M", guidance=5.0, steps=SMALL_GRID, table=partial)


def _synthetic_table(sampler="dpmpp_2m", n=40):
    """Labels from the prompt's text: 8 steps for prompts with 'red', 12 without (SSIM rows made to say so)."""
    rng = np.random.default_rng(0)
    from fastldm.tools.shapes import random_caption
    prompts = [random_caption(rng) for _ in range(n)]
    grid = (8, 10, 12, 15)
    rows = [[1.0 if s >= (8 if "red" in p else 12) else 0.5 for s in grid] for p in prompts]
    return LabelTable("tiny", sampler, None, 7.5, 16, 16, grid, 0.9, prompts, list(range(n)), rows)


def test_steps_auto_in_api_and_png(pipe, folder, tmp_path):
    table = _synthetic_table()
    # 5 points a step: a clear rule; a light penalty, as the random text encoder barely tells the prompts apart
    predictor, report = train_from_table(pipe, table, holdout=0.0, cost=0.05, l2=0.01)
    assert report["train"] == 40 and "eval" not in report
    predictor.save(predictor_path(folder, "dpmpp_2m"), **report)
    try:
        # a training prompt with "red" and one without: the predictor learned the rule, and generate runs it
        red = next(p for p in table.prompts if "red" in p)
        other = next(p for p in table.prompts if "red" not in p)
        assert pipe.generate(red, steps="auto", seed=0).steps == 8
        assert pipe.generate(other, steps="auto", seed=0).steps == 12
        out = tmp_path / "out"
        res = CliRunner().invoke(main, ["generate", "a red cube", "--model", str(folder), "--steps", "auto",
                                        "--early-stop", "--cache-interval", "2", "--seed", "1", "--out", str(out)])
        assert res.exit_code == 0, res.output
        png = out / "00000-1.png"
        with Image.open(png) as im:
            _, _, params = parse_infotext(im.text["parameters"])
        ran = pipe.generate("a red cube", steps="auto", early_stop=DEFAULT_THRESHOLD, cache_interval=2, seed=1).steps
        assert params["Steps"] == str(ran) and params["Early stop"] == f"{DEFAULT_THRESHOLD:g}"
        assert params["DeepCache interval"] == "2"
    finally:
        predictor_path(folder, "dpmpp_2m").unlink()


def test_steps_auto_without_predictor_fails_cleanly(pipe, folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no step predictor for sampler Euler"):
        pipe.generate("x", steps="auto", sampler="Euler")
    with pytest.raises(ValueError, match="steps='many' is not valid: a whole number"):
        pipe.generate("x", steps="many")
    res = CliRunner().invoke(main, ["generate", "x", "--model", str(folder), "--steps", "auto", "--sampler", "Euler",
                                    "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "no step predictor" in res.output
    res = CliRunner().invoke(main, ["generate", "x", "--model", str(folder), "--steps", "0"])
    assert res.exit_code != 0 and "'auto'" in res.output


def test_cli_steps_label_and_train(folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    labels = tmp_path / "labels.json"
    res = CliRunner().invoke(main, ["steps", "label", "--model", str(folder), "--prompts", str(prompts),
                                    "--sampler", "Euler", "--guidance", "5", "--out", str(labels), "--judge", "shapes"])
    assert res.exit_code == 0, res.output
    table = LabelTable.load(labels)
    assert table.sampler == "euler" and len(table.prompts) == 1 and len(table.ssim[0]) == len(STEP_GRID)
    synthetic = _synthetic_table("euler")
    synthetic.save(labels)
    res = CliRunner().invoke(main, ["steps", "train", "--model", str(folder), "--labels", str(labels),
                                    "--out", str(tmp_path / "pred")])
    assert res.exit_code == 0, res.output
    assert "held-out (8)" in res.output
    assert load_predictor_file(tmp_path / "pred" / "euler.safetensors").sampler == "euler"


def test_cli_steps_train_falls_back_to_the_best_constant(folder, tmp_path):
    """Quality labels the prompt cannot explain (the seed decides): the predictor cannot beat fixed steps on the
    held-out table, so the file holds the best constant and says so."""
    rng = np.random.default_rng(3)
    from fastldm.tools.shapes import random_caption
    grid = (2, 4, 8, 20)

    def table(n):                                 # each image right from a random count on: 2, 4 or 8
        first = rng.choice([2, 4, 8], size=n)
        passed = (np.asarray(grid)[None] >= first[:, None]).tolist()
        prompts = [random_caption(rng) for _ in range(n)]
        return LabelTable("tiny", "euler", None, 7.5, 16, 16, grid, 0.9, prompts, list(range(n)),
                          [[1.0] * len(grid)] * n, passed)

    table(60).save(tmp_path / "train.json")
    table(40).save(tmp_path / "held.json")
    res = CliRunner().invoke(main, ["steps", "train", "--model", str(folder), "--labels", str(tmp_path / "train.json"),
                                    "--eval-labels", str(tmp_path / "held.json"), "--out", str(tmp_path / "pred")])
    assert res.exit_code == 0, res.output
    assert "saved the constant 8" in res.output
    saved = load_predictor_file(tmp_path / "pred" / "euler.safetensors")
    assert saved.predict_steps(saved.prompt_features(None, ["a red cube"])) == [8] and "fallback" in saved.info
