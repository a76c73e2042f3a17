"""`load(path)`: a diffusers folder or a single-file checkpoint -> a ready Pipeline.

Every network is built on the meta device and its weights are assigned tensor by tensor straight from
the (memory-mapped) file, converted to the requested dtype on the way, so the checkpoint is never held
twice. Loading is strict: missing, unexpected or mis-shaped tensors are an error, named.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import FASTLDM_JSON, CLIPConfig, ModelConfig, SD_SCHEDULER, UNetConfig, VAEConfig
from ..families import FAMILIES, Family, stack_default, vae_dtype
from ..models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from ..runtime.device import default_dtype
from .detect import detect_single_file
from .keymaps import apply_op, canonical_clip_keys, ldm_to_ours, modernize_vae_keys
from .safetensors_io import (PICKLE_SUFFIXES, CheckpointError, TensorInfo, TensorReader, load_pickle,
                             read_header, read_headers)

Fetch = Callable[[], torch.Tensor]
_MODELS = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModel, "unet": UNet2DConditionModel,
           "vae": AutoencoderKL}
_WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                 "text_encoder": "model", "text_encoder_2": "model"}


def _name_some(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def build(component: str, config, fetch: dict[str, Fetch], dtype: torch.dtype, device: torch.device,
          where: str, channels_last: bool = False,
          layer: Callable[[str, nn.Module], nn.Module] | None = None) -> nn.Module:
    """Build `component` on the meta device and assign every tensor from `fetch` (strict); 4-D tensors in
    channels_last when asked (converted as they are read: no second pass over the whole model). layer(name,
    module): called on each module as soon as its own tensors are in, and put in its place (int8 quantization
    while reading: the float weights are held one layer at a time)."""
    with torch.device("meta"):
        model = _MODELS[component](config)
    expected = model.state_dict()
    missing, unexpected = expected.keys() - fetch.keys(), fetch.keys() - expected.keys()
    if missing or unexpected:
        parts = [f"{len(missing)} missing ({_name_some(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_name_some(unexpected)})" if unexpected else ""]
        raise CheckpointError(f"{where}: {component} weights do not match its config: "
                              f"{'; '.join(p for p in parts if p)}; the checkpoint is of another architecture "
                              f"or incomplete")
    def read(key: str) -> torch.Tensor:
        t, ref = fetch[key](), expected[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{where}: {component} tensor {key} has shape {list(t.shape)}, the config "
                                  f"expects {list(ref.shape)}; the config and the weights disagree")
        fmt = torch.channels_last if channels_last and t.dim() == 4 else torch.preserve_format
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, memory_format=fmt)

    if layer is None:
        model.load_state_dict({key: read(key) for key in expected}, strict=True, assign=True)
        return model.eval().requires_grad_(False)
    model.eval().requires_grad_(False)
    for name in [n for n, _ in model.named_modules()]:
        module = model.get_submodule(name)
        prefix = f"{name}." if name else ""
        for table in (module._parameters, module._buffers):
            for k, v in table.items():
                if v is not None and f"{prefix}{k}" in expected:
                    t = read(f"{prefix}{k}")
                    table[k] = nn.Parameter(t, requires_grad=False) if isinstance(v, nn.Parameter) else t
        new = layer(name, module)
        if new is not module:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
    return model


def skeleton(component: str, config: ModelConfig, dtype: torch.dtype) -> nn.Module:
    """`component` of `config` on the meta device (shapes, no bytes) in `dtype`: what a staged component is
    between its stages (runtime/residency.py fills it from the checkpoint when its stage runs)."""
    with torch.device("meta"):
        model = _MODELS[component](getattr(config, component))
    return model.to(dtype).eval().requires_grad_(False)


def _reader_fetch(reader: TensorReader, infos: dict[str, TensorInfo], rename: dict[str, str]) -> dict[str, Fetch]:
    return {ours: (lambda src=src: reader.get(infos[src], src)) for ours, src in rename.items()}


# ---- diffusers folders ------------------------------------------------------------------------------------

def _component_files(folder: Path, component: str, variant: str | None) -> list[Path]:
    d, stem = folder / component, _WEIGHT_NAMES[component]
    names = ([f"{stem}.{variant}.safetensors"] if variant else []) + [f"{stem}.safetensors"]
    if not variant:
        names.append(f"{stem}.fp16.safetensors")
    for name in names:
        if (d / name).exists():
            return [d / name]
        index = d / f"{name}.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [d / s for s in shards]
    pickles = [p.name for p in d.glob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        return [d / pickles[0]]
    raise CheckpointError(f"{d}: no weights found (looked for {', '.join(names)}); the folder is incomplete")


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: missing; the diffusers folder is incomplete")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: is not valid JSON ({e.msg} at line {e.lineno})") from None


def _default_guidance(folder: Path) -> float:
    """The CFG scale a folder's optional fastldm.json recommends ({"default_guidance": 5.0}), else SD's 7.5."""
    path = folder / FASTLDM_JSON
    if not path.exists():
        return 7.5
    value = _read_json(path).get("default_guidance", 7.5)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1.0:
        raise CheckpointError(f"{path}: default_guidance must be a number >= 1, got {value!r}")
    return float(value)


def _folder_config(folder: Path, index: dict) -> ModelConfig:
    te = _read_json(folder / "text_encoder" / "config.json")
    has_te2 = (folder / "text_encoder_2").is_dir()
    te2 = _read_json(folder / "text_encoder_2" / "config.json") if has_te2 else None
    sched_file = folder / "scheduler" / "scheduler_config.json"
    # The folder's own scheduler config, as is: missing keys take the defaults of the diffusers class each
    # sampler mirrors (schedules.py), exactly as `<Scheduler>.from_config(folder_config)` does.
    sched = _read_json(sched_file) if sched_file.exists() else dict(SD_SCHEDULER)
    vae = VAEConfig.from_diffusers(_read_json(folder / "vae" / "config.json"))
    unet = UNetConfig.from_diffusers(_read_json(folder / "unet" / "config.json"))
    row = _folder_family(index, te, has_te2, vae, sched.get("prediction_type", "epsilon"))
    projected = "WithProjection" in str(index.get("text_encoder", ""))
    clip = dataclasses.replace(CLIPConfig.from_diffusers(te, projection=projected),
                               pad_token_id=row.preset.text_encoder.pad_token_id)
    return ModelConfig(
        family=row.stack, text_encoder=clip, unet=unet, vae=vae, default_guidance=_default_guidance(folder),
        text_encoder_2=None if te2 is None else dataclasses.replace(
            CLIPConfig.from_diffusers(te2, projection=True), pad_token_id=row.preset.text_encoder_2.pad_token_id),
        clip_layer=row.preset.clip_layer, scheduler=sched,
        default_size=unet.sample_size * 2 ** (len(vae.block_out_channels) - 1))


def _folder_family(index: dict, te: dict, has_te2: bool, vae: VAEConfig, prediction: str) -> Family:
    """A diffusers folder's row of families.py: two text encoders -> SDXL; an LDM3D pipeline or an RGB +
    depth VAE -> LDM3D (4c or 6c); an OpenCLIP text encoder (gelu; OpenAI's CLIP uses quick_gelu) or a
    1024-wide one -> SD2 (sd2 / sd2-v by the scheduler's prediction type); else SD1."""
    if has_te2:
        stack = "sdxl"
    elif "LDM3D" in index.get("_class_name", "") or vae.out_channels in (4, 6):
        stack = "ldm3d"
    else:
        stack = "sd2" if te.get("hidden_act") == "gelu" or te.get("hidden_size") == 1024 else "sd1"
    rows = [f for f in FAMILIES if f.stack == stack]
    return next((f for f in rows if f.vae_channels == vae.out_channels and f.prediction == prediction),
                stack_default(stack, vae.out_channels))


def _folder_weights(folder: Path, component: str, variant: str | None, allow_pickle: bool,
                    reader: TensorReader) -> dict[str, Fetch]:
    files = _component_files(folder, component, variant)
    if files[0].suffix in PICKLE_SUFFIXES:
        sd, _ = load_pickle(files[0], allow_pickle)
        fetch = {k: (lambda v=v: v) for k, v in sd.items()}
    else:
        infos = read_headers(files)
        fetch = _reader_fetch(reader, infos, {k: k for k in infos})
    if component == "vae":
        fetch = {modernize_vae_keys([k])[0]: f for k, f in fetch.items()}
    elif component.startswith("text_encoder"):
        fetch = {new: fetch[old] for new, old in zip(canonical_clip_keys(list(fetch)), fetch)
                 if not new.endswith("position_ids")}
    return fetch


def load_folder(folder: Path, dtype: torch.dtype | None, device: torch.device, variant: str | None = None,
                allow_pickle: bool = False, components: frozenset[str] | None = None,
                storage: dict[str, torch.dtype] | None = None, channels_last: frozenset[str] = frozenset(),
                layers: dict[str, Callable] | None = None) -> tuple[ModelConfig, dict[str, nn.Module]]:
    index = _read_json(folder / "model_index.json")
    config = _folder_config(folder, index)
    reader, modules = TensorReader(), {}
    try:
        for comp in ("text_encoder", "text_encoder_2", "unet", "vae"):
            sub = {"text_encoder": config.text_encoder, "text_encoder_2": config.text_encoder_2,
                   "unet": config.unet, "vae": config.vae}[comp]
            if sub is None or (components is not None and comp not in components):
                continue
            fetch = _folder_weights(folder, comp, variant, allow_pickle, reader)
            modules[comp] = build(comp, sub, fetch, _storage_dtype(comp, config, dtype, device, storage), device,
                                  str(folder), comp in channels_last, (layers or {}).get(comp))
    finally:
        reader.close()
    return config, modules


# ---- single files -------------------------------------------------------------------------------------------

def load_single_file(path: Path, dtype: torch.dtype | None, device: torch.device, allow_pickle: bool = False,
                     prediction_type: str | None = None, components: frozenset[str] | None = None,
                     storage: dict[str, torch.dtype] | None = None, channels_last: frozenset[str] = frozenset(),
                     layers: dict[str, Callable] | None = None) -> tuple[ModelConfig, dict[str, nn.Module]]:
    reader = TensorReader()
    if path.suffix in PICKLE_SUFFIXES:
        sd, meta = load_pickle(path, allow_pickle)
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        get = sd.__getitem__
    else:
        infos, meta = read_header(path)
        shapes = {k: i.shape for k, i in infos.items()}
        get = lambda k: reader.get(infos[k], k)  # noqa: E731
    config = detect_single_file(shapes, meta, prediction_type)
    maps = ldm_to_ours(config, list(shapes))
    modules = {}
    try:
        for comp, table in maps.items():
            if components is not None and comp not in components:
                continue
            sub = getattr(config, comp)
            fetch = {ours: (lambda r=r: apply_op(r.op, get(r.src))) for ours, r in table.items()}
            modules[comp] = build(comp, sub, fetch, _storage_dtype(comp, config, dtype, device, storage), device,
                                  str(path), comp in channels_last, (layers or {}).get(comp))
    finally:
        reader.close()
    return config, modules


def _component_dtype(component: str, config: ModelConfig, dtype: torch.dtype | None,
                     device: torch.device) -> torch.dtype:
    """The requested dtype, else the device's default for this model (runtime.device.default_dtype); the VAE's
    may be fp32 in an fp16 pipeline (families.vae_dtype)."""
    dtype = dtype or default_dtype(device, config)
    return vae_dtype(config, dtype) if component == "vae" else dtype


def _storage_dtype(component: str, config: ModelConfig, dtype: torch.dtype | None, device: torch.device,
                   storage: dict[str, torch.dtype] | None) -> torch.dtype:
    """The dtype a component's tensors are stored in: a memory plan's choice if it made one (16-bit weights
    widened as they are used, runtime/weight_storage.py), else `_component_dtype`."""
    if storage is not None and component in storage:
        return storage[component]
    return _component_dtype(component, config, dtype, device)


def read_config(path: str | Path, prediction_type: str | None = None) -> ModelConfig | None:
    """A checkpoint's ModelConfig from its configs or safetensors header alone (no tensor data), or None for
    a pickle file (whose names cannot be read without unpickling it). Errors as `load_components`."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise CheckpointError(f"{path}: a folder without model_index.json; give a diffusers folder or a "
                                  f".safetensors file")
        config = _folder_config(path, _read_json(path / "model_index.json"))
        if prediction_type is not None:
            config = config.replace(scheduler={**config.scheduler, "prediction_type": prediction_type})
        return config
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; check the path")
    if path.suffix in PICKLE_SUFFIXES:
        return None
    infos, meta = read_header(path)
    return detect_single_file({k: i.shape for k, i in infos.items()}, meta, prediction_type)


def load_components(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    variant: str | None = None, allow_pickle: bool = False, prediction_type: str | None = None,
                    components: frozenset[str] | None = None, storage: dict[str, torch.dtype] | None = None,
                    channels_last: frozenset[str] = frozenset(), layers: dict[str, Callable] | None = None
                    ) -> tuple[ModelConfig, dict[str, nn.Module]]:
    """(config, {"text_encoder", ["text_encoder_2"], "unet", "vae": module}) from a folder or a file.
    components: only these (a memory plan loads the others when their stage runs); storage: {component:
    dtype} to store tensors in instead of `dtype` (a memory plan's 16-bit weights)."""
    path, device = Path(path).expanduser(), torch.device(device)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise CheckpointError(f"{path}: a folder without model_index.json; give a diffusers folder or a "
                                  f".safetensors file")
        config, modules = load_folder(path, dtype, device, variant, allow_pickle, components, storage, channels_last,
                                      layers)
        if prediction_type is not None:
            config = config.replace(scheduler={**config.scheduler, "prediction_type": prediction_type})
        return config, modules
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; check the path")
    return load_single_file(path, dtype, device, allow_pickle, prediction_type, components, storage, channels_last,
                            layers)
