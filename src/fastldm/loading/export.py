"""Write a model as one single-file .safetensors checkpoint with the original (ldm / sgm) key names, which
A1111, ComfyUI, diffusers' `from_single_file` and `fastldm.load` all read.

The key map is `keymaps.ldm_to_ours` run backwards: each source key is rebuilt from the tensors that read
it ("squeeze" -> 1x1 conv, "transpose" back, q/k/v concatenated into `in_proj_*`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ModelConfig
from ..files import atomic_write
from ..families import family_of
from .keymaps import Op, is_ignored, ldm_to_ours


def _invert(parts: list[tuple[Op, torch.Tensor]]) -> torch.Tensor:
    """The source tensor from the (op, our tensor) pairs that read it."""
    op, t = parts[0]
    if op is None:
        return t
    if op == "squeeze":
        return t[:, :, None, None]  # (O, I) -> (O, I, 1, 1)
    if op == "transpose":
        return t.t()  # (proj, width) -> (width, proj)
    if op[0] == "qkv":
        return torch.cat([t for _, t in sorted(parts, key=lambda p: p[0][1])], dim=0)  # 3 x (D, ...) -> (3*D, ...)
    raise ValueError(f"unknown key-map op {op!r}")


def _sd2_padding(config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """SD2 files hold OpenCLIP-H whole: 24 blocks (SD2 runs 23) and a text projection (SD2 uses none).
    We write the extra block as an exact identity (zero attention and MLP outputs: x + 0 + 0) and an
    identity projection, so readers that expect every key find them and any reader computes our model."""
    c, p = config.text_encoder, family_of(config).text_layout["text_encoder"][1]
    W, I, b = c.hidden_size, c.intermediate_size, f"{p}transformer.resblocks.{c.num_hidden_layers}"
    z = lambda *s: torch.zeros(s, dtype=dtype)  # noqa: E731
    return {f"{b}.ln_1.weight": torch.ones(W, dtype=dtype), f"{b}.ln_1.bias": z(W),
            f"{b}.attn.in_proj_weight": z(3 * W, W), f"{b}.attn.in_proj_bias": z(3 * W),
            f"{b}.attn.out_proj.weight": z(W, W), f"{b}.attn.out_proj.bias": z(W),
            f"{b}.ln_2.weight": torch.ones(W, dtype=dtype), f"{b}.ln_2.bias": z(W),
            f"{b}.mlp.c_fc.weight": z(I, W), f"{b}.mlp.c_fc.bias": z(I),
            f"{b}.mlp.c_proj.weight": z(W, I), f"{b}.mlp.c_proj.bias": z(W),
            f"{p}text_projection": torch.eye(W, dtype=dtype)}


def _some(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def save_single_file(state_dicts: dict[str, dict[str, torch.Tensor]], config: ModelConfig,
                     path: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: dict | None = None) -> Path:
    """Write {"unet", "vae", "text_encoder"[, "text_encoder_2"]: our state dict} as a single-file checkpoint
    of `config`'s family (sd1, sd2, sdxl, ldm3d; inpainting and LCM UNets included). Floating tensors are
    cast to `dtype` if given. The prediction type is recorded (metadata `modelspec.prediction_type`, plus
    ComfyUI's empty `v_pred` / `ztsnr` marker tensors) so `detect_single_file` reads it back; `metadata`
    adds to or overrides that. Written to a temporary file and renamed: never half-written."""
    maps = ldm_to_ours(config)
    if state_dicts.keys() != maps.keys():
        raise ValueError(f"save_single_file: a {config.family} checkpoint needs state dicts {sorted(maps)}, "
                         f"got {sorted(state_dicts)}")
    out: dict[str, torch.Tensor] = {}
    for comp, table in maps.items():
        sd = {k: v for k, v in state_dicts[comp].items() if not is_ignored(k, config)}  # e.g. position_ids
        missing, extra = table.keys() - sd.keys(), sd.keys() - table.keys()
        if missing or extra:
            raise ValueError(f"save_single_file: {comp} state dict does not match its config: "
                             + "; ".join(f"{len(ks)} {what} ({_some(ks)})" for ks, what in
                                         ((missing, "missing"), (extra, "unexpected")) if ks))
        groups: dict[str, list[tuple[Op, torch.Tensor]]] = {}
        for ours, r in table.items():
            groups.setdefault(r.src, []).append((r.op, sd[ours]))
        out.update({src: _invert(parts) for src, parts in groups.items()})
    if family_of(config).drop_text_layers:
        out.update(_sd2_padding(config, state_dicts["text_encoder"]["text_model.final_layer_norm.weight"].dtype))
    v = config.prediction_type == "v_prediction"
    if v:
        out["v_pred"] = torch.empty(0)
    if config.scheduler.get("rescale_betas_zero_snr"):
        out["ztsnr"] = torch.empty(0)
    out = {k: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().cpu().contiguous()
           for k, t in out.items()}
    meta = {"format": "pt", "modelspec.prediction_type": "v" if v else "epsilon"}
    meta.update({str(k): str(val) for k, val in (metadata or {}).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: save_file(out, str(tmp), metadata=meta))
