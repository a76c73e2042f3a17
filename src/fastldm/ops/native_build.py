"""The package's C++ kernels (fastldm/ops/csrc/<name>.cpp): compiled on first use, cached per machine, loaded.

Why on first use and not at install time: a PEP 517 install builds in an isolated environment, so a
`setup.py` extension would pull a second torch into it (possibly a multi-GB CUDA wheel) and pin the
binary's ABI to that torch rather than to the one the user runs; and a wheel built on one machine carries
one CPU's instruction set. Compiling against the torch of the running process, for the vector ISA torch
itself dispatches to (`torch.backends.cpu.get_cpu_capability()`), avoids both, at the price of one
compile per machine (about 20-40 s for flash_attention_cpu.cpp on 2 cores; mostly torch's headers).

How: `torch.utils.cpp_extension.load` (ninja; torch's own include paths, ABI defines and link flags) into
`$XDG_CACHE_HOME/fastldm/extensions` (default ~/.cache/fastldm/extensions), one directory per build key:
a hash of everything that changes the binary (the source, torch's version, the Python version, the
compiler's identity, the flags with the ISA). A later process finds the library there and loads it
with `torch.ops.load_library`, needing neither ninja nor a compiler. A build runs in a private
temporary directory that is renamed into place once complete, so concurrent first uses never see a
half-written library and a crashed build leaves no lock behind.

`load(name)` returns None once the library is loaded, or the reason it cannot be (no compiler, no ninja,
an ISA with no flags here, a failed build); the answer is kept for the life of the process, since a
library cannot be loaded twice and a machine without a compiler should pay for the check once.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import BackendUnavailable
from ..files import cache_root

CSRC = Path(__file__).parent / "csrc"
# Per vector ISA (torch's CPU capability): the flags ATen compiles its own kernels of that ISA with, and
# the CPU_CAPABILITY_* define that selects ATen's Vectorized<T> implementation for it.
ISA_FLAGS = {
    "AVX2": ("-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"),
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY=AVX512",
               "-DCPU_CAPABILITY_AVX512"),
}
# AVX-512 with bf16 conversions and dot products (Zen 4, Cooper Lake, Sapphire Rapids): ATen's AVX-512 build,
# and kernels may use the bf16 instructions where __AVX512BF16__ is defined (softmax_cpu.cpp rounds to bf16).
ISA_FLAGS["AVX512_BF16"] = ISA_FLAGS["AVX512"] + ("-mavx512bf16",)
COMMON_FLAGS = ("-O3", "-fvisibility=hidden", "-fopenmp")  # -fopenmp: at::parallel_for is serial without it


def cache_dir() -> Path:
    """Where built libraries persist: $XDG_CACHE_HOME/fastldm/extensions, default ~/.cache/fastldm/extensions."""
    return cache_root() / "extensions"


def isa() -> str:
    """The vector ISA torch dispatches its CPU kernels to here: "AVX2", "AVX512", "DEFAULT", ..., with
    "AVX512" read as "AVX512_BF16" where the CPU has AVX512_BF16."""
    capability = torch.backends.cpu.get_cpu_capability()
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "AVX512_BF16" if capability == "AVX512" and bf16 else capability


def compiler() -> str:
    """The C++ compiler torch.utils.cpp_extension uses: $CXX, else c++."""
    return os.environ.get("CXX", "c++")


def flags(capability: str) -> tuple[str, ...]:
    return COMMON_FLAGS + ISA_FLAGS[capability]


def _compiler_identity(cxx: str) -> str:
    """The compiler's path and first `--version` line; raises BackendUnavailable if it cannot run."""
    path = shutil.which(cxx)
    if path is None:
        raise BackendUnavailable(f"no C++ compiler ({cxx!r}) on PATH to build the CPU kernel; install g++ or clang")
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise BackendUnavailable(f"the C++ compiler {path} does not run ({e})") from e
    return f"{os.path.realpath(path)} {version.stdout.splitlines()[0] if version.stdout else ''}"


def build_key(name: str, capability: str, compiler_identity: str) -> str:
    """The cache directory name of library `name`: readable parts, then a hash of all that shapes the binary."""
    h = hashlib.sha256()
    headers = [path.read_bytes() for path in sorted(CSRC.glob("*.h"))]  # any may be included: all are hashed
    for part in ((CSRC / f"{name}.cpp").read_bytes(), *headers, torch.__version__.encode(), sys.version.encode(),
                 compiler_identity.encode(), " ".join(flags(capability)).encode()):
        h.update(hashlib.sha256(part).digest())
    return f"{name}-torch{torch.__version__}-{capability}-{h.hexdigest()[:16]}"


def load_library(name: str, root: Path) -> Path:
    """Load library `name`, built under `root` now if no build with its key is there yet; returns its path.
    Raises BackendUnavailable with the reason when it can be neither found nor built."""
    capability = isa()
    if capability not in ISA_FLAGS:
        raise BackendUnavailable(f"the C++ CPU kernels are built for x86 AVX2 or AVX-512; torch reports the "
                                 f"CPU capability {capability!r}")
    target = root / build_key(name, capability, _compiler_identity(compiler()))
    library = target / f"fastldm_{name}.so"
    if library.exists():
        torch.ops.load_library(str(library))
        return library
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise BackendUnavailable("the ninja build tool is not on PATH, needed once to build the CPU kernel "
                                 "(pip install ninja in the environment that runs fastldm)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=root))
    except OSError as e:
        raise BackendUnavailable(f"cannot write the kernel build cache {root}: {e}") from e
    try:  # builds in `scratch` and loads the library from there
        cpp_extension.load(f"fastldm_{name}", [str(CSRC / f"{name}.cpp")], extra_cflags=list(flags(capability)),
                           build_directory=str(scratch), is_python_module=False)
    except Exception as e:  # a compile or link error: cpp_extension raises RuntimeError with the log
        shutil.rmtree(scratch, ignore_errors=True)
        log = str(e).strip().splitlines()
        raise BackendUnavailable(f"building the CPU kernel {name} failed: {log[-1] if log else e!r}") from e
    try:
        scratch.rename(target)  # atomic; fails if another process got there first, whose build is as good
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)  # ours is loaded (mapped): removing the file is safe
    return library


def loader(name: str) -> Callable[[], str | None]:
    """The `unavailable()` of a module wrapping library `name`: why its kernels cannot run on this machine (the
    library can be neither loaded nor built), or None. The first call may compile it (once per machine); under
    torch.compile it is a constant, evaluated once at trace time."""
    @torch.compiler.assume_constant_result
    def unavailable() -> str | None:
        return load(name)
    unavailable.__doc__ = f"Why the {name} kernels cannot run on this machine, or None (native_build.loader)."
    return unavailable


def cpu_limits(kernel: str, x: torch.Tensor) -> str | None:
    """What every kernel here asks of its input, or why `x` is not it: a CPU tensor in float32 or bfloat16,
    not needing gradients (`kernel` names it in the reason)."""
    if x.device.type != "cpu":
        return f"{kernel} is for CPU tensors, got {x.device.type}"
    if x.dtype not in (torch.float32, torch.bfloat16):
        return f"{kernel} runs float32 or bfloat16, got {x.dtype}"
    if torch.is_grad_enabled() and x.requires_grad:
        return f"{kernel} is inference-only (no backward)"
    return None


@functools.cache
def load(name: str) -> str | None:
    """Load library `name` from the cache, building it first if needed: None once loaded, else the reason."""
    try:
        load_library(name, cache_dir())
    except BackendUnavailable as e:
        return str(e)
    return None
