"""The one set of random full-size SD 1.5 weights of benchmarks/cpu_peers.py, in each engine's format.

Under MODELS (made once, kept; each step is timed when it runs, because an export is start-up cost a user
pays too):
  sd15-fp16/               diffusers folder (benchmarks/load_sd15.py `make_folder`): fastldm, diffusers,
                           and the source of the OpenVINO exports
  sd15-fp16.safetensors    the same tensors as one original-layout checkpoint (fastldm's save_single_file):
                           stable-diffusion.cpp
  sd15-ov-fp16/            `optimum-cli export openvino --weight-format fp16` (the default for a model of
                           this size): OpenVINO
  sd15-ov-int8/            the same with `--weight-format int8` (its int8 weight compression)
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from load_sd15 import make_folder


def _timed_make(path: Path, make, made: dict) -> None:
    """make(a temporary path), then rename it to PATH: an interrupted export never passes for a finished one."""
    if path.exists():
        return
    tmp = path.with_name(path.name + ".partial")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    tmp.unlink(missing_ok=True)
    t0 = time.perf_counter()
    make(tmp)
    tmp.rename(path)
    made[path.name] = round(time.perf_counter() - t0, 1)
    print(f"made {path} in {made[path.name]:.0f} s", flush=True)


def _single_file(folder: Path, path: Path) -> None:
    import torch

    from fastldm.loading import save_single_file
    from fastldm.loading.load import load_components

    config, modules = load_components(folder, dtype=torch.float16)
    save_single_file({k: m.state_dict() for k, m in modules.items()}, config, path, dtype=torch.float16)


def _openvino(folder: Path, path: Path, weights: str, python: Path, log: Path) -> None:
    cli = python.parent / "optimum-cli"  # the console script installed beside the venv's interpreter
    with log.open("w") as f:
        subprocess.run([str(cli), "export", "openvino", "--model", str(folder), "--task", "text-to-image",
                        "--weight-format", weights, str(path)], check=True, stdout=f, stderr=subprocess.STDOUT)


def prepare(models: Path, engines: list[str], openvino_python: Path, logs: Path) -> dict[str, float]:
    """Make what ENGINES (names of peer_workers.ENGINES) read; returns {what was made: seconds}. The
    exporter's output goes to LOGS/export-<weights>.log."""
    made: dict[str, float] = {}
    folder = models / "sd15-fp16"
    _timed_make(folder, make_folder, made)
    if any(e.startswith("sdcpp") for e in engines):
        _timed_make(models / "sd15-fp16.safetensors", lambda p: _single_file(folder, p), made)
    for engine, weights in (("openvino", "fp16"), ("openvino-int8", "int8")):
        if engine in engines:
            _timed_make(models / f"sd15-ov-{weights}",
                        lambda p, w=weights: _openvino(folder, p, w, openvino_python, logs / f"export-{w}.log"), made)
    return made
