"""CUDA-graph capture and replay of the UNet call (fastldm.runtime.cuda_graph)."""
from __future__ import annotations

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
def test_refuses_arguments_it_cannot_replay():
    graphed = CUDAGraphUNet(unet("cuda"))
    with pytest.raises(ValueError, match="cannot take cache=object"):
        graphed(*inputs(2, 8, 1), cache=object())
