"""The C++ flash attention for CPUs against an fp64 oracle, within 2x torch's own error in the same dtype.

The first test to run builds the kernel (once per machine, ~20-40 s; native_build.py) unless a build is
cached; without a C++ toolchain the kernel tests skip and the fallback tests still run.
"""
from __future__ import annotations

import pytest
import torch

from fastldm import ops
from fastldm.bench.ablation import random_unet
from fastldm.config import UNetConfig
from fastldm.ops import flash_attention_cpu as flash
from fastldm.ops import native_build, reference

FP32_FLOOR = 1e-6  # outputs are averages of unit-variance values: ~10 fp32 ulps for summation order
SAMPLED_ROWS = 192  # long sequences: the oracle checks this many random query rows (the kernel runs all)


@pytest.fixture(scope="module")
def built():
    why = flash.unavailable()
    if why is not None:
        pytest.skip(why)


def qkv(N: int, M: int, D: int, dtype=torch.float32, B: int = 2, H: int = 2, seed: int = 0):
    """Fresh random q, k, v with the UNet's strides: (B, N, H, D) memory viewed as (B, H, N, D)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, H, D, generator=g).to(dtype).transpose(1, 2) for n in (N, M, M)]


def check(q, k, v, out, rows: torch.Tensor | None = None, **kwargs) -> None:
    """DESIGN rule 6 (flash-attn's rule): max|out − ref| ≤ 2·max|torch_lowp − ref| (+ a floor in fp32),
    ref = softmax(q kᵀ/√D) v in float64, torch_lowp = the reference backend (SDPA) in q's dtype. With
    `rows`, only those query rows are compared (and computed by the oracle)."""
    if rows is not None:
        q, out = q[:, :, rows], out[:, :, rows]
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v.double()
    lowp = reference.attention(q, k, v, **kwargs)
    assert out.shape == ref.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    bound = 2 * (lowp.double() - ref).abs().max().item() + (FP32_FLOOR if q.dtype == torch.float32 else 0.0)
    assert err <= bound, f"max error {err:.3e} > bound {bound:.3e}"


# (queries, keys, head dim): SD 1.x self-attention at 512² (4096/40, 1024/80, 256/160, 64/160) and at 1024²
# (16384/40), SD 2.x/SDXL's head dim 64, cross-attention to 77 and 154 text tokens, and lengths that are
# no multiple of any block or tile (1000, 301, 5, 3; head dims 20 and 18 leave tile tails).
SHAPES = [(4096, 4096, 40), (1024, 1024, 80), (256, 256, 160), (64, 64, 160), (16384, 16384, 40),
          (4096, 4096, 64), (1024, 1024, 64), (256, 256, 64), (64, 64, 64),
          (4096, 77, 40), (1024, 77, 80), (256, 77, 160), (64, 77, 160), (4096, 154, 64), (1024, 154, 64),
          (1000, 1000, 40), (301, 513, 80), (5, 3, 20), (70, 129, 18)]


@pytest.mark.parametrize("N,M,D", SHAPES, ids=[f"{n}x{m}xd{d}" for n, m, d in SHAPES])
def test_matches_fp64_oracle(built, N, M, D):
    B, H = (1, 1) if N * M > 2 ** 24 else (2, 2)  # 16384²: one head (a second would only add seconds)
    q, k, v = qkv(N, M, D, B=B, H=H)
    out = flash.attention(q, k, v)
    rows = torch.randperm(N, generator=torch.Generator().manual_seed(1))[:SAMPLED_ROWS] if N > 1024 else None
    check(q, k, v, out, rows)


@pytest.mark.parametrize("N,M,D", [(1024, 1024, 40), (256, 77, 80), (64, 64, 160), (33, 154, 64)])
def test_bf16(built, N, M, D):
    """bf16 in, fp32 arithmetic, bf16 out (on CPUs without native bf16 the conversions are emulated)."""
    q, k, v = qkv(N, M, D, torch.bfloat16, seed=2)
    check(q, k, v, flash.attention(q, k, v))
    check(q, k, v, flash.attention(q, k, v, upcast=True), upcast=True)


def test_layouts(built):
    """Contiguous (B, H, N, D) inputs, and a head dim with a stride (copied before the kernel reads it)."""
    q, k, v = (t.contiguous() for t in qkv(100, 90, 40, seed=3))
    check(q, k, v, flash.attention(q, k, v))
    wide = [t.repeat_interleave(2, dim=-1)[..., ::2] for t in (q, k, v)]  # same values, stride 2 along D
    assert wide[0].stride(-1) == 2
    assert torch.equal(flash.attention(*wide), flash.attention(q, k, v))


def test_large_logits_stay_finite(built):
    """Scores of ±100s: the running max keeps every exponent ≤ 0 (and 2^x is clamped far below)."""
    q, k, v = qkv(50, 300, 64, seed=4)
    check(q * 30, k, v, flash.attention(q * 30, k, v))


def test_auto_and_forced(built):
    q, k, v = qkv(64, 256, 40)
    assert ops.select("attention", q, k, v) == "flash_cpu"
    with ops.use(attention="flash_cpu"):
        assert torch.equal(ops.attention(q, k, v), flash.attention(q, k, v))
        with pytest.raises(ops.BackendUnavailable, match="causal"):
            ops.attention(q, k, v, causal=True)
        with pytest.raises(ops.BackendUnavailable, match="float32 or bfloat16"):
            ops.attention(q.half(), k.half(), v.half())
        with pytest.raises(ops.BackendUnavailable, match="head dims up to"):
            ops.attention(*qkv(4, 4, 320))
    assert ops.select("attention", q, k, v, causal=True) == "reference"
    assert ops.select("attention", q.double(), k.double(), v.double()) == "reference"


def test_training_falls_back_to_a_differentiable_kernel(built):
    q, k, v = (t.requires_grad_() for t in qkv(64, 256, 40))
    assert ops.select("attention", q, k, v) == "reference"
    ops.attention(q, k, v).sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape
    with torch.no_grad():
        assert ops.select("attention", q, k, v) == "flash_cpu"


def test_unet_forward_matches_reference(built):
    """A tiny SD-style UNet (head dims 16, 64 and 16 tokens, 7 text tokens) with the kernel forced, against
    the same UNet in float64 on the reference backend: within 2x the fp32 reference UNet's own error."""
    cfg = UNetConfig(block_out_channels=(32, 64), layers_per_block=(1, 1), cross_attn=(True, True),
                     attention_heads=(2, 4), transformer_layers_per_block=(1, 1), norm_num_groups=8,
                     cross_attention_dim=16, sample_size=8)
    unet = random_unet(cfg, seed=5)
    g = torch.Generator().manual_seed(6)
    x, ctx, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 16, generator=g), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        with ops.use("reference"):
            lowp = unet(x, t, ctx)
            ref = unet.double()(x.double(), t.double(), ctx.double())
        unet.float()
        with ops.use(attention="flash_cpu"):
            out = unet(x, t, ctx)
    err, bound = (out.double() - ref).abs().max().item(), 2 * (lowp.double() - ref).abs().max().item()
    assert err <= bound + FP32_FLOOR * ref.abs().max().item(), (err, bound)


def test_without_a_compiler_the_reason_is_given(tmp_path, monkeypatch):
    """No build cached and no compiler: `load_library` says so (and `supports` would return that reason)."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(ops.BackendUnavailable, match="no C.. compiler"):
        native_build.load_library(flash.LIBRARY, tmp_path)
    assert not any(tmp_path.iterdir())


def test_build_key_tracks_what_shapes_the_binary():
    key = native_build.build_key(flash.LIBRARY, "AVX2", "g++ 12")
    assert key.startswith(f"{flash.LIBRARY}-torch{torch.__version__}-AVX2-")
    assert key == native_build.build_key(flash.LIBRARY, "AVX2", "g++ 12")
    assert key != native_build.build_key(flash.LIBRARY, "AVX2", "g++ 13")
    assert key != native_build.build_key(flash.LIBRARY, "AVX512", "g++ 12")
    assert native_build.build_key(flash.LIBRARY, "AVX512", "g++ 12") != native_build.build_key(
        flash.LIBRARY, "AVX512_BF16", "g++ 12")


def test_build_key_tracks_the_shared_headers(tmp_path, monkeypatch):
    """A kernel's source includes csrc/*.h (vec_exp2.h): editing one must rebuild, not reuse a stale library."""
    for path in native_build.CSRC.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(native_build, "CSRC", tmp_path)
    key = native_build.build_key(flash.LIBRARY, "AVX2", "g++ 12")
    (tmp_path / "vec_exp2.h").write_text((tmp_path / "vec_exp2.h").read_text() + "\n// edited\n")
    assert native_build.build_key(flash.LIBRARY, "AVX2", "g++ 12") != key


def test_isa_reads_avx512_bf16_from_torch(monkeypatch):
    """AVX-512 CPUs with bf16 instructions get their own build (softmax_cpu rounds with vcvtne2ps2bf16)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert native_build.isa() == "AVX512_BF16" and "-mavx512bf16" in native_build.flags("AVX512_BF16")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert native_build.isa() == "AVX512"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert native_build.isa() == "AVX2"


def test_torch_compile_traces_one_opaque_call(built):
    """fullgraph: the backend choice and the build check run at trace time; the op has a fake for shapes."""
    q, k, v = qkv(100, 77, 40)

    def step(q, k, v):
        return ops.attention(q, k, v).transpose(1, 2).flatten(2)  # (B, N, H·D), as the UNet does

    with torch.no_grad():
        out = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v)
    assert torch.equal(out, step(q, k, v))


def test_the_library_runs_on_torchs_threads(built):
    """at::parallel_for is a serial loop in a translation unit compiled without OpenMP: the built library
    must open OpenMP parallel regions (on torch's libgomp), or the kernel silently runs on one thread."""
    library = native_build.load_library(flash.LIBRARY, native_build.cache_dir())  # already loaded: found
    assert b"GOMP_parallel" in library.read_bytes()
