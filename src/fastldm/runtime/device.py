"""What this CPU can do, and the process settings fastldm's CPU defaults are built on (set by the CLI and the
server, once, with `configure_process`; never by library calls).

- **dtype**: bf16 where the CPU has bf16 dot-product instructions (x86 `avx512_bf16` or `amx_bf16`, Arm
  `bf16`), fp32 otherwise: oneDNN emulates bf16 on CPUs without them, which is slower than fp32; with
  them, bf16 GEMMs and convolutions run 2-4.5× faster than fp32 (docs/benchmarks.md, "CPU fast path").
- **threads**: torch's default (one per physical core, or OMP_NUM_THREADS), capped at the CPUs this
  process may run on (its affinity mask and a cgroup CPU quota).
- **allocator**: glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh mmap()s and
  returns them on free, so every UNet step page-faults its large intermediates (GEGLU's hidden state,
  attention buffers) in again; in a VM a fault costs several times the memory traffic it serves (8× for a
  268 MB copy, docs/benchmarks.md "CPU fast path"). `tune_allocator` keeps freed memory
  in the heap for reuse (glibc's mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD), as Intel's PyTorch CPU
  guides do with jemalloc or tcmalloc. The cost: the process keeps its peak heap until it exits.
- **arenas** (servers): glibc gives each thread that allocates concurrently an arena of its own, up to 8 per
  core, and each arena's heap keeps its own high-water mark. A server's HTTP worker threads (request
  parsing, PNG encoding) thus grow the RSS step by step as load reaches more of them: a batching server on the
  embedded model grew 584 → 641 MB over six rounds of 16 clients before it levelled off, 593 → 609 MB with
  two arenas (docs/benchmarks.md, "Server load"). `limit_arenas` caps them (glibc's M_ARENA_MAX).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})   # x86 (both) and Arm (`bf16` in Features)
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})  # int8 dot products
BF16_MIN_CHANNELS = 256  # every SD 1.x/2.x/XL UNet and its distilled variants; not the tiny test models
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8   # glibc <malloc.h>
SERVER_ARENAS = 2  # malloc arenas of a server process (the HTTP threads' and the model worker's allocations)
_MMAP_THRESHOLD = 1 << 30  # glibc's ceiling for this setting is HEAP_MAX / 2 on 64-bit (32 MiB · 2^n ok)


@dataclass(frozen=True)
class CPUInfo:
    name: str
    flags: frozenset[str]
    cpus: int              # CPUs this process may use

    @property
    def bf16(self) -> bool:
        """Native bf16 dot products (not oneDNN's emulation)."""
        return bool(self.flags & BF16_FLAGS)

    @property
    def int8(self) -> bool:
        """Native int8 dot products (VNNI / AMX-int8 / Arm dotprod)."""
        return bool(self.flags & INT8_FLAGS)

    @property
    def amx(self) -> bool:
        return "amx_tile" in self.flags


def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, feature flags) from /proc/cpuinfo; empty flags where there is none (macOS, Windows)."""
    path = Path("/proc/cpuinfo")
    name, flags = platform.processor() or platform.machine(), frozenset()
    if not path.exists():
        return name, flags
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name in ("", platform.machine()):
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return name, flags


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota if one is set."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = Path("/sys/fs/cgroup/cpu.max")
    if quota.exists():
        limit, _, period = quota.read_text().partition(" ")
        if limit != "max":
            n = min(n, max(1, int(int(limit) // int(period))))
    return n


def cpu_info() -> CPUInfo:
    name, flags = _cpuinfo()
    return CPUInfo(name, flags, available_cpus())


def default_dtype(device: torch.device, config=None) -> torch.dtype:
    """fp16 on CUDA. On CPU: bf16 if the CPU has native bf16 dot products and the model is big enough for
    them to pay (`config`, a ModelConfig, with a UNet of >= BF16_MIN_CHANNELS channels at its widest
    level, or no config given), else fp32. Tiny models are bound by per-op overhead, not arithmetic: the
    embedded 64-channel model generated 8% slower in bf16 than in fp32 on the project's box."""
    if device.type == "cuda":
        return torch.float16
    big = config is None or max(config.unet.block_out_channels) >= BF16_MIN_CHANNELS
    if device.type == "cpu" and big and cpu_info().bf16 and torch.backends.mkldnn.is_available():
        return torch.bfloat16
    return torch.float32


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (whose mallopt settings these are), else None."""
    if platform.system() != "Linux" or "glibc" not in " ".join(platform.libc_ver()):
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def tune_allocator() -> bool:
    """Keep large freed blocks in glibc's heap for reuse instead of unmapping them (see the module
    docstring). Returns False where it does not apply (not glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD))


def limit_arenas(n: int) -> bool:
    """Let glibc's malloc use at most `n` arenas (see the module docstring). Returns False where it does not
    apply (not glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, n))


def release_free_memory() -> bool:
    """Hand the pages of freed heap blocks back to the system (glibc `malloc_trim(0)`), so memory a pipeline
    releases shows as a smaller RSS. An action, not a setting: nothing about the process changes afterwards.
    Returns False where it does not apply (not glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def configure_process(threads: int | None = None, allocator: bool = True, arenas: int | None = None) -> int:
    """For a program that owns its process (the CLI, the server): set torch's intra-op threads, tune the
    allocator, cap malloc's arenas at `arenas` (servers) and keep compiled graphs in a persistent cache
    (compile.use_persistent_cache); returns the thread count in force.

    threads=None keeps torch's count (one per physical core, or OMP_NUM_THREADS, or what the caller set
    with torch.set_num_threads) but caps it at `available_cpus()`: torch does not see cgroup CPU quotas,
    and OpenMP threads beyond the CPUs granted wait on each other at every barrier (on the 2-vCPU box,
    with another process busy on one core, 2 threads ran a UNet step 3.7× slower than 1)."""
    if threads is None:
        threads = min(torch.get_num_threads(), available_cpus())
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    if allocator:
        tune_allocator()
    if arenas is not None:
        limit_arenas(arenas)
    from .compile import use_persistent_cache

    use_persistent_cache()
    return torch.get_num_threads()
