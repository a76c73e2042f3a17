"""`fastldm info`: what a checkpoint is, from its headers and configs only (no tensor data is read)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from .families import family_of, variants_of
from .loading.detect import detect_single_file
from .loading.load import _MODELS, _component_files, _folder_config, _read_json
from .loading.safetensors_io import PICKLE_SUFFIXES, CheckpointError, load_pickle, read_header, read_headers


def _params(component: str, config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in _MODELS[component](config).parameters())


def describe(path: str | Path, allow_pickle: bool = False) -> str:
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise CheckpointError(f"{path}: a folder without model_index.json; give a diffusers folder or a "
                                  f".safetensors file")
        config = _folder_config(path, _read_json(path / "model_index.json"))
        dtypes = Counter()
        for comp in ("text_encoder", "text_encoder_2", "unet", "vae"):
            if (path / comp).is_dir():
                files = _component_files(path, comp, None)
                if files[0].suffix not in PICKLE_SUFFIXES:
                    dtypes.update(i.dtype for i in read_headers(files).values())
        kind = "diffusers folder"
    else:
        if path.suffix in PICKLE_SUFFIXES:
            sd, meta = load_pickle(path, allow_pickle)
            shapes = {k: tuple(v.shape) for k, v in sd.items()}
            dtypes = Counter(str(v.dtype).removeprefix("torch.") for v in sd.values())
        else:
            infos, meta = read_header(path)
            shapes = {k: i.shape for k, i in infos.items()}
            dtypes = Counter(i.dtype for i in infos.values())
        config = detect_single_file(shapes, meta)
        kind = "single file"
    comps = {"text_encoder": config.text_encoder, "text_encoder_2": config.text_encoder_2,
             "unet": config.unet, "vae": config.vae}
    variants = ", ".join(v.name for v in variants_of(config))
    lines = [f"path:            {path}", f"format:          {kind}",
             f"family:          {family_of(config).name}" + (f" ({variants})" if variants else ""),
             f"prediction type: {config.prediction_type}",
             f"dtype:           {', '.join(d for d, _ in dtypes.most_common()) or 'unknown'}",
             f"default size:    {config.default_size}", f"default CFG:     {config.default_guidance:g}",
             f"rgbd:            {'yes' if config.rgbd else 'no'}",
             "components:"]
    total = 0
    for name, sub in comps.items():
        if sub is None:
            continue
        n = _params(name, sub)
        total += n
        lines.append(f"  {name:<15}{n / 1e6:10.2f} M parameters")
    lines.append(f"  {'total':<15}{total / 1e6:10.2f} M parameters")
    u = config.unet
    lines.append(f"unet:            channels {list(u.block_out_channels)}, layers {list(u.layers_per_block)}, "
                 f"in {u.in_channels}, cross-attn dim {u.cross_attention_dim}, mid block {'yes' if u.mid_block else 'no'}")
    return "\n".join(lines)
