"""DeepCache, Ma, Fang & Wang 2023 ("DeepCache: Accelerating Diffusion Models for Free", arXiv 2312.00858, §3.2-3.3):
adjacent denoising steps produce nearly the same high-level UNet features, so compute them on one step, keep them,
and on the next steps recompute only the shallow path around the cached features.

A UNet executor (runtime/executors.py): called like the UNet, it runs one of two paths through the UNet's parts
(models/unet.py `embed` / `trunk` / `head` / `tail_skips`):

    full call     the whole UNet runs; the hidden state entering the last up block's layer that takes skip
                  `branch` (skip 0 is conv_in's output, skip i the i-th layer of the first down block) is stored
    cached call   conv_in, the first `branch` layers of the first down block, and the last up block's layers
                  that take skips branch..0, started from the stored features

Uniform 1:N strategy (paper §3.3): one full call, then interval - 1 cached ones. The calls counted are UNet calls,
so a 2nd-order sampler that calls the UNet twice per step (Heun) refreshes every N calls, not every N steps.
branch=1 is the paper's shallowest branch for Stable Diffusion (its `cache_layer_id=0, cache_block_id=0`): the
first resnet (+ attention) of the first down block is recomputed, and the last two layers of the last up block.
One executor serves one sampling run: the stored features are those of that run's batch (for CFG, [uncond; cond]),
so the batched run never shares it between requests.
"""
from __future__ import annotations

import torch
from torch import nn


class DeepCache:
    """`DeepCache(unet, interval, branch)(sample, timestep, encoder_hidden_states, **extra)` -> UNet output."""

    def __init__(self, unet: nn.Module, interval: int = 3, branch: int = 1):
        if interval < 1:
            raise ValueError(f"cache interval must be at least 1 (1 = no caching), got {interval}")
        if branch < 0:
            raise ValueError(f"cache branch must be at least 0, got {branch}")
        self.unet, self.interval, self.branch = unet, interval, branch
        unet.check_tail(branch + 1)
        self.features: torch.Tensor | None = None   # (B, C, h, w) entering the cached layers, from the last full call
        self.full_calls = self.cached_calls = 0
        self.last_full = False                      # whether the latest call ran the whole UNet

    def __call__(self, sample, timestep, encoder_hidden_states, **extra) -> torch.Tensor:
        tail = self.branch + 1
        x, emb, ctx = self.unet.embed(sample, timestep, encoder_hidden_states, **extra)
        due = (self.features is None or self.features.shape[0] != x.shape[0]
               or (self.full_calls + self.cached_calls) % self.interval == 0)
        self.last_full = due
        if due:
            self.full_calls += 1
            self.features, skips = self.unet.trunk(x, emb, ctx, tail)
        else:
            self.cached_calls += 1
            skips = self.unet.tail_skips(x, emb, ctx, tail)
        return self.unet.head(self.features, skips, emb, ctx, tail)
