"""UNet2DCondition: the denoiser of SD 1.x, 2.x, SDXL, LDM3D and their pruned/distilled variants.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models"), with SDXL's
size/crop conditioning (Podell et al. 2023, §2.2). Parameter names follow diffusers'
UNet2DConditionModel so its checkpoints load as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from .layers import (Attention, Conv2d, Downsample2D, FeedForward, GroupNorm, ResnetBlock2D, Upsample2D,
                     timestep_embedding)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; pre-LayerNorm residuals."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim). At inference the residual stream is updated in place: x is the
        block's own token tensor (Transformer2DModel makes it), and adding into it keeps one (B, N, dim)
        buffer alive where `x = x + ...` would keep the caller's input next to the block's result."""
        add = torch.add if torch.is_grad_enabled() else torch.Tensor.add_
        x = add(x, self.attn1(self.norm1(x)))
        x = add(x, self.attn2(self.norm2(x), context))
        return add(x, self.ff(x, self.norm3))


class Transformer2DModel(nn.Module):
    """GroupNorm, project to tokens (1x1 conv in SD1, linear in SD2/XL), `depth` blocks, project back."""

    def __init__(self, c: UNetConfig, dim: int, heads: int, depth: int):
        super().__init__()
        self.linear = c.use_linear_projection
        self.norm = GroupNorm(c.norm_num_groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim) if self.linear else Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(dim, heads, c.cross_attention_dim, c.upcast_attention) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, dim) if self.linear else Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return h + x


class _Stage(nn.Module):
    """One resolution level: resnets, each optionally followed by a transformer."""

    def __init__(self, c: UNetConfig, cins: list[int], cout: int, level: int):
        super().__init__()
        temb = c.time_embed_dim
        self.resnets = nn.ModuleList([ResnetBlock2D(ci, cout, c.norm_num_groups, c.norm_eps, temb) for ci in cins])
        self.attentions = nn.ModuleList(
            [Transformer2DModel(c, cout, c.attention_heads[level], c.transformer_layers_per_block[level])
             for _ in cins] if c.cross_attn[level] else [])

    def layer(self, i: int, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[i](x, temb)
        return self.attentions[i](x, context) if len(self.attentions) else x


class DownBlock(_Stage):
    def __init__(self, c: UNetConfig, cin: int, cout: int, level: int, last: bool):
        super().__init__(c, [cin] + [cout] * (c.layers_per_block[level] - 1), cout, level)
        self.downsamplers = nn.ModuleList([] if last else [Downsample2D(cout)])

    def forward(self, x, temb, context, n_layers: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """n_layers: run only the first n layers and no downsampler (DeepCache's shallow path)."""
        skips = []
        for i in range(len(self.resnets) if n_layers is None else n_layers):
            x = self.layer(i, x, temb, context)
            skips.append(x)
        for down in self.downsamplers if n_layers is None else ():
            x = down(x)
            skips.append(x)
        return x, skips


class UpBlock(_Stage):
    def __init__(self, c: UNetConfig, cprev: int, cout: int, skip_chs: list[int], level: int, last: bool):
        cins = [(cprev if i == 0 else cout) + s for i, s in enumerate(skip_chs)]
        super().__init__(c, cins, cout, level)
        self.upsamplers = nn.ModuleList([] if last else [Upsample2D(cout)])

    def forward(self, hidden: list[torch.Tensor], skips: list[torch.Tensor], temb, context, size,
                layers: range | None = None) -> None:
        """hidden: a one-element list holding the block's input, replaced by its output. Pops one skip per
        layer run; `layers` runs a part of the block (upsampling only with its last layer).

        The input is handed over in a list, as the skips are, so that the block can let go of it: passed as an
        argument, the caller's frames would hold it while the whole block runs (the upsampled input of the
        last up block is 20 MiB at a guided 512² image, held through its transformers' GEGLU, the UNet's peak)."""
        layers = range(len(self.resnets)) if layers is None else layers
        for i in layers:
            # (B, C + Cskip, H, W), passed straight in: no name here keeps it alive past the resnet that reads it
            hidden.append(self.layer(i, torch.cat([hidden.pop(), skips.pop()], dim=1), temb, context))
        for up in self.upsamplers if layers.stop == len(self.resnets) else ():
            hidden.append(up(hidden.pop(), size))


class MidBlock(nn.Module):
    def __init__(self, c: UNetConfig):
        super().__init__()
        ch, temb = c.block_out_channels[-1], c.time_embed_dim
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, c.norm_num_groups, c.norm_eps, temb) for _ in range(2)])
        self.attentions = nn.ModuleList(
            [Transformer2DModel(c, ch, c.attention_heads[-1], c.transformer_layers_per_block[-1])])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, dim: int, cond_dim: int | None = None):
        super().__init__()
        self.cond_proj = nn.Linear(cond_dim, cin, bias=False) if cond_dim else None
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            x = x + self.cond_proj(cond)
        return self.linear_2(F.silu(self.linear_1(x)))


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        c = self.config = config
        ch = c.block_out_channels
        n = len(ch)
        self.conv_in = Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], c.time_embed_dim, c.time_cond_proj_dim)
        self.add_embedding = (TimestepEmbedding(c.projection_class_embeddings_input_dim, c.time_embed_dim)
                              if c.addition_time_embed_dim else None)
        self.down_blocks = nn.ModuleList(
            [DownBlock(c, ch[max(i - 1, 0)], ch[i], i, i == n - 1) for i in range(n)])
        self.mid_block = MidBlock(c) if c.mid_block else None
        # Skip channels in the order the up path pops them: conv_in, then each level's resnets/downsampler.
        skip_chs = [ch[0]] + [ch[i] for i in range(n) for _ in range(c.layers_per_block[i] + (i < n - 1))]
        ups = []
        for j, level in enumerate(reversed(range(n))):
            k = c.layers_per_block[level] + 1
            mine, skip_chs = skip_chs[-k:], skip_chs[:-k]
            ups.append(UpBlock(c, ch[min(level + 1, n - 1)], ch[level], mine[::-1], level, level == 0))
        self.up_blocks = nn.ModuleList(ups)
        self.conv_norm_out = GroupNorm(c.norm_num_groups, ch[0], c.norm_eps, act="silu")
        self.conv_out = Conv2d(ch[0], c.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """sample (B, Cin, h, w), timestep (B,) or scalar, encoder_hidden_states (B, M, Cctx);
        SDXL also text_embeds (B, 1280) and time_ids (B, 6); LCM timestep_cond (B, Dcond).
        Returns the model output (B, Cout, h, w): ε or v depending on the checkpoint."""
        x, emb, ctx = self.embed(sample, timestep, encoder_hidden_states, text_embeds, time_ids, timestep_cond)
        h, skips = self.trunk(x, emb, ctx)
        return self.head(h, skips, emb, ctx)

    # The forward pass in three parts, so a runtime executor can reuse deep features across calls (DeepCache,
    # runtime/deep_cache.py): `tail` counts the last up block's final layers that `head` runs instead of `trunk`.

    def embed(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> conv_in(sample) (B, C0, h, w), the time (+ SDXL added-condition) embedding (B, 4·C0), the context."""
        c = self.config
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        dtype = self.conv_in.weight.dtype
        t_emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).to(dtype)
        emb = self.time_embedding(t_emb, None if timestep_cond is None else timestep_cond.to(dtype))
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet (SDXL-style) needs text_embeds and time_ids")
            tid = timestep_embedding(time_ids.flatten(), c.addition_time_embed_dim, c.flip_sin_to_cos,
                                     c.freq_shift).reshape(sample.shape[0], -1)  # (B, 6 * 256)
            emb = emb + self.add_embedding(torch.cat([text_embeds, tid], dim=-1).to(dtype))
        return self.conv_in(sample.to(dtype)), emb, encoder_hidden_states.to(dtype)

    def trunk(self, x, emb, ctx, tail: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """conv_in's output -> (the hidden state entering the last up block's final `tail` layers, the skips
        those layers take: conv_in's output and the first tail - 1 layers of the first down block)."""
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, emb, ctx)
            skips += s
        hidden = [x if self.mid_block is None else self.mid_block(x, emb, ctx)]  # each up block replaces it
        del x
        for block in self.up_blocks:
            k = len(block.resnets)
            mine, skips = skips[-k:], skips[:-k]
            # Upsample to the next skip's size, so sizes that are not multiples of 2^levels work.
            size = skips[-1].shape[-2:] if skips else None
            layers = range(k - self.check_tail(tail)) if block is self.up_blocks[-1] else None
            block(hidden, mine, emb, ctx, size, layers)
            skips += mine  # what the block did not pop: the tail's skips
        return hidden.pop(), skips

    def head(self, h, skips: list[torch.Tensor], emb, ctx, tail: int = 0) -> torch.Tensor:
        """The last up block's final `tail` layers on h with their skips, then the output norm and conv."""
        last = self.up_blocks[-1]
        if tail:
            hidden = [h]
            last(hidden, skips, emb, ctx, None, range(len(last.resnets) - tail, len(last.resnets)))
            h = hidden.pop()
        return self.conv_out(self.conv_norm_out(h))

    def tail_skips(self, x, emb, ctx, tail: int) -> list[torch.Tensor]:
        """The skips `head` needs for `tail` layers, from conv_in's output: it and the first tail - 1 layers
        of the first down block (the shallow part of the network)."""
        return [x] + self.down_blocks[0](x, emb, ctx, n_layers=self.check_tail(tail) - 1)[1]

    def check_tail(self, tail: int) -> int:
        k = len(self.up_blocks[-1].resnets)
        if not 0 <= tail <= k:
            raise ValueError(f"the last up block has {k} layers; a tail of {tail} is too deep (use 0..{k})")
        return tail
