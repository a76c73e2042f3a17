"""The ablation table's lower-bound column: the traced live-set bound of the op order beside Tensor MB."""
from __future__ import annotations

from fastldm.bench import ablation as A
from fastldm.config import UNetConfig

TINY = UNetConfig(block_out_channels=(32, 64), layers_per_block=(1, 1), cross_attn=(True, False),
                  attention_heads=(2, 2), transformer_layers_per_block=(1, 1), norm_num_groups=8,
                  cross_attention_dim=16, sample_size=8)


def test_lower_bound_sits_under_tensor_mb(one_thread):
    result = A.run_ablation(A.random_unet(TINY), latent=8, repeats=1, warmup=0, peers=False)
    rows = {r["name"]: r for r in result["rows"]}
    for name in ("Baseline", "+Winograd"):
        r = rows[name]
        # The profiler sees every allocation (op outputs and scratch inside ops); the bound frees outputs at
        # their last use: never above it.
        assert 0 < r["bound_mb"] <= r["tensor_mb"], r
    assert rows["+CUDA graphs"]["bound_mb"] is None  # n/a on a CPU
    table = A.markdown(result)
    assert "| Tensor MB | lower bound |" in table
    assert f"| {rows['Baseline']['tensor_mb']:.1f} | {rows['Baseline']['bound_mb']:.1f} |" in table
