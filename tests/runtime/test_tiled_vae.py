"""Tiled VAE decode/encode against the untiled pass on tiny random VAEs.

Tolerance: exact statistics and halos that cover the receptive field make every output pixel the untiled
one up to float32 summation order (convolutions of different sizes, float64 vs torch's GroupNorm
statistics): max|Δ| ≤ 1e-5 · max|untiled| (measured: ~1.5e-6)."""
from __future__ import annotations

import pytest
import torch
from fastldm.testing import randomize_

from fastldm.config import VAEConfig
from fastldm.models import AutoencoderKL
from fastldm.runtime import tiled_vae as T
from fastldm.runtime.memory_trace import MemoryTrace

CFG = VAEConfig(block_out_channels=(16, 32, 32), norm_num_groups=8, layers_per_block=1)
TOL = 1e-5


@pytest.fixture(scope="module")
def vae():
    return randomize_(AutoencoderKL(CFG).eval(), 0, std=0.1)


def _close(out, ref):
    return (out - ref).abs().max().item() <= TOL * ref.abs().max().item()


@pytest.mark.parametrize("tile, budget, channels_last", [(4, None, False), (5, 0, False), (6, 60_000, True)])
def test_decode_equals_untiled(vae, one_thread, tile, budget, channels_last):
    """Keeping every checkpoint, recomputing everything (budget 0), and a budget in between."""
    vae = vae.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    z = torch.randn(2, 4, 11, 14, generator=torch.Generator().manual_seed(1))  # odd sizes, uneven tiles
    with torch.no_grad():
        ref = vae.decode(z)
    out = T.tiled_decode(vae, z, tile, budget)
    assert out.shape == ref.shape and _close(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("tile, budget", [(3, None), (4, 0)])
def test_encode_equals_untiled(vae, one_thread, tile, budget):
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(2)) * 2 - 1  # 10×14 latent
    with torch.no_grad():
        mean, logvar = vae.encode(x)
    m, lv = T.tiled_encode(vae, x, tile, budget)
    assert _close(m, mean) and _close(lv, logvar)


def test_estimated_statistics_are_shared_and_exact_when_everything_fits(vae, one_thread):
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(3))
    exact = T.tiled_decode(vae, z, 4)
    assert torch.equal(T.tiled_decode(vae, z, 4, stats="estimate"), exact)  # nothing to estimate
    # Budget 0: every GroupNorm after the input takes the statistics of the 2×-subsampled latent, which is
    # under MIN_ESTIMATE and so runs exactly; the result differs from the untiled one but is finite.
    est = T.tiled_decode(vae, z, 4, budget=0, stats="estimate")
    assert torch.isfinite(est).all() and not torch.equal(est, exact)


def test_halo_follows_the_receptive_field(vae):
    conv, up = T.Step("conv", vae.decoder.conv_in), T.Step("up", vae.decoder.up_blocks[0].upsamplers[0])
    down = T.Step("down", vae.encoder.down_blocks[0].downsamplers[0])
    # read backwards: 3×3 conv +1; nearest 2× + 3×3 conv: ceil((1 + 1) / 2) = 1; 3×3 conv +1
    assert T._halo([conv, up, conv]) == (2, 1)
    assert T._halo([down, conv]) == (3, 2)  # stride 2 after a 3×3 conv: 2·1 + 1, on even edges
    assert T._halo([T.Step("conv", vae.post_quant_conv)]) == (0, 1)  # 1×1


def test_bad_inputs_say_what_to_do(vae):
    with pytest.raises(ValueError, match="multiple of 4"):
        T.tiled_encode(vae, torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="exact, estimate"):
        T.tiled_decode(vae, torch.zeros(1, 4, 4, 4), stats="fast")


def test_peak_estimates_match_traced_runs(vae, one_thread):
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), MemoryTrace() as trace:
        vae.decode(z)
    assert T.decode_peak_bytes(CFG, 12, 12) == trace.report().peak_bytes
    for budget in (None, 60_000):
        with MemoryTrace() as trace:
            T.tiled_decode(vae, z, 4, budget)
        peak, est = trace.report().peak_bytes, T.tiled_decode_peak_bytes(CFG, 12, 12, 4, budget)
        assert peak <= est <= 1.6 * peak, (budget, peak, est)
