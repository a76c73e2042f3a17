"""DeepCache, Ma, Fang & Wang 2023 ("DeepCache: Accelerating Diffusion Models for Free", arXiv 2312.00858, §3.2-3.3):
adjacent denoising steps produce nearly the same high-level UNet features, so compute them on one step, keep them,
and on the next steps recompute only the shallow path around the cached features.

The UNet (models/unet.py, `forward(..., cache=)`) does the work; this object holds the state across its calls:

    full call     the whole UNet runs; the hidden state entering the last up block's layer that takes skip
                  `branch` (skip 0 is conv_in's output, skip i the i-th layer of the first down block) is stored
    cached call   conv_in, the first `branch` layers of the first down block, and the last up block's layers
                  that take skips branch..0, started from the stored features

Uniform 1:N strategy (paper §3.3): one full call, then interval - 1 cached ones. The calls counted are UNet calls,
so a 2nd-order sampler that calls the UNet twice per step (Heun) refreshes every N calls, not every N steps.
branch=1 is the paper's shallowest branch for Stable Diffusion (its `cache_layer_id=0, cache_block_id=0`): the
first resnet (+ attention) of the first down block is recomputed, and the last two layers of the last up block.
One cache serves one sampling run: the stored features are those of that run's batch (for CFG, [uncond; cond]).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DeepCache:
    interval: int = 3
    branch: int = 1
    features: torch.Tensor | None = field(default=None, repr=False)   # (B, C, h, w) of the last full call
    full_calls: int = 0
    cached_calls: int = 0
    last_full: bool = False          # whether the latest call ran the whole UNet

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"cache interval must be at least 1 (1 = no caching), got {self.interval}")
        if self.branch < 0:
            raise ValueError(f"cache branch must be at least 0, got {self.branch}")

    def full_call(self, batch: int) -> bool:
        """Called once per UNet call with its batch size: True = run the whole UNet (and store), False = reuse."""
        due = (self.features is None or self.features.shape[0] != batch
               or (self.full_calls + self.cached_calls) % self.interval == 0)
        if due:
            self.full_calls += 1
        else:
            self.cached_calls += 1
        self.last_full = due
        return due
