"""The kernel ablation table (fastldm.bench.ablation): rows, n/a reasons, memory accounting, peers on the
same weights. Tiny UNets at an 8×8 latent; nothing here checks a speed (that is the benchmark's job)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from fastldm.bench import ablation as A
from fastldm.cli import main
from fastldm.config import UNetConfig
from fastldm.ops import flash_attention_cpu, winograd
from fastldm.runtime import prepack

TINY = UNetConfig(block_out_channels=(32, 64), layers_per_block=(1, 1), cross_attn=(True, False),
                  attention_heads=(2, 2), transformer_layers_per_block=(1, 1), norm_num_groups=8,
                  cross_attention_dim=16, sample_size=8)
TINY_XL = dataclasses.replace(TINY, use_linear_projection=True, cross_attention_dim=32, addition_time_embed_dim=8,
                              projection_class_embeddings_input_dim=16 + 6 * 8)
NAMES = ["Baseline", "+Opt. softmax", "+S-GN/GELU", "+FlashAttn", "+FlashAttn CPU", "+Winograd", "+Packed conv",
         "+Packed linear", "+CUDA graphs",
         "diffusers eager", "diffusers + torch.compile"]



def test_peak_bytes_counts_what_a_call_allocates_on_cpu():
    mb = 2**20 // 4  # float32 elements in 1 MiB

    def step():
        a = torch.ones(mb)        # 1 MiB live
        b = torch.ones(2 * mb)    # 3 MiB live: the peak
        del a, b
        return torch.ones(mb)     # 1 MiB (the output)
    peak = A.peak_bytes(step, torch.device("cpu"))
    assert 3 * 2**20 <= peak < 3 * 2**20 + 4096, peak  # a few bytes of bookkeeping allocations at most


def test_ablation_table_on_cpu(one_thread):
    pytest.importorskip("diffusers")
    unet = A.random_unet(TINY)
    result = A.run_ablation(unet, latent=8, repeats=2, warmup=0, with_compile=False)
    rows = {r["name"]: r for r in result["rows"]}
    assert [r["name"] for r in result["rows"]] == NAMES
    for name in ("+Opt. softmax", "+S-GN/GELU", "+FlashAttn"):
        assert rows[name]["na"] == "Triton needs CUDA" and rows[name]["ms"] is None
    assert rows["+CUDA graphs"]["na"] == "CUDA graphs need CUDA"
    assert rows["diffusers + torch.compile"]["na"] == "skipped: --no-compile"
    flash = rows["+FlashAttn CPU"]  # the C++ kernel, unless this machine cannot build it
    assert flash["na"] == flash_attention_cpu.unavailable()
    if flash["na"] is None:
        assert flash["backends"] == "reference; attention=flash_cpu" and flash["rel_err"] < 1e-5

    base, wino, peer = rows["Baseline"], rows["+Winograd"], rows["diffusers eager"]
    params = sum(p.numel() * 4 for p in unet.parameters())
    for r in (base, wino, peer):
        assert r["na"] is None and r["ms"] > 0 and r["first_call_s"] > 0 and r["tensor_mb"] > 0
    assert base["backends"] == "reference" and "conv2d=winograd" in wino["backends"]
    assert base["weight_mb"] == peer["weight_mb"] == round(params / 2**20, 1)
    conv3x3 = sum(m.weight.numel() * 4 for m in unet.modules()
                  if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1))
    assert wino["weight_mb"] == round((params + 4 * conv3x3) / 2**20, 1)  # transformed weights: 36/9 = 4x
    assert winograd.weights().max_bytes == 4 << 30 and winograd.weights().nbytes == 0  # the caller's cache: untouched
    # fp32: Winograd's error is ~1e-5 of max|y| per conv (tests/ops/test_winograd.py), compounded over a few
    # convs; diffusers runs the same math on the same (shared) weights, so only summation order can differ.
    assert base["rel_err"] == 0.0 and 0 < wino["rel_err"] < 1e-4 and peer["rel_err"] < 1e-5
    # packed oneDNN weights: Winograd dropped (conv2d backends do not reach packed layers), the rest kept; the
    # same convolutions in another weight layout (tests/runtime/test_prepack.py's tolerance)
    packed = rows["+Packed conv"]
    convs = sum(m.weight.numel() * 4 for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    if prepack.unsupported(torch.float32) is None:
        assert packed["na"] is None and packed["backends"].endswith("+ packed conv weights")
        assert "winograd" not in packed["backends"] and packed["rel_err"] < 1e-5
        assert packed["weight_mb"] == round((params + convs) / 2**20, 1)  # the twin's packed copies
        assert isinstance(unet.conv_in, torch.nn.Conv2d)  # the table's UNet itself stays plain
    both = rows["+Packed linear"]
    if prepack.unsupported(torch.float32, "linear") is None:
        assert both["na"] is None and both["backends"].endswith("+ packed conv and linear weights")
        assert both["rel_err"] < 1e-5
        # an 8×8 latent: every linear runs at MAX_ROWS rows or fewer, so the twin packs them all
        linears = sum(m.weight.numel() * 4 for m in unet.modules() if isinstance(m, torch.nn.Linear))
        assert both["weight_mb"] == round((params + convs + linears) / 2**20, 1)

    table = A.markdown(result)
    assert table.count("n/a (Triton needs CUDA)") == 3 and "| Baseline | reference |" in table
    assert len(table.splitlines()) == 4 + len(NAMES)
    assert json.loads(json.dumps(result))["meta"]["tensor_mb"].startswith("torch.profiler")


def test_sdxl_style_inputs_reach_both_engines(one_thread):
    """text_embeds / time_ids go to our UNet as keywords and to diffusers as added_cond_kwargs."""
    pytest.importorskip("diffusers")
    unet = A.random_unet(TINY_XL)
    result = A.run_ablation(unet, latent=8, repeats=1, warmup=0, with_compile=False)
    peer = next(r for r in result["rows"] if r["name"] == "diffusers eager")
    assert peer["na"] is None and peer["rel_err"] < 1e-5  # fp32, same weights (see above)


def test_cli_rejects_a_size_the_vae_cannot_take():
    out = CliRunner().invoke(main, ["bench", "ablation", "--size", "100"])
    assert out.exit_code == 4 and "multiple of 8" in out.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ablation_rows_run_on_cuda():
    from fastldm.ops.triton.device import INTERPRET

    if INTERPRET:
        pytest.skip("run with TRITON_INTERPRET=0 to compile the Triton kernels for the GPU")
    unet = A.random_unet(TINY, "cuda", torch.float16)
    rows = {r["name"]: r for r in A.run_ablation(unet, latent=8, repeats=2, peers=False)["rows"]}
    cpu_only = {"+FlashAttn CPU": "flash_cpu is a CPU kernel", "+Packed conv": "packed oneDNN weights are a CPU layout",
                "+Packed linear": "packed oneDNN weights are a CPU layout"}
    for name in NAMES[:9]:
        if name in cpu_only:
            assert rows[name]["na"] == cpu_only[name], rows[name]
        else:
            assert rows[name]["na"] is None and rows[name]["ms"] > 0, rows[name]
    # fp16 with Winograd (~1% of max|y| per conv in fp16, tests/ops/test_winograd.py) over a few convs.
    assert rows["+CUDA graphs"]["rel_err"] < 0.1
