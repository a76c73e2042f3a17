"""End to end: diffusers' pipelines and fastldm generate from the same folder, prompt, seed and sampler
-> the same image (within 2/255 per pixel); the CLI writes PNGs with A1111 parameters and fails cleanly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import fastldm
from conftest import tiny_diffusers_pipeline
from fastldm.cli import main
from fastldm.images import parse_infotext
from fastldm.loading.safetensors_io import CheckpointError
from fastldm.loading.save import save_folder

TOL = 2 / 255  # the bound; observed differences are ~1e-5 (float op order)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "tiny-sd"
    tiny_diffusers_pipeline("sd1").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipes(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder), fastldm.load(folder, dtype="fp32")


SCHEDULERS = {"DDIM": "DDIMScheduler", "Euler": "EulerDiscreteScheduler", "DPM++ 2M": "DPMSolverMultistepScheduler",
              "Euler a": "EulerAncestralDiscreteScheduler"}


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_txt2img_matches_diffusers(pipes, folder, sampler):
    import diffusers

    ref_pipe, ours = pipes
    ref_pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_pretrained(folder / "scheduler")
    kw = dict(guidance_scale=7.5, output_type="np", height=64, width=48, negative_prompt="blurry")
    ref = ref_pipe("a red cube on a table", num_inference_steps=4, generator=torch.Generator().manual_seed(11),
                   **kw).images
    out = ours.generate("a red cube on a table", negative_prompt="blurry", steps=4, sampler=sampler,
                        guidance=7.5, seed=11, width=48, height=64)
    assert out.raw.shape == ref.shape
    assert np.abs(out.raw - ref).max() <= TOL
    assert out.steps == 4 and out.seeds == [11]


def test_batch_seeds_are_seed_plus_i(pipes):
    _, ours = pipes
    batch = ours.generate("a cube", steps=2, sampler="Euler", seed=5, n=2, width=32, height=32)
    single = ours.generate("a cube", steps=2, sampler="Euler", seed=6, width=32, height=32)
    assert batch.seeds == [5, 6]
    # Same noise, same image: only float op order differs with the batch size (GEMM/attention blocking),
    # ~1e-5; another seed would differ by O(0.1).
    assert np.abs(batch.raw[1] - single.raw[0]).max() < 1e-4


def test_img2img_matches_diffusers(pipes, folder):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    ref_pipe, ours = pipes
    img2img = StableDiffusionImg2ImgPipeline(**ref_pipe.components)
    img2img.scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    init = Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8))
    ref = img2img("a cube", image=init, strength=0.6, num_inference_steps=5, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(2), output_type="np").images
    out = ours.generate("a cube", init_image=init, strength=0.6, steps=5, sampler="DDIM", guidance=7.5, seed=2,
                        width=64, height=48)
    assert np.abs(out.raw - ref).max() <= TOL
    assert out.steps == 3  # int(5 * 0.6) steps run, as diffusers


def test_guidance_one_runs_cond_only(pipes):
    _, ours = pipes
    calls = []
    handle = ours.unet.register_forward_hook(lambda m, a, kw: calls.append(a[0].shape[0]))
    try:
        ours.generate("x", steps=2, sampler="Euler", guidance=1.0, seed=0, width=32, height=32)
    finally:
        handle.remove()
    assert calls == [1, 1]


def test_callback_stops_early(pipes):
    _, ours = pipes
    seen = []
    out = ours.generate("x", steps=6, sampler="DPM++ 2M", seed=0, width=32, height=32,
                        callback=lambda info: seen.append(info["i"]) or info["i"] == 2)
    assert seen == [0, 1, 2] and out.steps == 3 and np.isfinite(out.raw).all()


def test_long_and_weighted_prompts(pipes):
    _, ours = pipes
    long = ", ".join(["a very detailed red cube"] * 30)  # > 75 tokens: several chunks
    cond = ours.encode_prompt([long])["encoder_hidden_states"]
    assert cond.shape[1] % 77 == 0 and cond.shape[1] > 77
    plain = ours.encode_prompt(["a red cube"])["encoder_hidden_states"]
    weighted = ours.encode_prompt(["a (red:1.5) cube"])["encoder_hidden_states"]
    assert not torch.allclose(plain, weighted)
    ours.generate(long, steps=1, sampler="Euler", seed=0, width=32, height=32)


def test_bad_requests(pipes):
    _, ours = pipes
    with pytest.raises(ValueError, match="width=50 is not valid: a multiple of 8"):
        ours.generate("x", width=50, height=64)
    with pytest.raises(ValueError, match="sampler='nope' is not valid: one of"):
        ours.generate("x", sampler="nope")
    with pytest.raises(ValueError, match="strength"):
        ours.generate("x", init_image=Image.new("RGB", (32, 32)), strength=1.5, width=32, height=32)


def test_rgbd_model_returns_depth(tmp_path):
    path = tmp_path / "ldm3d"
    tiny_diffusers_pipeline("ldm3d").save_pretrained(path)
    ours = fastldm.load(path, dtype="fp32")
    assert ours.config.rgbd
    out = ours.generate("a sphere", steps=2, seed=0, width=32, height=32)
    assert out.depths is not None and out.depths[0].dtype == np.uint16 and out.depths[0].shape == (32, 32)


def test_cli_generate_writes_png_with_parameters(folder, tmp_path):
    out_dir = tmp_path / "out"
    res = CliRunner().invoke(main, ["generate", "a red cube, shiny", "--model", str(folder), "--steps", "2",
                                    "--sampler", "Euler a", "--seed", "42", "--size", "32x40", "-n", "2",
                                    "--negative", "blurry", "--out", str(out_dir)])
    assert res.exit_code == 0, res.output
    files = sorted(out_dir.glob("*.png"))
    assert [f.name for f in files] == ["00000-42.png", "00001-43.png"]
    with Image.open(files[1]) as im:
        assert im.size == (32, 40)
        prompt, negative, params = parse_infotext(im.text["parameters"])
    assert prompt == "a red cube, shiny" and negative == "blurry"
    assert params["Steps"] == "2" and params["Sampler"] == "Euler a" and params["Seed"] == "43"
    assert params["Size"] == "32x40" and params["CFG scale"] == "7.5" and len(params["Model hash"]) == 10
    assert params["Model"] == "tiny-sd"


@pytest.mark.parametrize("args,message,code", [
    (["--size", "30x32"], "width=30 is not valid: a multiple of 8 from 8 to 8192 (e.g. 24) [--size]", 4),
    (["--size", "big"], "WIDTHxHEIGHT", 2),
    (["--sampler", "warp drive"], "sampler='warp drive' is not valid: one of Euler (euler)", 4),
    (["--init-image", "/nonexistent.png"], "init_image='/nonexistent.png' is not valid: an existing image file", 4),
])
def test_cli_errors_write_nothing(folder, tmp_path, args, message, code):
    out_dir = tmp_path / "out"
    res = CliRunner().invoke(main, ["generate", "x", "--model", str(folder), "--steps", "1", "--out", str(out_dir),
                                    *args])
    assert res.exit_code == code and message in res.output, res.output
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_cli_missing_model_and_bad_init_image(tmp_path):
    res = CliRunner().invoke(main, ["generate", "x", "--model", str(tmp_path / "missing.safetensors")])
    assert res.exit_code == 3 and "no such file" in res.output
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    res = CliRunner().invoke(main, ["generate", "x", "--model", str(tmp_path), "--init-image", str(bad)])
    assert res.exit_code == 4 and "a readable PNG or JPEG" in res.output


def test_cli_samplers_lists_names():
    res = CliRunner().invoke(main, ["samplers"])
    assert res.exit_code == 0 and "DPM++ 2M" in res.output and "euler_ancestral" in res.output


def test_sdxl_txt2img_matches_diffusers(tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    path = tmp_path / "sdxl"
    tiny_diffusers_pipeline("sdxl").save_pretrained(path)
    ref_pipe = StableDiffusionXLPipeline.from_pretrained(path)
    ref_pipe.scheduler = EulerDiscreteScheduler.from_pretrained(path / "scheduler")
    ours = fastldm.load(path, dtype="fp32")
    for negative in ("", "ugly"):  # empty negative: SDXL's zeroed unconditional embedding
        ref = ref_pipe("a red cube", negative_prompt=negative or None, num_inference_steps=3, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(4), output_type="np", height=32, width=32).images
        out = ours.generate("a red cube", negative_prompt=negative, steps=3, sampler="Euler", guidance=5.0, seed=4,
                            width=32, height=32)
        assert np.abs(out.raw - ref).max() <= TOL


def test_model_default_guidance_from_fastldm_json(folder, tmp_path):
    """A folder's fastldm.json sets the CFG scale used when a request gives none; diffusers ignores the file."""
    import json
    import shutil

    path = tmp_path / "tuned"
    shutil.copytree(folder, path)
    (path / "fastldm.json").write_text(json.dumps({"default_guidance": 4.0}))
    pipe = fastldm.load(path, dtype="fp32")
    assert pipe.config.default_guidance == 4.0
    implicit = pipe.generate("a cube", steps=2, seed=1, width=32, height=32)
    explicit = pipe.generate("a cube", steps=2, seed=1, width=32, height=32, guidance=4.0)
    assert implicit.request.guidance == 4.0 and np.array_equal(implicit.raw, explicit.raw)
    assert parse_infotext(fastldm.api.parameters_text(pipe, implicit, 0))[2]["CFG scale"] == "4"
    assert fastldm.load(folder, dtype="fp32").config.default_guidance == 7.5  # no file: SD's 7.5
    saved = tmp_path / "saved"
    save_folder(pipe.config, {"text_encoder": pipe.text_encoder, "unet": pipe.unet,
                                                   "vae": pipe.vae}, {"tokenizer": pipe.tokenizer}, saved)
    assert json.loads((saved / "fastldm.json").read_text()) == {"default_guidance": 4.0}


@pytest.mark.parametrize("value", ["5", 0.5, True])
def test_bad_default_guidance_is_a_one_line_error(folder, tmp_path, value):
    import json
    import shutil

    path = tmp_path / "bad"
    shutil.copytree(folder, path)
    (path / "fastldm.json").write_text(json.dumps({"default_guidance": value}))
    with pytest.raises(CheckpointError, match="default_guidance must be a number"):
        fastldm.load(path)


def test_inpainting_unet_txt2img_matches_diffusers(pipes, tmp_path):
    """A 9-channel inpainting UNet makes a whole image as diffusers' inpainting pipeline does with a white mask:
    the UNet also takes the mask and the latents of the (fully masked) image, sampled after the noise."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel

    from conftest import UNET_CASES, randomize_

    ref_pipe, _ = pipes
    config = UNET_CASES["inpaint"] | {"cross_attention_dim": 32, "sample_size": 8}
    unet = randomize_(UNet2DConditionModel(**config).eval(), 5, std=0.08)
    inpaint = StableDiffusionInpaintPipeline(**(ref_pipe.components | {"unet": unet}))
    inpaint.save_pretrained(tmp_path / "inpaint")
    inpaint.scheduler = DDIMScheduler.from_config(inpaint.scheduler.config)
    ours = fastldm.load(tmp_path / "inpaint", dtype="fp32")
    assert [v.name for v in ours.variants] == ["inpainting"]
    grey, white = Image.new("RGB", (32, 32), (128, 128, 128)), Image.new("L", (32, 32), 255)
    ref = inpaint("a cube", image=grey, mask_image=white, num_inference_steps=4, guidance_scale=7.5, height=32,
                  width=32, generator=[torch.Generator().manual_seed(4)], output_type="np").images
    out = ours.generate("a cube", steps=4, sampler="DDIM", guidance=7.5, seed=4, width=32, height=32)
    assert np.abs(out.raw - ref).max() <= TOL


def test_fp16_vae_dtype_follows_diffusers_pipelines(folder, tmp_path):
    """An fp16 pipeline decodes SD 1.x's VAE in fp16 though its config says force_upcast (diffusers' SD pipeline
    does too); SDXL's VAE, which overflows fp16, stays fp32 (diffusers' SDXL pipeline upcasts it)."""
    from fastldm.families import PRESETS, vae_dtype

    sd = fastldm.load(folder, dtype="fp16")
    assert sd.config.vae.force_upcast and sd.vae.decoder.conv_in.weight.dtype == torch.float16
    tiny_diffusers_pipeline("sdxl").save_pretrained(tmp_path / "xl")
    xl = fastldm.load(tmp_path / "xl", dtype="fp16")
    assert xl.vae.decoder.conv_in.weight.dtype == torch.float32 and xl.unet.conv_in.weight.dtype == torch.float16
    assert vae_dtype(PRESETS["sdxl"], torch.bfloat16) == torch.bfloat16  # bf16 has fp32's range: no upcast


def test_an_fp16_decode_that_overflows_is_decoded_again_in_fp32(folder):
    """An fp16 VAE whose decoder exceeds fp16's range gives inf/NaN; the pipeline decodes that image again
    in fp32 (with the fp16 weights, widened) and returns what an fp32 copy of the VAE gives."""
    import copy

    pipe = fastldm.load(folder, dtype="fp16")
    with torch.no_grad():
        # Weights still finite in fp16, the first conv's outputs past 65504: inf, then NaN from the GroupNorm.
        w = pipe.vae.decoder.conv_in.weight
        w.mul_(6e4 / w.abs().max().item())
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
        with pipe.kernels_active():
            assert pipe.vae.decode(pipe.vae.from_unet_latents(z)).isnan().any()
        vae32 = copy.deepcopy(pipe.vae).float()
        want = (vae32.decode(vae32.from_unet_latents(z.float())) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    got = pipe.decode(z)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6)
    assert pipe.vae.decoder.conv_in.weight.dtype == torch.float16  # the pipeline's VAE is left as it was


def test_an_fp16_encode_that_overflows_is_encoded_again_in_fp32(folder):
    """img2img's VAE encode, as the decode: an fp16 encoder past fp16's range is run again in fp32."""
    import copy

    from fastldm.samplers import randn

    pipe = fastldm.load(folder, dtype="fp16")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        w = pipe.vae.encoder.conv_in.weight
        w.mul_(6e4 / w.abs().max().item())   # finite weights, first conv's outputs past 65504
        with pipe.kernels_active():
            assert not torch.isfinite(pipe.vae.encode(x.half())[0]).all()
        vae32 = copy.deepcopy(pipe.vae).float()
        mean, logvar = vae32.encode(x)
        gens = [torch.Generator().manual_seed(1)]
        got = pipe.encode_pixels(x, gens)
        want = vae32.to_unet_latents(mean.half() + (0.5 * logvar.half()).exp()
                                     * randn(mean.shape, torch.Generator().manual_seed(1), mean.device, torch.float16))
    assert torch.isfinite(got).all() and got.dtype == torch.float16
    torch.testing.assert_close(got, want.half(), rtol=1e-3, atol=1e-3)
