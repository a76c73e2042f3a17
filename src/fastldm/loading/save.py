"""Write a model as a diffusers folder (model_index.json, per-component config.json + safetensors,
scheduler and tokenizer folders), which both `fastldm.load` and diffusers' `from_pretrained` read."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import FASTLDM_JSON, ModelConfig
from ..errors import CheckpointError
from ..families import family_of


def _scheduler_entry(config: ModelConfig) -> dict:
    return {"_class_name": "DDIMScheduler", **{k: v for k, v in config.scheduler.items() if k != "_class_name"}}


def _check_complete(name: str, config, state: dict) -> None:
    """Refuse to write a component whose state dict lacks weights its architecture has: a loaded pipeline's
    UNet quantized to int8 keeps its weights in oneDNN's packed int8 form, outside its state dict."""
    from .load import _MODELS

    with torch.device("meta"):
        expected = _MODELS[name](config).state_dict().keys()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"the {name} has no plain weights for {len(missing)} tensors (e.g. {missing[0]}): it "
                              f"runs with int8 layers; save the model from its checkpoint, or load it without "
                              f"quantization")


def save_folder(config: ModelConfig, modules: dict[str, nn.Module], tokenizers: dict, path: str | Path,
                dtype: torch.dtype | None = None) -> Path:
    """Save `modules` ({"text_encoder", ..., "unet", "vae"}) and `tokenizers` ({"tokenizer": tok, ...}) as a
    diffusers folder at `path`. Written to a temporary folder first and moved into place: never half-written."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists; choose a new folder or delete it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fastldm-save-", dir=path.parent))
    index = {"_class_name": family_of(config).pipeline_class,
             "_diffusers_version": "0.30.0", "requires_safety_checker": False,
             "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    try:
        for name, module in modules.items():
            sub = getattr(config, name)
            (tmp / name).mkdir()
            cfg = sub.to_diffusers()
            if name.startswith("text_encoder"):
                index[name] = ["transformers", cfg["architectures"][0]]
                weights = "model.safetensors"
            else:
                index[name] = ["diffusers", cfg["_class_name"]]
                weights = "diffusion_pytorch_model.safetensors"
            (tmp / name / "config.json").write_text(json.dumps(cfg, indent=2))
            state = module.state_dict()
            _check_complete(name, sub, state)
            sd = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().contiguous().cpu()
                  for k, v in state.items()}
            save_file(sd, str(tmp / name / weights), metadata={"format": "pt"})
        (tmp / FASTLDM_JSON).write_text(json.dumps({"default_guidance": config.default_guidance}, indent=2))
        for name, tok in tokenizers.items():
            tok.save(tmp / name)
            index[name] = ["transformers", "CLIPTokenizer"]
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(_scheduler_entry(config), indent=2))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp made it private; a model folder is for everyone to read
            p.chmod(0o755 if p.is_dir() else 0o644)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
