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


_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16,
          "U32": torch.uint32, "U64": torch.uint64}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int = 0         # of the tensor's first byte in the file


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
        infos[name] = TensorInfo(dtype, shape, path, 8 + n + begin)
    return infos, meta


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """Headers of several shards merged into one {name: TensorInfo}."""
    out: dict[str, TensorInfo] = {}
    for f in files:
        out.update(read_header(f)[0])
    return out


class TensorReader:
    """Reads tensors one at a time from their files with plain reads, so a checkpoint is never held whole.

    Not memory-mapped: a mapping keeps every page read resident in this process (counted in its RSS as
    RssFile) until it is closed, so loading an fp16 file into fp32 weights would peak at weights + file; read
    into a buffer, a tensor's raw bytes live only until the caller has converted them."""

    def __init__(self):
        self._open: dict[Path, int] = {}

    def get(self, info: TensorInfo, name: str) -> torch.Tensor:
        fd = self._open.get(info.file)
        if fd is None:
            fd = self._open[info.file] = os.open(info.file, os.O_RDONLY)
        dtype = _TORCH[info.dtype]
        out = torch.empty(info.shape, dtype=dtype)
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], info.offset + done)
            if got <= 0:
                raise CheckpointError(f"{info.file}: tensor {name!r} ends past the end of the file; the file is "
                                      f"truncated")
            done += got
        return out

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
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
