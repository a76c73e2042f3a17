"""CUDA-graph capture and replay of the UNet call (fastldm.runtime.cuda_graph)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastldm import ops
from fastldm.config import UNetConfig
from fastldm.models import UNet2DConditionModel
from fastldm.runtime.cuda_graph import CUDAGraphUNet

CFG = UNetConfig(block_out_channels=(32, 64), layers_per_block=(1, 1), cross_attn=(True, False),
                 attention_heads=(2, 2), transformer_layers_per_block=(1, 1), norm_num_groups=8,
                 cross_attention_dim=16, sample_size=8)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def unet(device: str = "cpu") -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(CFG).eval().to(device)


def inputs(batch: int, size: int, seed: int, device: str = "cuda") -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g).to(device), torch.full((batch,), 10.0 * seed + 1),
            torch.randn(batch, 77, 16, generator=g).to(device))


def test_refuses_a_unet_that_is_not_on_cuda():
    with pytest.raises(RuntimeError, match="CUDA graphs need the UNet on a CUDA device"):
        CUDAGraphUNet(unet("cpu"))


@cuda
def test_replay_matches_eager_for_new_inputs_and_shapes():
    model = unet("cuda")
    graphed = CUDAGraphUNet(model)
    with torch.inference_mode():
        first = graphed(*inputs(2, 8, 1))
        kept = first.clone()
        for batch, size, seed in [(2, 8, 2), (2, 16, 3), (1, 8, 4), (2, 8, 5)]:
            x = inputs(batch, size, seed)
            # The same kernels on the same inputs: only the capture's memory addresses differ, so the result
            # is expected bitwise equal; 1e-6 relative leaves room for a cuBLAS algorithm re-pick.
            torch.testing.assert_close(graphed(*x), model(*x), rtol=1e-6, atol=1e-6)
    assert len(graphed.graphs) == 3  # (2, 8), (2, 16), (1, 8): replayed, not re-captured, for seeds 2 and 5
    assert torch.equal(first, kept)  # a later replay did not overwrite an output the caller holds


@cuda
def test_a_different_backend_set_is_a_different_graph():
    graphed = CUDAGraphUNet(unet("cuda"))
    x = inputs(2, 8, 1)
    graphed(*x)  # `auto` dispatch
    with ops.use("reference"):  # every op forced to the reference: another selection, another graph
        graphed(*x)
        graphed(*x)
    assert len(graphed.graphs) == 2


@cuda
def test_threads_take_turns_on_the_static_buffers():
    """Two threads replaying one graph with different inputs each get their own result: without the lock, one
    thread's inputs could be copied into the static buffers between the other's copy and its replay."""
    import sys
    import threading

    model = unet("cuda")
    graphed = CUDAGraphUNet(model)
    cases = [inputs(2, 8, seed) for seed in range(1, 9)]
    with torch.inference_mode():
        graphed(*cases[0])  # capture once, before the threads start
        expected = [model(*x) for x in cases]
    got, errors = {}, []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                got[i] = graphed(*cases[i])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: races show up
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    for i, want in enumerate(expected):
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6)


@cuda
def test_refuses_arguments_it_cannot_replay():
    graphed = CUDAGraphUNet(unet("cuda"))
    with pytest.raises(ValueError, match="cannot take cache=object"):
        graphed(*inputs(2, 8, 1), cache=object())


def test_pipeline_refuses_cuda_graphs_on_cpu(tmp_path):
    from conftest import tiny_diffusers_pipeline

    import fastldm

    tiny_diffusers_pipeline("sd1").save_pretrained(tmp_path / "m")
    with pytest.raises(RuntimeError, match="CUDA graphs need the UNet on a CUDA device"):
        fastldm.load(tmp_path / "m", cuda_graphs=True)


def test_pipeline_routes_plain_steps_through_the_graph(tmp_path):
    """generate() calls the graphed UNet for plain requests and the eager one under DeepCache (whose call
    changes from step to step, so it cannot be replayed)."""
    from conftest import tiny_diffusers_pipeline

    import fastldm

    tiny_diffusers_pipeline("sd1").save_pretrained(tmp_path / "m")
    pipe = fastldm.load(tmp_path / "m", dtype="fp32")
    calls = []

    def recording(*args, **kwargs):
        calls.append(args[0].shape)
        return pipe.unet(*args, **kwargs)

    pipe.unet_runtime.graphs = recording  # stands in for a CUDAGraphUNet, which needs a GPU
    eager = pipe.generate("a cube", steps=3, seed=0, width=32, height=32)
    pipe.unet_runtime.graphs = None
    assert len(calls) == 3 and np.array_equal(eager.raw, pipe.generate("a cube", steps=3, seed=0, width=32,
                                                                        height=32).raw)
    pipe.unet_runtime.graphs = recording
    pipe.generate("a cube", steps=3, seed=0, width=32, height=32, cache_interval=2)
    assert len(calls) == 3


@cuda
def test_pipeline_with_cuda_graphs_matches_eager(tmp_path):
    from conftest import tiny_diffusers_pipeline

    import fastldm

    tiny_diffusers_pipeline("sd1").save_pretrained(tmp_path / "m")
    assert fastldm.load(tmp_path / "m", device="cuda").unet_runtime.kind(1) == "cuda_graph"  # the default on CUDA
    pipe = fastldm.load(tmp_path / "m", device="cuda", dtype="fp32", cuda_graphs=False)
    eager = pipe.generate("a cube", steps=4, seed=0, width=32, height=32)
    pipe.use_cuda_graphs()
    for size in (32, 32, 48):  # capture, replay, a new shape
        graphed = pipe.generate("a cube", steps=4, seed=0, width=size, height=size)
        if size == 32:
            assert torch.allclose(torch.from_numpy(graphed.raw), torch.from_numpy(eager.raw), atol=1e-5)
    assert len(pipe.unet_runtime.graphs.graphs) == 2
    again = pipe.generate("a cube", steps=4, seed=0, width=32, height=32)
    assert torch.allclose(torch.from_numpy(again.raw), torch.from_numpy(eager.raw), atol=1e-5)


def test_cli_cuda_graphs_on_cpu_is_a_one_line_error(tmp_path):
    from click.testing import CliRunner
    from conftest import tiny_diffusers_pipeline

    from fastldm.cli import main

    tiny_diffusers_pipeline("sd1").save_pretrained(tmp_path / "m")
    res = CliRunner().invoke(main, ["generate", "a cube", "--model", str(tmp_path / "m"), "--cuda-graphs",
                                    "--out", str(tmp_path / "out")])
    assert res.exit_code != 0 and "CUDA graphs need the UNet on a CUDA device" in res.output
    assert not (tmp_path / "out").exists()


def test_cuda_graphs_are_on_by_default_where_they_can_work():
    from fastldm.api import cuda_graphs_wanted
    from fastldm.errors import SettingError

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert cuda_graphs_wanted(None, cuda, compile=False, unet_staged=False)
    assert not cuda_graphs_wanted(None, cpu, compile=False, unet_staged=False)
    assert not cuda_graphs_wanted(None, cuda, compile=True, unet_staged=False)    # inductor's executor instead
    assert not cuda_graphs_wanted(None, cuda, compile=False, unet_staged=True)    # weights move between stages
    assert not cuda_graphs_wanted(False, cuda, compile=False, unet_staged=False)
    with pytest.raises(SettingError, match="loads the UNet's weights again per stage"):
        cuda_graphs_wanted(True, cuda, compile=False, unet_staged=True)
    with pytest.raises(SettingError, match="either compiled or as CUDA graphs"):
        cuda_graphs_wanted(True, cuda, compile=True, unet_staged=False)
    with pytest.raises(RuntimeError, match="CUDA graphs need the UNet on a CUDA device, it is on cpu"):
        cuda_graphs_wanted(True, cpu, compile=False, unet_staged=False)


def test_png_version_says_how_a_gpu_pipeline_ran():
    from types import SimpleNamespace

    from fastldm.api import runtime_text

    def pipe(device, graphs, dtype=torch.float16):
        return SimpleNamespace(runtime_choice=None, device=torch.device(device), dtype=dtype,
                               unet_runtime=SimpleNamespace(graphs=object() if graphs else None))
    assert runtime_text(pipe("cuda", True)) == "cuda fp16; CUDA graphs"
    assert runtime_text(pipe("cuda", True, torch.bfloat16)) == "cuda bf16; CUDA graphs"
    assert runtime_text(pipe("cuda", False)) == "cuda fp16"
    assert runtime_text(pipe("cpu", False)) is None  # a CPU pipeline built in code: nothing measured to report
