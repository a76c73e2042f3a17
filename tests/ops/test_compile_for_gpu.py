"""Every Triton kernel compiles for a Hopper GPU (sm_90), on a machine without one.

The other kernel tests run the kernels in Triton's interpreter, which accepts programs the compiler rejects
(a block shape tl.dot cannot take, a register tile too large, a type the PTX backend refuses): on the first GPU
run those would fail where CI never looked. Here each kernel's launch goes through the real compiler down to
machine code (ptxas, bundled with triton) for sm_90 — the H100/H200 — with a stand-in driver that reports that
target, and `warmup=True` launches, which compile and return before anything would run. A fresh process: the
kernels must be built with TRITON_INTERPRET=0, and this session's are interpreted (tests/conftest.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import os, sys
    os.environ["TRITON_INTERPRET"] = "0"
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class Hopper:  # what the launch path asks a driver before compiling
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_current_device(self): return 0
        def get_current_stream(self, device=None): return 0
        def get_active_torch_device(self): return torch.device("cpu")

    driver.set_active(Hopper())
    compiled = []
    run = JITFunction.run
    def compile_only(self, *args, grid, warmup, **kw):
        kernel = run(self, *args, grid=grid, warmup=True, **kw)
        compiled.append((self.fn.__name__, kernel.asm.get("cubin") is not None))
        return kernel
    JITFunction.run = compile_only

    from fastldm.ops.triton import activations, flash_attention, group_norm, softmax_attention, winograd
    g = torch.Generator().manual_seed(0)
    # fp16, every variant; bf16, the widest tiles (the most registers) and each other kernel; fp32, attention's
    # IEEE-fp32 dot products. (About 40 compilations, ~0.7 s each.)
    for dtype, head_dims in ((torch.float16, (40, 80, 160)), (torch.bfloat16, (160,)), (torch.float32, (64,))):
        r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
        for fn in (flash_attention.attention, softmax_attention.attention):
            for d in head_dims:  # SD's head dims 40, 80, 160: the three tile shapes of `blocks`
                fn(r(2, 2, 70, d), r(2, 2, 77, d), r(2, 2, 77, d))
            if dtype == torch.float32:
                continue
            fn(r(1, 2, 77, 64), r(1, 2, 77, 64), r(1, 2, 77, 64), causal=True, upcast=dtype == torch.float16)
        if dtype == torch.float32:
            continue
        x = r(2, 64, 16, 16)
        for tile in (4096, 32):  # one pass, and split partial moments
            group_norm.group_norm(x, 8, r(64), r(64), 1e-5, "silu", tile=tile)
        group_norm.group_norm(x.contiguous(memory_format=torch.channels_last), 8, None, None, 1e-5, None)
        for approximate in ("none", "tanh"):
            activations.gelu(r(4, 100), approximate)
        activations.geglu(r(4, 2 * 320))
        winograd.conv2d(r(1, 8, 10, 10), r(16, 8, 3, 3), r(16))
        winograd.conv2d(r(1, 8, 10, 10), r(16, 8, 3, 3), None)
    bad = sorted({name for name, cubin in compiled if not cubin})
    print(len(compiled), "launches compiled; kernels:", sorted({name for name, _ in compiled}), "no cubin:", bad)
    sys.exit(1 if bad else 0)
''')


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    env = os.environ | {"TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton")}  # built here, now
    # `unsupported` lets CPU tensors through only in interpreter mode; the kernels themselves never run.
    script = SCRIPT.replace('from fastldm.ops.triton import',
                            'import fastldm.ops.triton.device as dev; dev.INTERPRET = True\n'
                            'from fastldm.ops.triton import')
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
                         check=False)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    for kernel in ("_flash_attention_fwd", "_softmax_row_stats", "_softmax_pv", "_partial_moments",
                   "_group_norm_apply", "_gelu_kernel", "_geglu_kernel", "_input_transform", "_output_transform"):
        assert kernel in run.stdout, run.stdout
