"""Assemble the embedded model: vae.pt + ldm.pt -> a diffusers folder (fp16 weights), then check that it
fits the size budget and that fastldm and diffusers/transformers both load it and agree on the UNet.

    python training/export_embedded.py --vae runs/vae/vae.pt --ldm runs/ldm/ldm.pt \
        --out src/fastldm/assets/shapes-rgbd [--guidance 5]

--guidance: the CFG scale written to the folder's fastldm.json as the model's default (pick it with
training/eval_embedded.py --part guidance).
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import torch
from common import model_config, vae_config

from fastldm.loading.save import save_folder
from fastldm.models.clip import CLIPTextModel
from fastldm.models.unet import UNet2DConditionModel
from fastldm.models.vae import AutoencoderKL
from fastldm.tokenizer import CLIPTokenizer

MAX_BYTES = 25 * 2 ** 20


def build(vae_path: str, ldm_path: str):
    v, m = torch.load(vae_path, weights_only=False), torch.load(ldm_path, weights_only=False)
    # the latent scale the UNet was trained with (a decoder fine-tune keeps the encoder, hence the latents)
    config = model_config(vae_config(v["block_out_channels"], m["scaling_factor"]))
    modules = {"text_encoder": CLIPTextModel(config.text_encoder), "unet": UNet2DConditionModel(config.unet),
               "vae": AutoencoderKL(config.vae)}
    modules["text_encoder"].load_state_dict(m["text_encoder"])
    modules["unet"].load_state_dict(m["unet"])
    modules["vae"].load_state_dict(v["model"])
    return config, modules


@torch.no_grad()
def check_diffusers(folder: Path, modules: dict) -> str:
    """Load the folder with diffusers' StableDiffusionLDM3DPipeline and compare one UNet call and one
    text encoding with ours (both fp32 from the same fp16 weights)."""
    from diffusers import StableDiffusionLDM3DPipeline
    pipe = StableDiffusionLDM3DPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                        torch_dtype=torch.float32)
    ids = pipe.tokenizer(["a red sphere on the left"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    ours_ids = CLIPTokenizer.from_folder(folder / "tokenizer")(["a red sphere on the left"])
    assert torch.equal(ids, ours_ids), "tokenizers disagree"
    ctx_ref = pipe.text_encoder(ids)[0]
    ctx = modules["text_encoder"](ids).hidden
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    ref = pipe.unet(z, t, ctx_ref.expand(2, -1, -1)).sample
    out = modules["unet"](z, t, ctx.expand(2, -1, -1))
    img_ref = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    img = modules["vae"].decode(modules["vae"].from_unet_latents(z))
    return (f"diffusers: text max|diff| {(ctx - ctx_ref).abs().max():.2e}, unet {(out - ref).abs().max():.2e}, "
            f"vae {(img - img_ref).abs().max():.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True)
    p.add_argument("--ldm", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--guidance", type=float, default=5.0, help="the model's default CFG scale")
    a = p.parse_args()
    out = Path(a.out)
    if out.exists():
        if not a.force:
            raise SystemExit(f"{out} exists; pass --force to replace it")
        shutil.rmtree(out)
    config, modules = build(a.vae, a.ldm)
    config = dataclasses.replace(config, default_guidance=a.guidance)
    save_folder(config, modules, {"tokenizer": CLIPTokenizer.bundled(pad_id=49407)}, out, dtype=torch.float16)
    for f in [out, *out.rglob("*")]:   # save_folder's temporary folder is private (0700); a package asset is not
        f.chmod(0o755 if f.is_dir() else 0o644)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2 ** 20:.2f} MiB")
    if size > MAX_BYTES:
        raise SystemExit(f"{out} is {size / 2 ** 20:.1f} MiB, over the 25 MiB budget")
    # compare in fp32 with what was saved (fp16-rounded weights)
    for mod in modules.values():
        mod.half().float().eval()
    import fastldm
    pipe = fastldm.load(out)
    print("fastldm.load:", pipe)
    print(check_diffusers(out, modules))


if __name__ == "__main__":
    main()
