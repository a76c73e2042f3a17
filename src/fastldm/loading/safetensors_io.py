"""Checkpoint files: validated safetensors headers, lazy tensor reads, and the explicit pickle opt-in.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the data.
The header is checked completely before any tensor is read, so a truncated or lying file fails with a
message instead of a crash or garbage weights.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: Path


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a .safetensors file's header -> ({name: TensorInfo}, metadata). Reads no tensor data."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder without model_index.json; give a diffusers folder or a .safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file, or truncated (header claims {n} bytes, "
                                  f"file has {size}); re-download or re-export it")
        try:
            raw = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e.msg})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    meta = raw.pop("__metadata__", None) or {}
    data_len, infos = size - 8 - n, {}
    for name, t in raw.items():
        try:
            dtype, shape, (begin, end) = t["dtype"], tuple(int(s) for s in t["shape"]), t["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype not in _ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if end - begin != math.prod(shape) * _ITEMSIZE[dtype] or not 0 <= begin <= end <= data_len:
            raise CheckpointError(f"{path}: header lies about tensor {name!r} (offsets {begin}..{end}, shape "
                                  f"{list(shape)}, {data_len} data bytes); the file is truncated or corrupt")
        infos[name] = TensorInfo(dtype, shape, path)
    return infos, meta


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """Headers of several shards merged into one {name: TensorInfo}."""
    out: dict[str, TensorInfo] = {}
    for f in files:
        out.update(read_header(f)[0])
    return out


class TensorReader:
    """Reads tensors one at a time from their files (memory-mapped), so a checkpoint is never held whole."""

    def __init__(self):
        self._open: dict[Path, object] = {}

    def get(self, info: TensorInfo, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if info.file not in self._open:
            self._open[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
        return self._open[info.file].get_tensor(name)

    def close(self) -> None:
        self._open.clear()


def load_pickle(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A .ckpt/.bin state dict and its metadata ({"global_step": ...} when present), only when the caller
    opted in; read with weights_only=True."""
    if not allow_pickle:
        raise CheckpointError(f"{path}: is a pickle file, which can run code when loaded; convert it to "
                              f".safetensors, or pass allow_pickle=True (CLI: --allow-pickle) if you trust it")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the path")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad pickle
        raise CheckpointError(f"{path}: cannot be read as a weights-only PyTorch file ({type(e).__name__})") from None
    meta = {"global_step": str(sd["global_step"])} if isinstance(sd, dict) and "global_step" in sd else {}
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: does not contain a state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, meta
